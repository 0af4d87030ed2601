"""Markers for tests that need one line of the stack: Optimum's ORTModel classes exist only on transformers 4.x."""

from __future__ import annotations

from collections.abc import Callable
from importlib.util import find_spec
from typing import TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., object])


def _has(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except ModuleNotFoundError:
        return False


HAS_OPTIMUM = _has("optimum.onnxruntime")


def needs_optimum(test: F) -> F:
    """Runs in `make test-compat` (transformers 4.57 + optimum-onnx); skipped where optimum-onnx cannot install."""
    skip = pytest.mark.skipif(not HAS_OPTIMUM, reason="optimum-onnx needs transformers<4.58: `make test-compat` "
                                                      "runs this test")
    marked: F = pytest.mark.compat(skip(test))
    return marked
