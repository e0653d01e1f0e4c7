"""Which libraries' logs a btx console shows. Their request lines (an embedded Prefect API's
`HTTP Request: ... 422 Unprocessable Entity` on its CSRF probe, botocore's retries) read as errors
to a user and say nothing about the run; they appear with `btx -v` or `BTX_LOG_LEVEL=DEBUG`."""

from __future__ import annotations

import logging
import os

CHATTY = ("httpx", "httpcore", "botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "asyncio")


def quiet_libraries() -> None:
    """Library request logs at WARNING and above, unless BTX_LOG_LEVEL asks for DEBUG."""
    if os.environ.get("BTX_LOG_LEVEL", "").upper() == "DEBUG":
        return
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_model_loads() -> None:
    """transformers' per-model bars ("Loading weights", "Writing model shards") off, unless
    BTX_LOG_LEVEL asks for DEBUG: a comparison loads dozens of models, and their bars bury its log.
    The Hub's download bars stay as they were (transformers turns those off with its own)."""
    if os.environ.get("BTX_LOG_LEVEL", "").upper() == "DEBUG":
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    downloads_shown = not hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    if downloads_shown:
        hub_utils.enable_progress_bars()


def show_everything(level: int) -> None:
    """`btx -v`: the root logger and every library named above at `level`."""
    logging.getLogger().setLevel(level)
    for name in CHATTY:
        logging.getLogger(name).setLevel(level)
