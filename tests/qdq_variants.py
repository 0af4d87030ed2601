"""Canonical-form QDQ graphs at any weight bit width, made from one export by requantizing its weights in numpy.

A torch export per bit width would take tens of seconds; this takes milliseconds and yields the same graph form
the exporter writes (per-output-channel scales, int2/int4/int8 containers, `qbert.weight_bits` metadata).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir

_CONTAINERS = {
    (2, False): (ir.DataType.UINT2, ml_dtypes.uint2), (2, True): (ir.DataType.INT2, ml_dtypes.int2),
    (4, False): (ir.DataType.UINT4, ml_dtypes.uint4), (4, True): (ir.DataType.INT4, ml_dtypes.int4),
    (8, False): (ir.DataType.UINT8, np.uint8), (8, True): (ir.DataType.INT8, np.int8),
}


def _quantize(w: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column (output channel) quantization of a [K, N] weight, the way the project's quantizer does it."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = np.maximum(np.abs(w).max(0), 1e-8) / qmax
        q = np.clip(np.round(w / scale), -qmax, qmax)
        return q.astype(np.int32), scale.astype(np.float32), np.zeros(w.shape[1], np.int32)
    lo, hi = np.minimum(w.min(0), 0), np.maximum(w.max(0), 0)
    scale = np.maximum(hi - lo, 1e-8) / (2**bits - 1)
    zp = np.clip(np.round(-lo / scale), 0, 2**bits - 1)
    q = np.clip(np.round(w / scale) + zp, 0, 2**bits - 1)
    return q.astype(np.int32), scale.astype(np.float32), zp.astype(np.int32)


def requantized(src: Path, dst: Path, bits: int, symmetric: bool = False, blocked: bool = False) -> Path:
    """Write `src` with every encoder Linear's weight requantized to `bits` (2-bit as int2, opset 25)."""
    model = ir.load(src)
    weight_bits = json.loads(model.metadata_props["qbert.weight_bits"])
    inits = model.graph.initializers
    container = 2 if bits == 2 else 4 if bits <= 4 else 8
    dtype, np_dtype = _CONTAINERS[(container, symmetric)]
    for module in [m for m in weight_bits if ".embeddings." not in f".{m}."]:
        q_v, s_v, z_v = (inits[f"{module}.{s}"] for s in ("weight_q", "weight_scale", "weight_zero_point"))
        assert q_v.const_value is not None and s_v.const_value is not None and z_v.const_value is not None
        q0 = q_v.const_value.numpy().astype(np.int32)
        w = (q0 - z_v.const_value.numpy().astype(np.int32)[None, :]) * s_v.const_value.numpy()[None, :]
        q, scale, zp = _quantize(w.astype(np.float32), bits, symmetric)
        for value, array, kind in ((q_v, q, dtype), (z_v, zp, dtype), (s_v, scale, None)):
            data = array.astype(np_dtype) if kind is not None else array
            tensor = ir.tensor(data, dtype=kind, name=value.name) if kind else ir.tensor(data, name=value.name)
            value.const_value = tensor
            value.dtype = kind or ir.DataType.FLOAT
        weight_bits[module] = bits
    if container == 2:
        model.opset_imports[""] = 25
    model.metadata_props["qbert.weight_bits"] = json.dumps(weight_bits, sort_keys=True)
    ir.save(model, dst)
    return dst
