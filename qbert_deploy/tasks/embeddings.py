"""Feature extraction (sentence embeddings), the torch-free half of its adapter: the pooling a
sentence-transformers directory declares, its text data, and the fidelity measures of embeddings.

The torch half (encoder + pooling + normalisation as one module, and its label-free task) is
qbert_deploy/models/embedding.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

POOLING_MODES = ("mean", "cls", "max")
POOLING_DIR = "1_Pooling"
# sentence-transformers' 1_Pooling/config.json flag of each mode we implement; any other flag set is refused
_FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
_OTHER_FLAGS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
POOLING_TYPE = "sentence_transformers.models.Pooling"
NORMALIZE_TYPE = "sentence_transformers.models.Normalize"
TRANSFORMER_TYPE = "sentence_transformers.models.Transformer"
# config.json keys that carry the pooling inside model.pt's config and the fp32 folder (transformers keeps them)
POOLING_KEY, NORMALIZE_KEY = "sentence_pooling", "sentence_normalize"


class EmbeddingDataError(ValueError):
    """A sentence-transformers directory or an embedding data file this project cannot use (one-line message)."""


@dataclass(frozen=True)
class Pooling:
    """How token vectors become one sentence vector, and whether it is scaled to unit length."""

    mode: str  # one of POOLING_MODES
    normalize: bool

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise EmbeddingDataError(f"pooling {self.mode!r} is not supported; choose one of "
                                     f"{', '.join(POOLING_MODES)}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EmbeddingDataError(f"{path}: cannot be read as JSON ({err.__class__.__name__})") from None


def _modules(folder: Path) -> list[dict[str, Any]]:
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise EmbeddingDataError(f"{folder / 'modules.json'}: expected a list of modules")
    return modules


def pooling_of_config(config: Any, where: str) -> str:
    """The mode a 1_Pooling/config.json selects: exactly one of mean, CLS, max (others are refused)."""
    if not isinstance(config, dict):
        raise EmbeddingDataError(f"{where}: expected a JSON object")
    chosen = [mode for mode, flag in _FLAGS.items() if config.get(flag) is True]
    other = [flag for flag in _OTHER_FLAGS if config.get(flag) is True]
    if other or len(chosen) != 1:
        named = ", ".join(other + [_FLAGS[m] for m in chosen]) or "no pooling mode"
        raise EmbeddingDataError(f"{where}: pooling {named} is not supported; exactly one of "
                                 f"{', '.join(_FLAGS.values())} must be true")
    return chosen[0]


def read_pooling(folder: str | Path, override: str | None = None) -> Pooling:
    """The pooling and normalisation of a model directory: a sentence-transformers directory's own (modules.json,
    its Pooling module's config.json, a Normalize module), or `override` (--pooling) for any directory."""
    root = Path(folder)
    if not (root / "modules.json").is_file():
        if override is None:
            raise EmbeddingDataError(f"{root}: no sentence-transformers pooling config (modules.json); give "
                                     f"--pooling {'|'.join(POOLING_MODES)}")
        return Pooling(override, normalize=False)
    modules = _modules(root)
    types = [str(m.get("type", "")) for m in modules]
    normalize = NORMALIZE_TYPE in types
    if override is not None:
        return Pooling(override, normalize)
    pooling = [m for m in modules if m.get("type") == POOLING_TYPE]
    if len(pooling) != 1:
        raise EmbeddingDataError(f"{root / 'modules.json'}: expected one {POOLING_TYPE} module, found "
                                 f"{len(pooling)}; give --pooling {'|'.join(POOLING_MODES)}")
    path = root / str(pooling[0].get("path", POOLING_DIR)) / "config.json"
    if not path.is_file():
        raise EmbeddingDataError(f"{path}: missing (the pooling module's config)")
    return Pooling(pooling_of_config(_read_json(path), str(path)), normalize)


def sentence_max_length(folder: str | Path) -> int | None:
    """The max_seq_length a sentence-transformers directory declares (sentence_bert_config.json), or None."""
    path = Path(folder) / "sentence_bert_config.json"
    if not path.is_file():
        return None
    value = _read_json(path)
    length = value.get("max_seq_length") if isinstance(value, dict) else None
    return length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None


def pooling_config(pooling: Pooling, dimension: int) -> dict[str, Any]:
    """sentence-transformers' 1_Pooling/config.json for `pooling` (every flag written, as its own save does)."""
    flags = {flag: pooling.mode == mode for mode, flag in _FLAGS.items()}
    return {"word_embedding_dimension": dimension, **flags, **dict.fromkeys(_OTHER_FLAGS, False),
            "include_prompt": True}


