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


def show_everything(level: int) -> None:
    """`btx -v`: the root logger and every library named above at `level`."""
    logging.getLogger().setLevel(level)
    for name in CHATTY:
        logging.getLogger(name).setLevel(level)
