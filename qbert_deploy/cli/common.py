"""What every command shares: one-line errors and non-zero exit codes, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from qbert_deploy.extras import missing_extra

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
    """Run a command body; a known error becomes one line on stderr and exit code 2, Ctrl-C exit code 130, a module
    of a missing extra one line naming its pip command."""
    try:
        return body()
    except KeyboardInterrupt:
        return fail("interrupted", code=130, prog=prog)
    except ImportError as err:
        if _interrupted(err):
            return fail("interrupted", code=130, prog=prog)
        missing = missing_extra(err)
        if missing is None:
            raise
        return fail(str(missing), prog=prog)
    except EXPECTED_ERRORS as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return fail(message, prog=prog)