def read_texts(path: str | Path) -> list[str]:
    """A .txt file of one text per line (blank lines skipped); an empty file is an error."""
    source = Path(path)
    try:
        raw = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EmbeddingDataError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise EmbeddingDataError(f"{source}: cannot be read as UTF-8 text ({err.__class__.__name__})") from None
    texts = [line.strip() for line in raw.splitlines() if line.strip()]
    if not texts:
        raise EmbeddingDataError(f"{source}: no texts (expected one text per line)")
    return texts


def read_text_data(path: str | Path, columns: Any = None) -> tuple[list[str], list[str]]:
    """Embedding data: a .txt file (one text per line), or the text column of a TSV (single texts only); and the
    TSV's raw label of each text, for the probe ([] for a .txt file). `columns`: data.tsv.Columns the user named."""
    from qbert_deploy.data.tsv import read_table

    source = Path(path)
    if source.suffix.lower() != ".tsv":
        return read_texts(source), []
    table = read_table(source, columns)
    if table.pairs:
        raise EmbeddingDataError(f"{source}: holds sentence pairs; an embedding model reads one text (--text-columns)")
    kept = [(text, label) for (text, _), label in zip(table.texts, table.raw_labels, strict=True) if text.strip()]
    if not kept:
        raise EmbeddingDataError(f"{source}: no texts")
    return [text for text, _ in kept], [label for _, label in kept]


def _unit(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def cosines(embeddings: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-text cosine similarity of two [texts, dim] embedding arrays."""
    if embeddings.shape != reference.shape:
        raise ValueError(f"embeddings {list(embeddings.shape)} and reference {list(reference.shape)} differ")
    return np.asarray((_unit(embeddings) * _unit(reference)).sum(-1))


def neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Each text's k nearest other texts by cosine, [texts, k] (ties broken by index)."""
    unit = _unit(embeddings)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def neighbour_overlap(embeddings: np.ndarray, reference: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each text's k nearest neighbours (within the set) that two embeddings share."""
    k = min(k, len(embeddings) - 1)
    if k < 1:
        raise ValueError("neighbour overlap needs at least two texts")
    mine, theirs = neighbours(embeddings, k), neighbours(reference, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(mine, theirs, strict=True)]))


def fidelity(embeddings: np.ndarray, reference: np.ndarray, k: int = 10) -> dict[str, float]:
    """Mean and 5th percentile of per-text cosine, and k-nearest-neighbour overlap, against a reference."""
    c = cosines(embeddings, reference)
    return {"mean_cosine": float(c.mean()), "p5_cosine": float(np.percentile(c, 5)),
            f"neighbours_{k}": neighbour_overlap(embeddings, reference, k)}


def pooling_of_model(config: dict[str, Any]) -> Pooling:
    """The pooling a model.pt config carries (models/embedding.py writes these keys)."""
    return Pooling(str(config.get(POOLING_KEY, "mean")), bool(config.get(NORMALIZE_KEY, False)))


# Where sentence-transformers' ONNX backend is told to find the graph: model_kwargs={"file_name": ONNX_FILE_NAME}
ONNX_FILE_NAME = "model.onnx"


def write_sentence_transformers_files(folder: Path, pooling: Pooling, dimension: int,
                                      max_length: int | None) -> None:
    """Make an export folder a sentence-transformers model directory too: modules.json (Transformer at the root,
    then Pooling and, when the source has it, Normalize), their configs and sentence_bert_config.json."""
    modules: list[dict[str, Any]] = [
        {"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_TYPE},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": POOLING_TYPE}]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": NORMALIZE_TYPE})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (folder / POOLING_DIR).mkdir(exist_ok=True)
    (folder / POOLING_DIR / "config.json").write_text(json.dumps(pooling_config(pooling, dimension), indent=2) + "\n")
    bert_config = {"max_seq_length": max_length or 128, "do_lower_case": False}
    (folder / "sentence_bert_config.json").write_text(json.dumps(bert_config, indent=2) + "\n")


def probe_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                   seed: int = 0) -> float:
    """MTEB's classification protocol: a logistic regression (at most 100 iterations) trained on one split's
    embeddings and labels, its accuracy (percent) on another's."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise EmbeddingDataError("the probe accuracy needs scikit-learn: pip install scikit-learn") from None
    if len(set(train_labels.tolist())) < 2:
        raise EmbeddingDataError("the probe's training texts must hold at least two labels")
    probe = LogisticRegression(max_iter=100, random_state=seed).fit(train, train_labels)
    return 100.0 * float((probe.predict(test) == test_labels).mean())
