"""First parity check: PyTorch fake-quant vs ORT with optimizations off vs onnx.reference, on the same inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

from qbert_deploy.checkpoint import Checkpoint
from qbert_deploy.families import TEXT_INPUTS, family_of
from qbert_deploy.runtimes.session import open_session

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class ParityResult:
    backend: str
    max_abs_error: float
    output_step: float
    argmax_agreement: float

    @property
    def max_error_steps(self) -> float:
        return self.max_abs_error / self.output_step

    def line(self) -> str:
        return (f"{self.backend:<22} max |logit error| {self.max_abs_error:.3g} = {self.max_error_steps:.2f} "
                f"output steps; argmax agreement {100 * self.argmax_agreement:.1f}%")


def output_step(logits: np.ndarray, bits: int = 8) -> float:
    """Step of an 8-bit quantizer over the reference logits' range: the unit tolerances are given in."""
    span = float(logits.max() - min(logits.min(), 0.0)) if logits.size else 0.0
    return max(span, 1e-12) / (2**bits - 1)


def _joined(outputs: list[np.ndarray]) -> np.ndarray:
    """One array of a model's outputs (QA's start and end logits stacked on a last axis)."""
    return outputs[0] if len(outputs) == 1 else np.stack(outputs, axis=-1)


@torch.no_grad()
def torch_logits(model: nn.Module, batch: Batch, names: tuple[str, ...] = ("logits",)) -> np.ndarray:
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    out = model(**inputs)
    return _joined([out[name].float().numpy() for name in names])


def compare(reference: np.ndarray, other: np.ndarray, backend: str, step: float) -> ParityResult:
    error = float(np.abs(reference - other).max()) if reference.size else 0.0
    agree = float((reference.argmax(-1) == other.argmax(-1)).mean()) if reference.size else 1.0
    return ParityResult(backend, error, step, agree)


def parity_check(model: nn.Module, onnx_path: Path, batch: Batch) -> list[ParityResult]:
    """Logits of the fake-quant PyTorch model against ORT (optimizations off) and onnx.reference."""
    session = open_session(onnx_path, optimize=False)
    names = [o.name for o in session.get_outputs()]  # logits, or QA's start_logits and end_logits
    expected = torch_logits(model, batch, tuple(names))
    step = output_step(expected)
    ort_logits = _joined(session.run(names, batch))
    ref_logits = _joined([np.asarray(x) for x in ReferenceEvaluator(str(onnx_path)).run(names, dict(batch))])
    if expected.ndim == 3:  # per-token outputs: compare the real tokens only, padding's outputs mean nothing
        real = batch["attention_mask"].astype(bool)
        expected, ort_logits, ref_logits = expected[real], ort_logits[real], ref_logits[real]
        step = output_step(expected)
    return [compare(expected, np.asarray(ort_logits), "onnxruntime (no opt)", step),
            compare(expected, np.asarray(ref_logits), "onnx.reference", step)]


def random_batch(vocab_size: int, batch: int = 4, sequence: int = 16, seed: int = 0,
                 inputs: Sequence[str] = TEXT_INPUTS) -> Batch:
    """Token ids with ragged attention masks, for models without a tokenizer at hand (the family's `inputs`)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, size=(batch, sequence), dtype=np.int64)
    lengths = rng.integers(sequence // 2, sequence + 1, size=batch)
    mask = (np.arange(sequence)[None, :] < lengths[:, None]).astype(np.int64)
    full = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {name: full[name] for name in inputs}


class ParityFailure(ValueError):
    """PyTorch and ONNX disagree on an export: it is not committed (qbert-export exits 1, like a failed --check)."""


def export_verifier(checkpoint: Checkpoint, echo: Callable[[str], None] | None = None) -> Callable[[Path], None]:
    """The parity check `export_checkpoint(verify=...)` runs on model.onnx while it is still in its temporary
    directory: PyTorch fake-quant against the file on random tokens; a differing argmax stops the export."""
    def verify(model_path: Path) -> None:
        from qbert_deploy.models.build import build_model

        batch = random_batch(int(checkpoint.config["vocab_size"]), inputs=family_of(checkpoint.config).inputs)
        results = parity_check(build_model(checkpoint), model_path, batch)
        for line in results:
            if echo is not None:
                echo(f"parity vs PyTorch fake-quant: {line.line()}")
        if any(r.argmax_agreement < 1.0 for r in results):
            raise ParityFailure("parity check: argmax differs between PyTorch and ONNX; the export was not written")
    return verify
