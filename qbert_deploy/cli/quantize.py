"""qbert-quantize: the command line of `qbert_deploy.quantize_run` (its options and its run)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from qbert_deploy.cli.common import run_cli
from qbert_deploy.quantize_run import PROG, build_parser, run

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
