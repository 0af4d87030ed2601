"""Model size the Q-BERT paper's way: quantized weights x bits/8, float leftovers x 4 bytes, beside fp32."""

from __future__ import annotations

from torch import nn

from qbert_deploy.models.wrap import embedding_modules, quantizable_linears
from qbert_deploy.recipe import Recipe

MB = 2**20


def _average_bits(module: nn.Module, default: int) -> float:
    row_bits = getattr(module, "row_bits", None)
    return sum(row_bits) / len(row_bits) if row_bits else float(default)


def paper_size(model: nn.Module, recipe: Recipe | None) -> dict[str, float]:
    """Bytes of the encoder weights at their bits, embeddings at theirs, everything else float32.

    Scales and zero points are left out, as in the paper. `recipe=None` is the fp32 model.
    """
    bits: dict[str, float] = {}
    if recipe is not None:
        # a matrix whose rows have their own widths (AQ-BERT subgroups) counts each row at its width
        bits = {f"{name}.weight": _average_bits(model.get_submodule(name), recipe.for_module(name).bits)
                for name in quantizable_linears(model)}
        if recipe.embedding is not None:
            bits.update({f"{name}.weight": recipe.embedding.bits for name in embedding_modules(model)})
    total_bits = fp32_bits = 0.0
    for name, param in model.named_parameters():
        fp32_bits += param.numel() * 32
        total_bits += param.numel() * bits.get(name, 32)
    return {"size_mb": total_bits / 8 / MB, "fp32_mb": fp32_bits / 8 / MB, "compression": fp32_bits / total_bits}
