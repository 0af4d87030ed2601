"""ONNX Runtime's own recipes, as a user would apply them: transformer fusions and `quantize_dynamic` int8 (which
lives in the package, `qbert_deploy.validation.ort_int8`, since the demo prints it too)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from qbert_deploy.validation.ort_int8 import dynamic_int8

__all__ = ["dynamic_int8", "fused_fp32"]  # benchmarks.run takes both from here


def fused_fp32(fp32: Path, out: Path, num_heads: int, hidden: int) -> Path:
    """onnxruntime.transformers.optimizer (Attention, EmbedLayerNormalization, SkipLayerNorm, BiasGelu)."""
    if not out.is_file():
        from onnxruntime.transformers.optimizer import optimize_model

        with contextlib.redirect_stdout(io.StringIO()):
            logging.getLogger("onnxruntime").setLevel(logging.ERROR)
            optimized = optimize_model(str(fp32), model_type="bert", num_heads=num_heads, hidden_size=hidden)
            optimized.save_model_to_file(str(out))
    return out
