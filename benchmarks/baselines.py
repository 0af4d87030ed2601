"""ONNX Runtime's own recipes, as a user would apply them: transformer fusions and `quantize_dynamic` int8."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path


def fused_fp32(fp32: Path, out: Path, num_heads: int, hidden: int) -> Path:
    """onnxruntime.transformers.optimizer (Attention, EmbedLayerNormalization, SkipLayerNorm, BiasGelu)."""
    if not out.is_file():
        from onnxruntime.transformers.optimizer import optimize_model

        with contextlib.redirect_stdout(io.StringIO()):
            logging.getLogger("onnxruntime").setLevel(logging.ERROR)
            optimized = optimize_model(str(fp32), model_type="bert", num_heads=num_heads, hidden_size=hidden)
            optimized.save_model_to_file(str(out))
    return out


def dynamic_int8(source: Path, out: Path) -> Path:
    """quantize_dynamic with signed int8 weights (ORT's default)."""
    if not out.is_file():
        from onnx import TensorProto
        from onnxruntime.quantization import QuantType, quantize_dynamic

        logging.getLogger().setLevel(logging.ERROR)  # it warns about pre-processing on every call
        # fused graphs hold contrib ops that shape inference cannot type: say their outputs are float
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return out
