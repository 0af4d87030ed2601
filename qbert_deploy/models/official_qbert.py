"""Models trained with the official Q-BERT code (sIncerass/QBERT: pytorch-pretrained-bert 0.6.2, torch 1.1).

Such a directory holds `pytorch_model.bin` (float32 shadow weights: the code re-quantizes them in every forward),
`config.json` (BERT's sizes, no `model_type`, plus the bits) and `vocab.txt`. `import_official` turns it into a
Hugging Face directory the rest of the workflow reads; `read_bits` and `bits_recipe` turn its bits into a Recipe.

What the official code does, and so what the recipe says (shared/DESIGN.md §9): one asymmetric min/max range per
tensor (its `group_number` is never set away from 1), 8-bit activations, and bits only in config.json:
`layer_bits` (encoder Linears, keys relative to `bert.encoder`, e.g. `layer.0.attention.self.query`) and
`emb_bits` (by embedding module name). A Linear or table it does not list, or lists at 32, stays float.
"""

from __future__ import annotations

import difflib
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qbert_deploy.families import FAMILIES, Family
from qbert_deploy.models.hf_compat import ATTENTION
from qbert_deploy.recipe import SUPPORTED_BITS, Recipe, WeightQuant
from qbert_deploy.tasks import QA, SEQUENCE, TOKEN, task_kind

WEIGHTS = "pytorch_model.bin"
VOCAB = "vocab.txt"
FLOAT_BITS = 32
# The fallback for a float request: model.pt's recipe has no float encoder Linear, and 8 bits is the closest it holds.
FLOAT_FALLBACK = 8
EMBEDDING_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")  # emb_bits as a list: in order
# The BertConfig settings of a pytorch-pretrained-bert config.json; everything else in it is the Q-BERT code's own.
BERT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
             "type_vocab_size", "initializer_range", "layer_norm_eps")
FAMILY: Family = FAMILIES["bert"]  # the official code is BERT only
HEADS = {"qa_outputs.weight": QA, "classifier.weight": SEQUENCE}  # the task head's weight -> its (default) task


def _bits_text() -> str:
    return f"{SUPPORTED_BITS.start}..{SUPPORTED_BITS.stop - 1}, or {FLOAT_BITS} for float"


@dataclass(frozen=True)
class OfficialBits:
    """The bits of an official config.json, checked for form (whether the names fit a model is `match_layer_bits`'s)."""

    layer_bits: Mapping[str, int]  # as written: relative to the encoder (layer.N....) or full module names
    emb_bits: Mapping[str, int]  # table name (word_embeddings...) -> bits; a table not listed is float
    quantize_activation: bool


def _check_bits(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (value not in SUPPORTED_BITS and value != FLOAT_BITS):
        raise ValueError(f"{where} is {value!r}: bits must be {_bits_text()}")
    return value


def _emb_bits(value: Any, where: str) -> dict[str, int]:
    """emb_bits as the official code reads it (a dict by module name), or a list in table order, or one number."""
    if value is None:
        return {}
    if isinstance(value, int) and not isinstance(value, bool):
        return dict.fromkeys(EMBEDDING_TABLES, _check_bits(value, where))
    if isinstance(value, list):
        if len(value) != len(EMBEDDING_TABLES):
            raise ValueError(f"{where} as a list gives the word, position and token-type bits: expected "
                             f"{len(EMBEDDING_TABLES)} numbers, got {len(value)}")
        pairs = zip(EMBEDDING_TABLES, value, strict=True)
        return {table: _check_bits(b, f"{where}[{i}]") for i, (table, b) in enumerate(pairs)}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object of table name -> bits, a list or a number, got "
                         f"{type(value).__name__}")
    out = {}
    for key, bits in value.items():
        # The official key is the module name under bert.embeddings; `word` and `embeddings.word_embeddings` too.
        table = str(key).removeprefix("bert.").removeprefix("embeddings.").removesuffix("_embeddings") + "_embeddings"
        if table not in EMBEDDING_TABLES:
            raise ValueError(f"{where} names {key!r}, which is no embedding table ({', '.join(EMBEDDING_TABLES)})")
        out[table] = _check_bits(bits, f"{where}[{key!r}]")
    return out


