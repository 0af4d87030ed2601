"""What every command shares: one-line errors and non-zero exit codes, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)


def fail(message: str, code: int = 2, prog: str = "qbert") -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run a command body; a known error becomes one line on stderr and exit code 2."""
    try:
        return body()
    except KeyboardInterrupt:
        return fail("interrupted", code=130, prog=prog)
    except EXPECTED_ERRORS as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return fail(message, prog=prog)
