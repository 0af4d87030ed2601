"""Bytes by component of an export, beside the fp32 model, and compression the Q-BERT paper's way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import onnx_ir as ir

from qbert_deploy.recipe import WeightQuant

COMPONENTS = ("encoder_weights", "embeddings", "scales_and_zero_points", "activation_qparams", "float_leftovers")


def _component(name: str, quantized: Mapping[str, WeightQuant]) -> str:
    module, _, leaf = name.rpartition(".")
    if module in quantized:
        if leaf == "weight_q":
            return "embeddings" if "embeddings" in module else "encoder_weights"
        if leaf in ("weight_scale", "weight_zero_point"):
            return "scales_and_zero_points"
        if leaf in ("input_scale", "input_zero_point"):
            return "activation_qparams"
    return "float_leftovers"


def size_report(model: ir.Model, quantized: Mapping[str, WeightQuant], fp32_bytes: int,
                file_bytes: int) -> dict[str, Any]:
    """`fp32_bytes` is the float32 size of every weight of the model (the fp32 export's initializers)."""
    by_component = dict.fromkeys(COMPONENTS, 0)
    paper_bits = 0
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None:
            continue
        component = _component(name, quantized)
        by_component[component] += tensor.nbytes
        module = name.rpartition(".")[0]
        if component in ("encoder_weights", "embeddings"):
            paper_bits += tensor.size * quantized[module].bits
        elif component == "float_leftovers":
            paper_bits += tensor.nbytes * 8
    paper_bytes = paper_bits // 8
    total = sum(by_component.values())
    return {
        "bytes_by_component": by_component,
        "initializer_bytes": total,
        "file_bytes": file_bytes,
        "fp32_bytes": fp32_bytes,
        "compression_on_disk": round(fp32_bytes / file_bytes, 3),
        "paper_bytes": paper_bytes,
        "compression_paper": round(fp32_bytes / paper_bytes, 3),
    }


def size_markdown(report: Mapping[str, Any]) -> str:
    mb = 1024 * 1024
    lines = ["| component | MB |", "|---|---:|"]
    lines += [f"| {k.replace('_', ' ')} | {v / mb:.3f} |" for k, v in report["bytes_by_component"].items()]
    lines += [
        f"| **model.onnx** | **{report['file_bytes'] / mb:.3f}** |",
        f"| fp32 weights | {report['fp32_bytes'] / mb:.3f} |",
        "",
        f"Compression on disk: {report['compression_on_disk']:.2f}x; "
        f"the paper's way (weights x bits/8 + float leftovers): {report['compression_paper']:.2f}x.",
    ]
    return "\n".join(lines) + "\n"
