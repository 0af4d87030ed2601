"""The encoder families every command supports, as data: where the layers are and what their modules are called.

Torch-free, so `runtimes/` (serving, lowering) reads the same table as the PyTorch side. Each command asks this
module instead of spelling out BERT's names; nothing else in the package knows which family it is handling.

Adding a fourth family is one entry in `FAMILIES`, provided its Hugging Face implementation has eager attention
and six Linears per layer in the usual order (Q, K, V, attention output, FFN in, FFN out). For example ELECTRA's
discriminator, whose modules are named as BERT's under `electra.`::

    "electra": Family("electra", base="electra", layers="encoder.layer", linears=BERT_LINEARS,
                      embeddings=BERT_EMBEDDINGS, layer_norm="output.LayerNorm"),
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

BERT_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense")
BERT_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Family:
    """One Hugging Face encoder architecture, as the quantizer, exporter, lowering and validation see it."""

    model_type: str
    base: str  # attribute of the base model under every task head: bert, distilbert, roberta
    layers: str  # the encoder's ModuleList of layers, under `base`
    linears: tuple[str, ...]  # the six quantized Linears of a layer, relative to it, in execution order
    embeddings: tuple[str, ...]  # embedding tables (quantized when a recipe asks), by their last name
    layer_norm: str  # the LayerNorm that ends a layer, relative to it: where a layer's output is read
    token_types: bool = True  # whether the exported graph takes token_type_ids
    position_offset_from_padding: bool = False  # RoBERTa: position ids start after padding_idx
    config_keys: Mapping[str, str] = field(default_factory=dict)  # BertConfig key -> this family's key

    @property
    def inputs(self) -> tuple[str, ...]:
        """The exported graph's inputs, in order (also the keys every batch for this family carries)."""
        return TEXT_INPUTS if self.token_types else TEXT_INPUTS[:2]

    @property
    def layer_prefix(self) -> str:
        return f"{self.base}.{self.layers}"

    def config_value(self, config: Mapping[str, Any], bert_key: str, default: Any = None) -> Any:
        """A BertConfig-named setting (hidden_size, num_hidden_layers...) read under this family's own key."""
        return config.get(self.config_keys.get(bert_key, bert_key), default)

    def position_offset(self, config: Mapping[str, Any]) -> int:
        """Position ids of real tokens start here: max_position_embeddings - offset tokens fit in a sequence."""
        return int(config.get("pad_token_id") or 0) + 1 if self.position_offset_from_padding else 0

    def max_tokens(self, config: Mapping[str, Any]) -> int:
        return int(config.get("max_position_embeddings", 512)) - self.position_offset(config)


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", base="bert", layers="encoder.layer", linears=BERT_LINEARS, embeddings=BERT_EMBEDDINGS,
                   layer_norm="output.LayerNorm"),
    "roberta": Family("roberta", base="roberta", layers="encoder.layer", linears=BERT_LINEARS,
                      embeddings=BERT_EMBEDDINGS, layer_norm="output.LayerNorm", token_types=False,
                      position_offset_from_padding=True),
    "distilbert": Family("distilbert", base="distilbert", layers="transformer.layer",
                         linears=("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
                                  "ffn.lin1", "ffn.lin2"),
                         embeddings=("word_embeddings", "position_embeddings"), layer_norm="output_layer_norm",
                         token_types=False,
                         config_keys={"hidden_size": "dim", "num_hidden_layers": "n_layers",
                                      "num_attention_heads": "n_heads", "intermediate_size": "hidden_dim"}),
}
SUPPORTED = tuple(FAMILIES)


class UnsupportedModelError(ValueError):
    """A model whose architecture is not in the table."""


def family(model_type: object) -> Family:
    """The table entry for a config's model_type; a one-line error naming the supported ones otherwise."""
    if isinstance(model_type, str) and model_type in FAMILIES:
        return FAMILIES[model_type]
    raise UnsupportedModelError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")


def family_of(config: Mapping[str, Any]) -> Family:
    return family(config.get("model_type"))


def _layer_pattern() -> re.Pattern[str]:
    """`<any family's layer list>.N` inside a module name (built per call: `re` caches it, and the table may grow)."""
    containers = "|".join(sorted({re.escape(f.layers) for f in FAMILIES.values()}))
    return re.compile(rf"(?:^|\.)(?:{containers})\.(\d+)(?=\.|$)")


def layer_index(module_name: str) -> int | None:
    """Encoder layer of a module name (bert.encoder.layer.3.attention.self.query -> 3), None outside the encoder."""
    match = _layer_pattern().search(module_name)
    return int(match.group(1)) if match else None


def is_layer(module_name: str) -> bool:
    """Whether a module name is an encoder layer itself (bert.encoder.layer.3, distilbert.transformer.layer.0)."""
    match = _layer_pattern().search(module_name)
    return match is not None and match.end() == len(module_name)


def is_encoder_linear(module_name: str) -> bool:
    """Whether a module name is one of an encoder layer's quantizable Linears, in any family."""
    if layer_index(module_name) is None:
        return False
    return any(module_name.endswith(f".{name}") for f in FAMILIES.values() for name in f.linears)


def short_name(module_name: str) -> str:
    """A module name for plots and tables: L3.query for bert.encoder.layer.3.attention.self.query."""
    match = _layer_pattern().search(module_name)
    if match is None:
        return module_name
    rest = module_name[match.end() + 1:].replace("attention.self.", "").replace("attention.", "att.")
    return f"L{match.group(1)}.{rest}" if rest else f"L{match.group(1)}"