def read_bits(path: Path) -> OfficialBits:
    """layer_bits, emb_bits and quantize_activation of an official config.json; a one-line ValueError otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read it as JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    layer_bits = data.get("layer_bits")
    if layer_bits is None:
        raise ValueError(f"{path}: no layer_bits (the per-Linear bits of the official Q-BERT code)")
    if not isinstance(layer_bits, dict) or not layer_bits:
        raise ValueError(f"{path}: layer_bits must be a non-empty object of module name -> bits")
    act = data.get("quantize_activation", True)
    if not isinstance(act, bool):
        raise ValueError(f"{path}: quantize_activation must be true or false, got {act!r}")
    checked = {str(k): _check_bits(v, f"{path}: layer_bits[{k!r}]") for k, v in layer_bits.items()}
    return OfficialBits(layer_bits=checked, emb_bits=_emb_bits(data.get("emb_bits"), f"{path}: emb_bits"),
                        quantize_activation=act)


def encoder_linears(config: Mapping[str, Any], family: Family) -> list[str]:
    """The encoder Linears' module names from a Hugging Face config alone (nothing is built)."""
    layers = family.config_value(config, "num_hidden_layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"config num_hidden_layers must be a positive integer, got {layers!r}")
    return [f"{family.layer_prefix}.{i}.{linear}" for i in range(layers) for linear in family.linears]


def _few(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _gets(names: Sequence[str]) -> str:
    return "it gets" if len(names) == 1 else "they get"


def _encoder(family: Family) -> str:
    return family.layer_prefix.rpartition(".")[0] + "."  # layer_bits keys are relative to it: bert.encoder.


def match_layer_bits(bits: OfficialBits, linears: Sequence[str], family: Family) -> dict[str, int]:
    """layer_bits by full module name; a key that names none of `linears` is an error, never ignored (the official
    code skips it silently)."""
    relative = {name.removeprefix(_encoder(family)): name for name in linears}
    chosen: dict[str, int] = {}
    for key, value in bits.layer_bits.items():
        name = relative.get(key) or (key if key in linears else None)
        if name is None:
            close = difflib.get_close_matches(key, list(relative), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else f" (they are named like {next(iter(relative))})"
            raise ValueError(f"layer_bits names {key!r}, which is no encoder Linear of the model{hint}")
        chosen[name] = value
    return chosen


def bits_recipe(bits: OfficialBits, linears: Sequence[str], family: Family, groups: int | None,
                method: str) -> tuple[Recipe, list[str]]:
    """The recipe of official bits: asymmetric, `groups` per matrix (1, the official code's, unless given), one
    range per embedding table, 8-bit activations unless quantize_activation is false. Returns the notes to log
    (where a float request became 8 bits)."""
    chosen = match_layer_bits(bits, linears, family)
    encoder = _encoder(family)
    notes = []
    floats = [n.removeprefix(encoder) for n in linears if chosen.get(n) == FLOAT_BITS]
    unlisted = [n.removeprefix(encoder) for n in linears if n not in chosen]
    if floats:
        notes.append(f"layer_bits gives {FLOAT_BITS} (float) for {_few(floats)}: model.pt has no float encoder "
                     f"Linear, so {_gets(floats)} {FLOAT_FALLBACK} bits")
    if unlisted:
        notes.append(f"layer_bits does not list {_few(unlisted)} (float in the official code): model.pt has no "
                     f"float encoder Linear, so {_gets(unlisted)} {FLOAT_FALLBACK} bits")

    def spec(b: int) -> WeightQuant:
        return WeightQuant(bits=FLOAT_FALLBACK if b == FLOAT_BITS else b, groups=groups, symmetric=False)

    overrides = {name: spec(chosen.get(name, FLOAT_BITS)) for name in linears}
    embedding, emb_notes = _embedding_spec(bits.emb_bits, family)
    recipe = Recipe(default=spec(FLOAT_BITS), overrides=overrides, embedding=embedding,
                    activation_bits=8 if bits.quantize_activation else None, method=method)
    if not bits.quantize_activation:
        notes.append("quantize_activation is false: activations stay float (weight-only)")
    return recipe, notes + emb_notes


def _embedding_spec(emb_bits: Mapping[str, int], family: Family) -> tuple[WeightQuant | None, list[str]]:
    """One spec for every table (the recipe has one): float when all are float, else the widest width asked."""
    tables = {t: emb_bits.get(t, FLOAT_BITS) for t in family.embeddings}
    quantized = sorted({b for b in tables.values() if b != FLOAT_BITS})
    if not quantized:
        return None, []
    width = quantized[-1]
    notes = []
    if len(set(tables.values())) > 1:
        asked = ", ".join(f"{t} {'float' if b == FLOAT_BITS else b}" for t, b in tables.items())
        notes.append(f"emb_bits differ per table ({asked}): model.pt quantizes every table alike, so all get "
                     f"{width} bits (the widest asked)")
    return WeightQuant(bits=width, groups=1, symmetric=False), notes  # one range per table, as the official code


# --- the directory -----------------------------------------------------------------------------------------------

def _read_config(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_official_dir(folder: Path) -> bool:
    """A pytorch-pretrained-bert directory: pytorch_model.bin and a config.json without model_type (every
    transformers config has one)."""
    config = _read_config(folder)
    return config is not None and "model_type" not in config and (folder / WEIGHTS).is_file()


@dataclass(frozen=True)
class Imported:
    path: Path  # the Hugging Face directory written
    task: str
    num_labels: int
    notes: list[str]


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: a .bin may carry code
    except Exception as err:  # a torn file, or a pickle that is more than tensors
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: cannot load it as a state dict of tensors ({message})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return {str(k): v for k, v in state.items()}


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """pytorch-pretrained-bert names -> today's: LayerNorm gamma/beta -> weight/bias; every tensor that is no
    weight or bias (the quantizers' x_min/x_max, which carry nothing the next forward does not recompute) dropped."""
    out: dict[str, torch.Tensor] = {}
    dropped: dict[str, int] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")  # saved from inside DataParallel
        parent, _, last = key.rpartition(".")
        last = {"gamma": "weight", "beta": "bias"}.get(last, last)
        if last not in ("weight", "bias"):
            dropped[last] = dropped.get(last, 0) + 1
            continue
        out[f"{parent}.{last}" if parent else last] = value
    notes = [f"dropped {sum(dropped.values())} buffers that hold no weights ("
             + ", ".join(f"{n} x{c}" for n, c in sorted(dropped.items())) + ")"] if dropped else []
    return out, notes


def _lowercase(vocab: Path) -> bool:
    """The checkpoint does not record --do_lower_case: an uncased vocabulary has no capitals outside [SPECIAL]s."""
    with vocab.open(encoding="utf-8") as lines:
        for line in lines:
            token = line.strip()
            if token != token.lower() and not (token.startswith("[") and token.endswith("]")):
                return False
    return True


def _head(state: Mapping[str, torch.Tensor], task: str | None, weights: Path) -> tuple[str, int]:
    found = [key for key in HEADS if key in state]
    if not found:
        raise ValueError(f"{weights}: no {' or '.join(HEADS)}: not a fine-tuned classifier or QA model")
    head_task, rows = HEADS[found[0]], int(state[found[0]].shape[0])
    if task is None:
        return head_task, rows
    if (head_task == QA) != (task == QA):
        raise ValueError(f"--task {task} contradicts the checkpoint's head ({found[0]} is "
                         f"{'question answering' if head_task == QA else 'classification'})")
    return task, rows


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """save_pretrained draws a bar for a sub-second write; a refused run's stderr must stay one line."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def import_official(src: Path, dst: Path, task: str | None = None) -> Imported:
    """Write `src` (an official Q-BERT directory) as a Hugging Face directory `dst`, the head from the state
    dict (`classifier.weight` -> sequence classification, or token classification when `task` says so;
    `qa_outputs.weight` -> question answering)."""
    import transformers

    from qbert_deploy.models.build import bert_config  # validated sizes (torch and transformers: not at import)

    if task not in (None, SEQUENCE, TOKEN, QA):
        raise ValueError(f"unknown task {task!r}")
    config = _read_config(src)
    if config is None:
        raise ValueError(f"{src / 'config.json'}: cannot read it as a JSON object")
    if not (src / VOCAB).is_file():
        raise ValueError(f"{src}: no {VOCAB} (an official Q-BERT directory has pytorch_model.bin, config.json and "
                         f"{VOCAB})")
    state, dropped = convert_state_dict(_load_weights(src / WEIGHTS))
    task, num_labels = _head(state, task, src / WEIGHTS)
    hf_config = bert_config({k: config[k] for k in BERT_KEYS if k in config} | {"model_type": "bert"}, num_labels)
    hf_config.num_labels = num_labels
    model = getattr(transformers, task_kind(task).auto_class).from_config(hf_config, attn_implementation=ATTENTION)
    expected = model.state_dict()
    notes = [f"imported {src} (official Q-BERT: {task}, {num_labels} labels)", *dropped]
    if not any(k.startswith(f"{FAMILY.base}.pooler.") for k in expected):  # token/QA heads have no pooler
        pooler = [k for k in state if k.startswith(f"{FAMILY.base}.pooler.")]
        for key in pooler:
            del state[key]
        if pooler:
            notes.append(f"dropped the pooler ({task} has none)")
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        raise ValueError(f"{src / WEIGHTS}: its weights do not fit a BERT {task} model of its config.json: "
                         f"missing {missing[:3]}, unexpected {unknown[:3]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape) or not tensor.is_floating_point():
            raise ValueError(f"{src / WEIGHTS}: {key} is {tensor.dtype} {list(tensor.shape)}, the config says "
                             f"{expected[key].dtype} {list(expected[key].shape)}")
    model.load_state_dict(state, strict=True)
    dst.mkdir(parents=True, exist_ok=True)
    lower = _lowercase(src / VOCAB)
    with _no_progress_bars():
        model.save_pretrained(dst)
        shutil.copyfile(src / VOCAB, dst / VOCAB)
        tokenizer = transformers.BertTokenizer.from_pretrained(dst, do_lower_case=lower,
                                                               model_max_length=hf_config.max_position_embeddings)
        tokenizer.save_pretrained(dst)
    notes.append(f"tokenizer: {VOCAB}, {'uncased' if lower else 'cased'} (the checkpoint does not record "
                 "--do_lower_case; told from the vocabulary)")
    return Imported(dst, task, num_labels, notes)


__all__ = ["FAMILY", "FLOAT_BITS", "Imported", "OfficialBits", "bits_recipe", "convert_state_dict",
           "encoder_linears", "import_official", "is_official_dir", "match_layer_bits", "read_bits"]
