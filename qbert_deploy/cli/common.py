"""What every command shares: one-line errors and non-zero exit codes, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qbert_deploy.data.tsv import Columns

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)


def fail(message: str, code: int = 2, prog: str = "qbert") -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def _interrupted(err: BaseException) -> bool:
    """Whether a KeyboardInterrupt is behind `err`: a Ctrl-C while a pybind11 extension (onnxruntime) initialises
    comes out as ImportError("initialization failed") raised from it."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run a command body; a known error becomes one line on stderr and exit code 2, Ctrl-C exit code 130."""
    try:
        return body()
    except KeyboardInterrupt:
        return fail("interrupted", code=130, prog=prog)
    except ImportError as err:
        if _interrupted(err):
            return fail("interrupted", code=130, prog=prog)
        raise
    except EXPECTED_ERRORS as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return fail(message, prog=prog)


def _text_columns(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(","))
    if len(names) > 2 or not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected one text column or two (a sentence pair), e.g. "
                                         f"question,sentence; got {text!r}")
    return names


def add_column_options(parser: argparse.ArgumentParser) -> None:
    """--text-columns and --label-column: the TSV columns, for a layout the header does not tell."""
    parser.add_argument("--text-columns", type=_text_columns, metavar="A[,B]",
                        help="TSV: the column holding the text, or the two of a sentence pair (default: found from "
                        "the header in the GLUE layouts SST-2, CoLA, MRPC, QQP, QNLI, RTE, MNLI, WNLI)")
    parser.add_argument("--label-column", metavar="C",
                        help="TSV: the column holding the label (default: the layout's, else 'label')")


def columns_of(args: argparse.Namespace) -> Columns:
    """The TSV columns the user named."""
    from qbert_deploy.data.tsv import Columns

    return Columns(args.text_columns, args.label_column)
