"""qbert-serve: an export directory behind the KServe v2 / Triton HTTP protocol, with dynamic micro-batching.

Imports neither torch nor transformers: a server needs only onnxruntime, tokenizers and the `[serve]` extra.
The names below are imported on first use, so `serving.model` (what the Triton writer and qbert-quantize read)
works on a core install without fastapi.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qbert_deploy.runtimes.serving.app import ServeConfig, create_app
    from qbert_deploy.runtimes.serving.batcher import Batcher, QueueFull
    from qbert_deploy.runtimes.serving.model import (
        CANONICAL,
        ModelDirError,
        ServedFile,
        ServedModel,
        open_served,
        served_file,
    )

_HOME = {
    "ServeConfig": "app", "create_app": "app", "Batcher": "batcher", "QueueFull": "batcher",
    **{name: "model" for name in ("CANONICAL", "ModelDirError", "ServedFile", "ServedModel", "open_served",
                                  "served_file")},
}

__all__ = ["CANONICAL", "Batcher", "ModelDirError", "QueueFull", "ServeConfig", "ServedFile", "ServedModel",
           "create_app", "open_served", "served_file"]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
