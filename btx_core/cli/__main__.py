"""`python -m btx_core.cli ...`: the `btx` command (what torchrun relaunches an expert branch with)."""

from btx_core.cli.main import main

main()
