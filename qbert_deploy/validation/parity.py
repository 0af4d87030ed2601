"""The export's parity check: PyTorch fake-quant vs ORT with optimizations off vs onnx.reference, on the same
inputs, judged in output steps (the median error, as the accuracy gate judges the exact backends).

Argmax agreement is reported but decides nothing: on inputs with near-tied logits (QA's start and end of a token,
a random model's classes) the smallest float difference flips it, while a wrong export moves most logits by many
steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from onnx.reference import ReferenceEvaluator
from tokenizers import Tokenizer
from torch import nn

from qbert_deploy.checkpoint import Checkpoint
from qbert_deploy.families import TEXT_INPUTS, family_of
from qbert_deploy.models.build import build_model
from qbert_deploy.runtimes.serving.model import padded_feeds
from qbert_deploy.runtimes.session import open_session
from qbert_deploy.tasks import FEATURE, QA, task_kind
from qbert_deploy.tasks.embeddings import cosines
from qbert_deploy.validation.stats import EXACT_MEDIAN_STEPS, error_stats, output_step

__all__ = ["ParityError", "ParityResult", "export_verifier", "output_step", "parity_batch", "parity_check",
           "random_batch", "vocabulary_batch"]

Batch = dict[str, np.ndarray]
PARITY_ROWS = 8
PARITY_TOKENS = 64  # at most, and at most what the model was trained at


class ParityError(Exception):
    """PyTorch and ONNX disagree beyond the tolerance."""


@dataclass(frozen=True)
class ParityResult:
    backend: str
    max_abs_error: float
    output_step: float
    argmax_agreement: float
    median_abs_error: float = 0.0
    least_cosine: float | None = None  # embeddings: the lowest per-row cosine (an argmax of a vector means nothing)

    @property
    def max_error_steps(self) -> float:
        return self.max_abs_error / self.output_step

    @property
    def median_error_steps(self) -> float:
        return self.median_abs_error / self.output_step

    @property
    def ok(self) -> bool:
        return self.median_error_steps <= EXACT_MEDIAN_STEPS

    def line(self) -> str:
        head = (f"{self.backend:<22} max |{'embedding' if self.least_cosine is not None else 'logit'} error| "
                f"{self.max_abs_error:.3g} = {self.max_error_steps:.2f} output steps, median "
                f"{self.median_error_steps:.2g}; ")
        if self.least_cosine is not None:
            return head + f"least cosine {self.least_cosine:.6f}"
        return head + f"argmax agreement {100 * self.argmax_agreement:.1f}%"


def _joined(outputs: list[np.ndarray]) -> np.ndarray:
    """One array of a model's outputs (QA's start and end logits stacked on a last axis)."""
    return outputs[0] if len(outputs) == 1 else np.stack(outputs, axis=-1)


@torch.no_grad()
def torch_logits(model: nn.Module, batch: Batch, names: tuple[str, ...] = ("logits",)) -> np.ndarray:
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    out = model(**inputs)
    return _joined([out[name].float().numpy() for name in names])


def _real(logits: np.ndarray, real: np.ndarray) -> np.ndarray:
    """The outputs that mean something: per-token outputs of real tokens only (padding's are arbitrary)."""
    return logits[real] if logits.ndim == 3 else logits


def _predictions(logits: np.ndarray, real: np.ndarray, spans: bool) -> np.ndarray:
    """What a user reads off the outputs: each row's class, each real token's tag, or each row's start and end
    token (QA: the argmax over the row's real tokens, not between its start and end logits)."""
    if spans:
        return np.where(real[..., None], logits, -np.inf).argmax(1)
    return _real(logits, real).argmax(-1)


def compare(expected: np.ndarray, other: np.ndarray, backend: str, real: np.ndarray,
            spans: bool = False, embedding: bool = False) -> ParityResult:
    stats = error_stats(_real(expected, real), _real(other, real).astype(np.float32))
    agree = float((_predictions(expected, real, spans) == _predictions(other, real, spans)).mean()) \
        if expected.size else 1.0
    least = float(cosines(other, expected).min()) if embedding and expected.size else None
    return ParityResult(backend, stats.max_abs, stats.step, agree, stats.median_abs, least)


def parity_check(model: nn.Module, onnx_path: Path, batch: Batch) -> list[ParityResult]:
    """Logits of the fake-quant PyTorch model against ORT (optimizations off) and onnx.reference."""
    session = open_session(onnx_path, optimize=False)
    names = [o.name for o in session.get_outputs()]  # logits, or QA's start_logits and end_logits
    embedding = names == list(task_kind(FEATURE).outputs)
    if embedding:  # the pooled vector is what users read, and it is made from every real token's last hidden state
        names = ["sentence_embedding"]
    expected = torch_logits(model, batch, tuple(names))
    ort_logits = _joined(session.run(names, batch))
    ref_logits = _joined([np.asarray(x) for x in ReferenceEvaluator(str(onnx_path)).run(names, dict(batch))])
    real = batch["attention_mask"].astype(bool)
    spans = len(names) > 1
    return [compare(expected, np.asarray(ort_logits), "onnxruntime (no opt)", real, spans, embedding),
            compare(expected, np.asarray(ref_logits), "onnx.reference", real, spans, embedding)]


def random_batch(vocab_size: int, batch: int = 4, sequence: int = 16, seed: int = 0,
                 inputs: Sequence[str] = TEXT_INPUTS) -> Batch:
    """Token ids with ragged attention masks, for models without a tokenizer at hand (the family's `inputs`)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, size=(batch, sequence), dtype=np.int64)
    lengths = rng.integers(sequence // 2, sequence + 1, size=batch)
    mask = (np.arange(sequence)[None, :] < lengths[:, None]).astype(np.int64)
    full = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {name: full[name] for name in inputs}


def vocabulary_batch(tokenizer_json: str, inputs: Sequence[str], pad_id: int, pairs: bool = False,
                     rows: int = PARITY_ROWS, max_tokens: int = PARITY_TOKENS, seed: int = 0) -> Batch:
    """Sentences of random words from the tokenizer's vocabulary, encoded the way it encodes text: special tokens,
    question and context pairs (`pairs`, QA), token types, ragged lengths padded after the text. Inputs that look
    like a task's where no real text is at hand."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_tokens)
    special = set(tokenizer.get_added_tokens_decoder())
    words = sorted({word for i in range(tokenizer.get_vocab_size(with_added_tokens=False)) if i not in special
                    if (word := tokenizer.decode([i]).strip()).isalpha()})
    if not words:
        raise ParityError("the tokenizer's vocabulary has no words to build parity inputs from")
    rng = np.random.default_rng(seed)

    def text(fewest: int, most: int) -> str:
        return " ".join(rng.choice(words, size=int(rng.integers(fewest, most + 1))))

    encodings = [tokenizer.encode(text(3, 10), text(8, 40)) if pairs else tokenizer.encode(text(3, 30))
                 for _ in range(rows)]
    return padded_feeds(encodings, {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}, inputs)


def parity_batch(checkpoint: Checkpoint) -> Batch:
    """Inputs for the export's parity check: vocabulary sentences through model.pt's tokenizer (random ids with a
    ragged mask where it records none), no longer than the model was trained at."""
    inputs = family_of(checkpoint.config).inputs
    tokens = min(PARITY_TOKENS, checkpoint.max_length or PARITY_TOKENS)
    tokenizer_json = checkpoint.tokenizer_files.get("tokenizer.json")
    if tokenizer_json is None:
        return random_batch(int(checkpoint.config["vocab_size"]), PARITY_ROWS, tokens, inputs=inputs)
    pad = checkpoint.config.get("pad_token_id")
    return vocabulary_batch(tokenizer_json, inputs, 0 if pad is None else int(pad), pairs=checkpoint.task == QA,
                            max_tokens=tokens)


def export_verifier(checkpoint: Checkpoint, report: Callable[[str], None] = print) -> Callable[[Path], None]:
    """`export_checkpoint`'s `verify`: the parity check of `checkpoint` on an export's model.onnx while that is
    still in its temporary directory; raises ParityError on failure."""
    def verify(model_path: Path) -> None:
        results = parity_check(build_model(checkpoint), model_path, parity_batch(checkpoint))
        for result in results:
            report(f"parity vs PyTorch fake-quant: {result.line()}")
        failed = [r for r in results if not r.ok]
        if failed:
            raise ParityError(f"parity check: {failed[0].backend} departs from PyTorch by a median "
                              f"{failed[0].median_error_steps:.3g} output steps (at most {EXACT_MEDIAN_STEPS:g} "
                              "allowed); the export was not written")
    return verify
