"""First parity check: PyTorch fake-quant vs ORT with optimizations off vs onnx.reference, on the same inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

from qbert_deploy.families import TEXT_INPUTS
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


@torch.no_grad()
def torch_logits(model: nn.Module, batch: Batch) -> np.ndarray:
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    return model(**inputs).logits.float().numpy()


def compare(reference: np.ndarray, other: np.ndarray, backend: str, step: float) -> ParityResult:
    error = float(np.abs(reference - other).max()) if reference.size else 0.0
    agree = float((reference.argmax(-1) == other.argmax(-1)).mean()) if reference.size else 1.0
    return ParityResult(backend, error, step, agree)


def parity_check(model: nn.Module, onnx_path: Path, batch: Batch) -> list[ParityResult]:
    """Logits of the fake-quant PyTorch model against ORT (optimizations off) and onnx.reference."""
    expected = torch_logits(model, batch)
    step = output_step(expected)
    session = open_session(onnx_path, optimize=False)
    ort_logits = session.run(["logits"], batch)[0]
    ref_logits = next(iter(ReferenceEvaluator(str(onnx_path)).run(["logits"], dict(batch))))
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
