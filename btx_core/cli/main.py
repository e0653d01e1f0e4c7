"""`btx`'s entry point: logging, every command registered, and library errors turned into an
exit status. The only place that exits; commands live in pipeline, fetch, mix and after_mix."""

from __future__ import annotations

import logging
import os
import sys

import typer

from btx_core.cli.app import app
from btx_core.errors import BTXError, ConfigError
from btx_core.logs import quiet_libraries

# isort: split
# Each module registers its commands; `btx --help` lists them in this order.
from btx_core.cli import pipeline  # noqa: F401

# isort: split
from btx_core.cli import fetch  # noqa: F401

# isort: split
from btx_core.cli import mix  # noqa: F401

# isort: split
from btx_core.cli import after_mix  # noqa: F401


def main() -> None:
    logging.basicConfig(level=os.environ.get("BTX_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()
    try:
        app()
    except ConfigError as exc:
        typer.secho(f"error: invalid config: {exc}", err=True, fg="red")
        sys.exit(2)
    except BTXError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(1)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Under torchrun, leave the process group cleanly (NCCL warns about leaked groups)."""
    dist = sys.modules.get("torch.distributed")  # not imported by validate/status: keep them fast
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
