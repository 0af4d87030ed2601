"""The backends a validation run compares: the fine-tuned fp32 model, PyTorch master weights and fake-quant, the
ONNX spec, ORT per provider/profile."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qbert_deploy.checkpoint import Checkpoint
from qbert_deploy.runtimes.session import open_session
from qbert_deploy.tasks import DEFAULT_TASK, FEATURE, combine, served_outputs, task_kind
from qbert_deploy.validation.profiles import CANONICAL, profile_model

Batch = dict[str, np.ndarray]
Runner = Callable[[Batch], np.ndarray]
FP32 = "pytorch-fp32"  # the fine-tuned fp32 model qbert-quantize started from (OUT/fp32, or --fp32)
MASTER = "pytorch-master-weights"  # model.pt's float master weights after QAT: not the fp32 model
FAKEQUANT = "pytorch-fakequant"
SPEC = "ort-spec"
REFERENCES = (FP32, MASTER)  # float models: what quantization is measured against, never gated as quantized


@dataclass(frozen=True)
class BackendSpec:
    """One way of running the model. ORT backends name the provider, the profile and the optimization level."""

    name: str
    kind: str  # "pytorch" or "onnxruntime"
    quantized: bool = True
    provider: str = "cpu"
    profile: str = CANONICAL
    optimize: bool = True
    source: Path | None = None  # the fine-tuned fp32 model's Hugging Face folder (FP32 only)

    @property
    def is_onnx(self) -> bool:
        return self.kind == "onnxruntime"

    def describe(self) -> str:
        if self.source is not None:
            return f"PyTorch, the fine-tuned fp32 model ({self.source})"
        if not self.is_onnx:
            return "PyTorch, fake-quant" if self.quantized else "PyTorch, model.pt's float master weights"
        level = "optimizations on" if self.optimize else "optimizations off (the ONNX spec)"
        return f"ONNX Runtime {self.provider}, {self.profile}, {level}"


def backend_specs(providers: Sequence[str], profiles: Sequence[str] | Mapping[str, Sequence[str]],
                  fp32: Path | None = None) -> list[BackendSpec]:
    """The PyTorch references (the fp32 model when `fp32` names its folder), the ONNX spec, then every provider x
    profile optimized (`profiles` may give each provider its own list)."""
    specs = [BackendSpec(FP32, "pytorch", quantized=False, source=fp32)] if fp32 is not None else []
    specs += [BackendSpec(MASTER, "pytorch", quantized=False), BackendSpec(FAKEQUANT, "pytorch"),
              BackendSpec(SPEC, "onnxruntime", profile=CANONICAL, optimize=False)]
    for provider in providers:
        for profile in profiles[provider] if isinstance(profiles, Mapping) else profiles:
            specs.append(BackendSpec(f"ort-{provider}-{profile}", "onnxruntime", provider=provider, profile=profile))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("a provider or profile is named twice")
    return specs


@dataclass
class BackendRun:
    spec: BackendSpec
    logits: np.ndarray
    batch_seconds: list[float]
    model_path: Path | None

    @property
    def median_batch_ms(self) -> float:
        return 1000.0 * float(np.median(self.batch_seconds)) if self.batch_seconds else 0.0

    @property
    def examples_per_second(self) -> float:
        total = sum(self.batch_seconds)
        return len(self.logits) / total if total > 0 else 0.0


def torch_runner(model: torch.nn.Module, task: str = DEFAULT_TASK) -> Runner:
    names = served_outputs(task)  # an embedding model is compared on its sentence embedding

    @torch.no_grad()
    def run(batch: Batch) -> np.ndarray:
        out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
        return combine(task, [out[n].float().numpy() for n in names])
    return run


def onnx_model_path(spec: BackendSpec, export_dir: Path, workdir: Path) -> Path:
    return profile_model(export_dir, spec.profile, workdir)


def ort_runner(model: Path | bytes, spec: BackendSpec, threads: int | None, task: str = DEFAULT_TASK) -> Runner:
    session = open_session(model, providers=(spec.provider,), threads=threads, optimize=spec.optimize)
    names = list(served_outputs(task))

    def run(batch: Batch) -> np.ndarray:
        return combine(task, session.run(names, batch))
    return run


def make_runner(spec: BackendSpec, checkpoint: Checkpoint, export_dir: Path, workdir: Path,
                threads: int | None) -> tuple[Runner, Path | None]:
    if spec.source is not None:
        return torch_runner(load_fp32(spec.source, checkpoint.task), checkpoint.task), None
    if not spec.is_onnx:
        from qbert_deploy.models.build import build_model

        return torch_runner(build_model(checkpoint, quantized=spec.quantized), checkpoint.task), None
    path = onnx_model_path(spec, export_dir, workdir)
    return ort_runner(path, spec, threads, checkpoint.task), path


def load_fp32(folder: Path, task: str) -> torch.nn.Module:
    """The fine-tuned fp32 model from its Hugging Face folder, with the task's head (eager attention, as trained);
    an embedding model's encoder with the pooling its config records (qbert-quantize writes it)."""
    import transformers
    from transformers.utils import logging as hf_logging

    auto = getattr(transformers, task_kind(task).auto_class)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load would interleave with the run's own lines
    try:
        model: torch.nn.Module = auto.from_pretrained(str(folder), attn_implementation="eager")
        if task == FEATURE:
            from qbert_deploy.models.embedding import EmbeddingModel
            from qbert_deploy.tasks.embeddings import pooling_of_model

            config = model.config.to_dict()  # type: ignore[union-attr, operator]
            model = EmbeddingModel(model, pooling_of_model(config))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{folder}: cannot load the fp32 model ({first[:200]})") from None
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return model.eval()


def run_backend(spec: BackendSpec, runner: Runner, batches: Sequence[Batch], model_path: Path | None) -> BackendRun:
    """Logits over all batches, timing each batch after one untimed warm-up call."""
    if batches:
        runner(batches[0])
    logits, seconds = [], []
    for batch in batches:
        start = time.perf_counter()
        logits.append(runner(batch))
        seconds.append(time.perf_counter() - start)
    return BackendRun(spec, np.concatenate(logits) if logits else np.zeros((0, 0), np.float32), seconds, model_path)
