"""Whole encoder layers: which teacher layers a shorter student keeps, the checks on them, and their removal.

`--keep-layers K` builds the student from K of the fine-tuned model's layers (DistilBERT's initialisation when K is
half the stack) and removes the others physically: the config's layer count becomes K, so model.pt, the export and
the lowered files simply have K layers. `--layer-map` names the teacher layer each student layer is distilled
against (models/distill.py's Distiller); by default the layer it was initialised from.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from torch import nn

from qbert_deploy.families import family


class LayerChoiceError(ValueError):
    """A --keep-layers or --layer-map that names layers the model or the teacher does not have."""


def spread_layers(total: int, keep: int) -> tuple[int, ...]:
    """The `keep` layers of a `total`-layer stack a student starts from: the top layer of each of `keep` equal
    slices, i.e. layer (i + 1) * total // keep - 1 for student layer i.

    Evenly spread and always ending with the last layer, whose output the head was trained on. For keep = total / 2
    this is every other layer (1, 3, 5 of 6: DistilBERT's one layer in two); keep = total keeps every layer.
    """
    if not 1 <= keep <= total:
        raise LayerChoiceError(f"--keep-layers must be in 1..{total} (the model has {total} layers), got {keep}")
    return tuple((i + 1) * total // keep - 1 for i in range(keep))


def layer_count(config: dict[str, Any]) -> int:
    """The encoder's layer count of a config.json, under its family's key."""
    return int(family(config.get("model_type")).config_value(config, "num_hidden_layers"))


def check_layer_map(layer_map: Sequence[int], keep: int, teacher_layers: int) -> tuple[int, ...]:
    """A user's --layer-map: one teacher layer per student layer, strictly increasing, each one the teacher has."""
    mapping = tuple(int(i) for i in layer_map)
    if len(mapping) != keep:
        raise LayerChoiceError(f"--layer-map has {len(mapping)} entries; the student has {keep} layers "
                               "(--keep-layers): give one teacher layer per student layer")
    missing = [i for i in mapping if not 0 <= i < teacher_layers]
    if missing:
        raise LayerChoiceError(f"--layer-map names layer {missing[0]}, but the teacher has {teacher_layers} layers "
                               f"(0..{teacher_layers - 1})")
    if any(b <= a for a, b in itertools.pairwise(mapping)):
        raise LayerChoiceError(f"--layer-map must be strictly increasing, got {','.join(map(str, mapping))}")
    return mapping


def drop_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Remove every encoder layer of `model` (in place) but `keep`, which become layers 0..K-1 in that order;
    the config's layer count becomes K. Returns `model`."""
    config: Any = model.config
    fam = family(getattr(config, "model_type", None))
    parent_name, attribute = fam.layer_prefix.rsplit(".", 1)
    parent = model.get_submodule(parent_name)
    layers = getattr(parent, attribute)
    assert isinstance(layers, nn.ModuleList)
    if not keep or list(keep) != sorted(set(keep)) or not all(0 <= i < len(layers) for i in keep):
        raise LayerChoiceError(f"layers to keep must be increasing, at least one, each < {len(layers)}, "
                               f"got {list(keep)}")
    setattr(parent, attribute, nn.ModuleList([layers[i] for i in keep]))
    for index, layer in enumerate(getattr(parent, attribute)):
        for module in layer.modules():  # transformers' attention caches are keyed by layer_idx
            if getattr(module, "layer_idx", None) is not None:
                module.layer_idx = index
    setattr(config, fam.config_keys.get("num_hidden_layers", "num_hidden_layers"), len(keep))
    return model
