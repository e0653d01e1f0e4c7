"""btx_core: the Branch-Train-MiX library (arXiv 2403.07816). Knows nothing of Prefect.

Read it in the order of the method: config/ -> store/ -> model/ and data/ -> training/ -> moe/ ->
evaluation/, wired into one recipe per pipeline stage in stages/; cli/ is the `btx` command."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("btx")  # pyproject.toml is the one source of the version
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
