"""The paper's settings as named presets; repo-root models/*.json holds the same recipes as files."""

from __future__ import annotations

from qbert_deploy.models.methods import parse_method
from qbert_deploy.recipe import Recipe

PRESETS = ("w8", "w4", "w3", "w2", "mp24", "mp23")


def preset_recipe(name: str) -> Recipe:
    """Q-BERT recipe of a preset: group-wise (128 groups) weights, 8-bit embeddings and activations.

    The mixed-precision presets carry no per-layer bits: their method id (qbert-mp24, qbert-mp23) asks
    qbert-quantize for the Hessian allocation that fills them in.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return parse_method(f"qbert-{name}").recipe()
