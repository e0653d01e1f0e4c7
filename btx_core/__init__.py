"""btx_core: the Branch-Train-MiX library (arXiv 2403.07816). Knows nothing of Prefect."""

__version__ = "0.1.0"
