"""qbert-deploy: deploy Q-BERT-style ultra-low-precision BERTs to ONNX Runtime.

The public API is imported lazily, so `qbert_deploy.runtimes` (serving, lowering) works where torch is absent.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "Recipe": "qbert_deploy.recipe",
    "WeightQuant": "qbert_deploy.recipe",
    "RecipeError": "qbert_deploy.recipe",
    "Checkpoint": "qbert_deploy.checkpoint",
    "CheckpointError": "qbert_deploy.checkpoint",
    "load_checkpoint": "qbert_deploy.checkpoint",
    "save_checkpoint": "qbert_deploy.checkpoint",
    "quantize_model": "qbert_deploy.models.wrap",
    "build_model": "qbert_deploy.models.build",
    "make_checkpoint": "qbert_deploy.models.build",
    "export_checkpoint": "qbert_deploy.exporters.onnx_export",
    "open_session": "qbert_deploy.runtimes.session",
    "check_export": "qbert_deploy.exporters.check",
    "save_safetensors_checkpoint": "qbert_deploy.safetensors_format",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'qbert_deploy' has no attribute {name!r}")
