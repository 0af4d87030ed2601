"""Every validation message, exactly: a bad recipe, config or checkpoint names what is wrong and where."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from qbert_deploy.checkpoint import Checkpoint, CheckpointError, checkpoint_from_payload
from qbert_deploy.models.build import build_model
from qbert_deploy.recipe import Recipe, RecipeError, WeightQuant

Q0 = "bert.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize("text, message", [
    ('{"default": {"bits": 9}}', "default: weight bits must be an integer in 2..8, got 9"),
    ('{"default": {"bits": true}}', "default: weight bits must be an integer in 2..8, got True"),
    ('{"default": {"groups": 0}}', "default: groups must be a positive integer or 'row', got 0"),
    ('{"default": {"symmetric": "yes"}}', "default: symmetric must be true or false, got 'yes'"),
    ('{"default": {"bitz": 4}}', "default: unknown keys ['bitz']"),
    ('{"overrides": {"x": {"bits": 1}}}', "overrides[x]: weight bits must be an integer in 2..8, got 1"),
    ('{"overrides": []}', "recipe 'overrides' must be an object of module name -> weight config"),
    ('{"activation_bits": 4}', "activation bits must be 8 or null (float), got 4"),
    ('{"version": 3}', "recipe version 3 is not supported (this build reads 1, 2)"),
    ('{"version": 1, "structure": {"layers": {}}}',
     "a recipe with a 'structure' (pruning, per-subgroup bits) must be version 2"),
    ('{"version": 2, "structure": {"layers": {"0": {"heads": [1, 1]}}}}', "structure layer 0: head 1 is listed twice"),
    ('{"version": 2, "structure": {"layers": {"0": {"heads": [0], "head_bits": [4, 4]}}}}',
     "structure layer 0: 2 head_bits for 1 kept heads"),
    ('{"version": 2, "structure": {"layers": {"0": {"intermediate_size": 64, "ffn_bits": [4]}}}}',
     "structure layer 0: 1 ffn_bits blocks of 32 neurons do not make intermediate_size 64"),
    ('{"version": 2, "structure": {"layers": {"0": {"head_bits": [4]}}}}',
     "structure layer 0: 'head_bits' needs 'heads' (which heads the bits belong to)"),
    ('{"version": 2, "structure": {"layers": {"0": {"heads": [0], "head_bits": [1]}}}}',
     "structure layer 0.head_bits: bit widths must be in 2..8, got 1"),
    ('{"extra": 1}', "recipe has unknown keys ['extra']"),
    ('{"method": 3}', "recipe 'method' must be a string, got 3"),
    ('[1]', "a recipe is a JSON object, got list"),
    ('{', "recipe is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
])
def test_recipe_messages(text: str, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        Recipe.loads(text)
    assert str(info.value) == message


def _with(tiny_ckpt: Checkpoint, **changes: Any) -> Checkpoint:
    ckpt = copy.copy(tiny_ckpt)
    for key, value in changes.items():
        setattr(ckpt, key, value)
    return ckpt


def _config(tiny_ckpt: Checkpoint, **changes: Any) -> dict[str, Any]:
    return {**tiny_ckpt.config, **changes}


def _state(tiny_ckpt: Checkpoint, name: str, value: torch.Tensor | None) -> dict[str, torch.Tensor]:
    state = dict(tiny_ckpt.state_dict)
    if value is None:
        del state[name]
    else:
        state[name] = value
    return state


BUILD_CASES: list[tuple[str, Callable[[Checkpoint], Checkpoint], str]] = [
    ("groups do not divide", lambda c: _with(c, recipe=Recipe(overrides={Q0: WeightQuant(bits=4, groups=7)})),
     f"layer {Q0}: 7 groups do not divide 64 output rows"),
    ("unknown module", lambda c: _with(c, recipe=Recipe(overrides={"encoder.layer.0.attention.self.query":
                                                                   WeightQuant()})),
     "recipe names modules the model does not have: encoder.layer.0.attention.self.query "
     f"(did you mean {Q0}?)"),
    ("embedding groups", lambda c: _with(c, recipe=Recipe(default=WeightQuant(bits=4, groups=4),
                                                          embedding=WeightQuant(bits=8, groups=3))),
     "embedding bert.embeddings.position_embeddings: 3 groups do not divide 128 output rows"),
    ("model type", lambda c: _with(c, config=_config(c, model_type="gpt2")),
     "config model_type 'gpt2' is not supported; supported: bert, roberta, distilbert"),
    ("huge hidden", lambda c: _with(c, config=_config(c, hidden_size=10**7)),
     "config 'hidden_size' must be an integer in 1..65,536, got 10000000"),
    ("layers as text", lambda c: _with(c, config=_config(c, num_hidden_layers="2")),
     "config 'num_hidden_layers' must be an integer in 1..1,024, got '2'"),
    ("too many parameters", lambda c: _with(c, config=_config(c, vocab_size=4_000_000, hidden_size=1024,
                                                              num_attention_heads=16)),
     "config describes 4,106,118,402 parameters, more than the 2,000,000,000 this tool accepts"),
    ("heads", lambda c: _with(c, config=_config(c, num_attention_heads=5)),
     "config hidden_size 64 is not a multiple of num_attention_heads 5"),
    ("shape", lambda c: _with(c, state_dict=_state(c, f"{Q0}.weight", torch.zeros(64, 63))),
     f"weight {Q0}.weight has shape [64, 63], the config says [64, 64]"),
    ("dtype", lambda c: _with(c, state_dict=_state(c, f"{Q0}.weight", torch.zeros(64, 64, dtype=torch.int8))),
     f"weight {Q0}.weight has dtype torch.int8, the model needs torch.float32"),
    ("missing", lambda c: _with(c, state_dict=_state(c, f"{Q0}.bias", None)),
     f"weights do not match the config: missing ['{Q0}.bias'], unexpected []"),
    ("activation ranges", lambda c: _with(c, activation_ranges={k: v for k, v in c.activation_ranges.items()
                                                                if k != Q0}),
     f"activation ranges do not match the model: missing ['{Q0}'], unknown []"),
]


@pytest.mark.parametrize("case, mutate, message", BUILD_CASES, ids=[c[0] for c in BUILD_CASES])
def test_build_messages(tiny_ckpt: Checkpoint, case: str, mutate: Callable[[Checkpoint], Checkpoint],
                        message: str) -> None:
    with pytest.raises(CheckpointError) as info:
        build_model(mutate(tiny_ckpt))
    assert str(info.value) == message


def _payload(tiny_ckpt: Checkpoint, **changes: Any) -> dict[str, Any]:
    return tiny_ckpt.to_payload() | changes


PAYLOAD_CASES: list[tuple[str, Callable[[Checkpoint], Any], str]] = [
    ("not a dict", lambda c: [1, 2], "m.pt: not a qbert-deploy checkpoint (no 'qbert-deploy/model.pt' format marker)"),
    ("version", lambda c: _payload(c, format_version=7),
     "m.pt: checkpoint format version 7 is not supported (this build reads 1)"),
    ("config", lambda c: _payload(c, config=[1]), "m.pt: 'config' must be a dict with string keys"),
    ("empty", lambda c: _payload(c, state_dict={}), "m.pt: state_dict is empty"),
    ("not tensor", lambda c: _payload(c, state_dict={"w": [1.0]}), "m.pt: state_dict['w'] is not a tensor"),
    ("nan", lambda c: _payload(c, state_dict={"w": torch.tensor([1.0, float("nan")])}),
     "m.pt: state_dict['w'] holds NaN or Inf"),
    ("inf", lambda c: _payload(c, state_dict={"w": torch.tensor([float("-inf")])}),
     "m.pt: state_dict['w'] holds NaN or Inf"),
    ("huge", lambda c: _payload(c, state_dict={"w": torch.tensor([3e38])}),
     "m.pt: state_dict['w'] holds a value of magnitude 3e+38, beyond 1e+30"),
    ("sparse", lambda c: _payload(c, state_dict={"w": torch.eye(3).to_sparse()}),
     "m.pt: state_dict['w'] is not a dense tensor (torch.sparse_coo)"),
    ("complex", lambda c: _payload(c, state_dict={"w": torch.zeros(2, dtype=torch.complex64)}),
     "m.pt: state_dict['w'] is complex (torch.complex64)"),
    ("recipe", lambda c: _payload(c, recipe={"default": {"bits": 1}}),
     "m.pt: default: weight bits must be an integer in 2..8, got 1"),
    ("range order", lambda c: _payload(c, activation_ranges={"a": [1.0, -1.0]}),
     "m.pt: activation range of 'a' must be [min, max], got [1.0, -1.0]"),
    ("range inf", lambda c: _payload(c, activation_ranges={"a": [0.0, float("inf")]}),
     "m.pt: activation range of 'a' must be [min, max], got [0.0, inf]"),
    ("labels", lambda c: _payload(c, labels=[]), "m.pt: 'labels' must be a non-empty list of label names"),
    ("duplicate labels", lambda c: _payload(c, labels=["a", "a"]), "m.pt: 'labels' has duplicates: ['a', 'a']"),
    ("tokenizer text", lambda c: _payload(c, tokenizer_files={"vocab.txt": b"x"}),
     "m.pt: tokenizer file 'vocab.txt' must be text"),
    ("tokenizer path", lambda c: _payload(c, tokenizer_files={"../x": "x"}),
     "m.pt: tokenizer file name '../x' is not a plain file name of its own"),
    ("metrics", lambda c: _payload(c, metrics={"acc": "high"}), "m.pt: 'metrics' must map names to numbers"),
]


@pytest.mark.parametrize("case, make, message", PAYLOAD_CASES, ids=[c[0] for c in PAYLOAD_CASES])
def test_payload_messages(tiny_ckpt: Checkpoint, case: str, make: Callable[[Checkpoint], Any], message: str) -> None:
    with pytest.raises(CheckpointError) as info:
        checkpoint_from_payload(make(tiny_ckpt), "m.pt")
    assert str(info.value) == message


def test_more_than_three_unknown_modules_are_counted() -> None:
    recipe = Recipe(overrides={f"nope.{i}": WeightQuant() for i in range(5)})
    with pytest.raises(RecipeError) as info:
        recipe.check_modules([Q0])
    assert str(info.value) == "recipe names modules the model does not have: nope.0, nope.1, nope.2 and 2 more"


@pytest.mark.parametrize("config", [{}, {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                         "intermediate_size": 3072}])
def test_parameter_estimate_is_exact(tiny_ckpt: Checkpoint, config: dict[str, int]) -> None:
    """The allocation bound is computed before building; it must equal what the model really has."""
    from qbert_deploy.models.build import _float_model, bert_config, estimated_parameters

    full = {**tiny_ckpt.config, **config}
    with torch.device("meta"):
        model = _float_model(bert_config(full, 3), 3)
    assert estimated_parameters(full, 3) == sum(p.numel() for p in model.parameters())
