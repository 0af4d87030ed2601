"""The whole qbert-quantize workflow as one call: fp32 fine-tune, Hessian, allocation, QAT/PTQ, model.pt.

State lives in the output folder (fp32/, sensitivity.json, qat-state.pt), so a killed run goes on from there.
Distributed (see `distributed`), every rank runs every step and only rank 0 writes; the others wait at a barrier.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qbert_deploy.atomic import atomic_file, write_text_atomic
from qbert_deploy.checkpoint import Checkpoint, fp32_digest, save_checkpoint
from qbert_deploy.families import family
from qbert_deploy.metrics import single_class_warning
from qbert_deploy.models import distributed
from qbert_deploy.models.build import make_checkpoint, tokenizer_files
from qbert_deploy.models.cache_keys import differences
from qbert_deploy.models.distill import DistillWeights
from qbert_deploy.models.hessian import sensitivity
from qbert_deploy.models.layers import drop_layers
from qbert_deploy.models.methods import Method
from qbert_deploy.models.sensitivity_io import load_sensitivity, save_sensitivity
from qbert_deploy.models.size import paper_size
from qbert_deploy.models.task import Task, fp32_model, fp32_reference, load_teacher
from qbert_deploy.models.train import predict_logits
from qbert_deploy.models.workflow import Settings, apply_method, mixed_recipe
from qbert_deploy.recipe import Recipe
from qbert_deploy.tasks import SEQUENCE

log = logging.getLogger("qbert_deploy.quantize")


@dataclass
class Job:
    """Everything a run needs besides the task and the method."""

    model_dir: Path
    out: Path
    finetune_steps: int = 300
    lr: float = 1e-4
    qat_steps: int = 200
    qat_lr: float = 5e-5
    quant_noise: float = 0.0
    hessian_subsets: int = 2  # qbert-quantize's defaults (docs/results/hessian_stability.md)
    hessian_batch: int = 16
    hessian_iters: int = 6
    budget_mb: float | None = None
    calibration_batches: int = 8
    save_every: int = 50
    seed: int = 0
    fp32_cache: Path | None = None
    distill: DistillWeights | None = None  # None: the paper's plain QAT
    learn_ranges: str | None = None  # "minmax" / "mse": LSQ+ ranges from that start; None: min/max every step
    teacher: Path | None = None  # default: the fine-tuned fp32 model
    kept_layers: tuple[int, ...] | None = None  # --keep-layers: the fp32 layers the student starts from
    layer_map: tuple[int, ...] | None = None  # the teacher layer each student layer is distilled against


def _allocate(job: Job, task: Task, fp32: torch.nn.Module, fp32_sha256: str, method: Method,
              recipe: Recipe) -> Recipe:
    assert method.mixed is not None
    key = {"fp32 model": fp32_sha256, "hessian subsets": job.hessian_subsets, "hessian batch": job.hessian_batch,
           "hessian iters": job.hessian_iters, "seed": job.seed} | task.cache_key()
    if job.kept_layers is not None:  # the Hessian is the student's: another student is another sensitivity
        key["kept layers"] = list(job.kept_layers)
    path = job.out / "sensitivity.json"
    sens = None
    if distributed.is_main() and path.exists():
        saved = json.loads(path.read_text()).get("settings")
        if saved == key:
            sens = load_sensitivity(path)
            log.info("sensitivity: reusing %s: same fp32 model, training data and Hessian settings", path)
        else:
            log.info("sensitivity: %s was computed differently (%s); computing it again", path,
                     differences(saved, key))
    sens = distributed.broadcast(sens)  # rank 0 read the file; computing it again takes every rank
    if sens is None:
        sens = sensitivity(fp32, task.input_batches(job.hessian_subsets, job.seed + 1, job.hessian_batch),
                           iters=job.hessian_iters, tol=1e-2)
    choices, average = method.mixed
    recipe = mixed_recipe(fp32, recipe, sens, choices, average_bits=average or None,
                          budget_mb=job.budget_mb if not average else None)
    last_linear = family(getattr(fp32.config, "model_type", None)).linears[-1]
    bits = [recipe.for_module(f"{layer}.{last_linear}").bits for layer in sens.layers]
    if distributed.is_main():
        save_sensitivity(sens, path, job.out / "sensitivity.png", bits)
        data = json.loads(path.read_text())
        data["settings"] = key
        write_text_atomic(path, json.dumps(data, indent=1) + "\n")
    log.info("bits per encoder layer: %s", bits)
    return recipe


def run_job(job: Job, task: Task, method: Method, recipe: Recipe, qat_task: Task | None = None) -> Checkpoint:
    """Run the workflow and write OUT/model.pt (atomically, on rank 0); returns the checkpoint made. `qat_task`:
    the task whose training batches QAT takes (`task` with --augment's variants); fp32 and the Hessian use `task`."""
    training = qat_task or task
    world = distributed.world_size()
    distributed.check_global_batch("--batch-size", task.batch_size, world)
    if distributed.is_main():
        job.out.mkdir(parents=True, exist_ok=True)
    log.info("world size %d, global batch %d (%d per process), device %s", world, task.batch_size,
             task.batch_size // world, distributed.device())
    torch.manual_seed(job.seed)  # the same on every rank: the same initial head, the same Quant-Noise masks
    fp32_dir = job.fp32_cache or job.out / "fp32"
    fp32, fp32_acc = fp32_model(job.model_dir, task, job.finetune_steps, job.lr, fp32_dir, job.seed)
    fp32_sha256 = fp32_digest(fp32_dir) if distributed.is_main() else ""  # only rank 0 reads or writes caches
    metric = f"dev_{task.metric}"
    metrics = {f"{metric}_fp32": fp32_acc, "world_size": world, "global_batch": task.batch_size}
    # The student: the fp32 model itself, or (--keep-layers) a copy with only the kept layers, whose teacher is
    # then the whole fp32 model. Bits are allocated on the student's own layers.
    student = fp32 if job.kept_layers is None else drop_layers(copy.deepcopy(fp32), job.kept_layers)
    if job.kept_layers is not None:
        count = len(job.kept_layers)
        log.info("student: %d layer%s, from fp32 layers %s, distilled against teacher layers %s", count,
                 "" if count == 1 else "s", list(job.kept_layers), list(job.layer_map or job.kept_layers))
    if method.mixed is not None:
        recipe = _allocate(job, task, student, fp32_sha256, method, recipe)
    state_path = job.out / "qat-state.pt"
    run = {"recipe": recipe.dumps(), "method": method.id, "qat steps": job.qat_steps, "qat lr": job.qat_lr,
           "seed": job.seed, "quant noise": job.quant_noise, "calibration batches": job.calibration_batches,
           "fp32 model": fp32_sha256, "distill": repr(job.distill), "learn ranges": job.learn_ranges,
           "kept layers": job.kept_layers, "layer map": job.layer_map,
           "teacher": fp32_digest(job.teacher) if job.teacher and distributed.is_main() else None} \
        | training.cache_key()
    run_key = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()
    resume = None
    if distributed.is_main() and state_path.exists():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file is just not a state to resume from
            state = None
        if isinstance(state, dict) and state.get("key") == run_key:
            resume = state
            log.info("resuming QAT from step %d (%s): same fp32 model, data and settings", state["step"], state_path)
        else:
            log.info("%s belongs to another run (%s); starting QAT afresh", state_path,
                     differences(state.get("run") if isinstance(state, dict) else None, run))
    resume = distributed.broadcast(resume)  # rank 0's state (and step) on every rank, every machine

    def save(state: dict[str, Any]) -> None:  # train() calls it on rank 0 only
        with atomic_file(state_path) as tmp:
            torch.save({**state, "key": run_key, "run": run}, tmp)

    settings = Settings(qat_steps=job.qat_steps, lr=job.qat_lr, quant_noise=job.quant_noise,
                        calibration_batches=job.calibration_batches, seed=job.seed, resume=resume, save=save,
                        save_every=job.save_every, distill=job.distill if method.qat else None,
                        learn_ranges=job.learn_ranges if method.qat else None,
                        teacher=load_teacher(job.teacher, task) if job.teacher and job.distill else
                        None if student is fp32 else fp32, layer_map=job.layer_map or job.kept_layers)
    if settings.distill is not None:
        log.info("QAT distils from the %s: %s", job.teacher or "fp32 model", settings.distill)
    # QAT's random draws (dropout, Quant-Noise) start from the seed, whether fp32/ and the sensitivity were made by
    # this process or reused: a rerun after a kill then trains as an uninterrupted run does.
    torch.manual_seed(job.seed)
    model = apply_method(student, training, method, recipe, settings)
    dev = task.dev_batches()
    logits, labels = predict_logits(model, dev, "dev quantized")
    fp32_logits, _ = predict_logits(fp32, dev, "dev fp32")
    acc = task.score(logits, labels)
    if task.kind == SEQUENCE and distributed.is_main():
        for who, values in (("the fp32 model", fp32_logits), ("the quantized model", logits)):
            warning = single_class_warning(values.argmax(-1), labels, task.labels, f"on the dev data, {who}")
            if warning:
                log.warning("warning: %s", warning)
    model.cpu()
    agreement = task.agreement(logits, fp32_logits)
    size = paper_size(model, recipe)
    metrics.update({f"{metric}_quantized": acc, "dev_agreement_fp32": agreement, "size_mb": size["size_mb"],
                    "compression": size["compression"], "qat_steps": job.qat_steps if method.qat else 0,
                    "finetune_steps": job.finetune_steps})
    with tempfile.TemporaryDirectory() as tmp:
        texts = tokenizer_files(task.tokenizer, Path(tmp))
    # qbert-validate compares against the fine-tuned model itself, at the length it was trained at
    reference = fp32_reference(fp32_dir, job.out / "model.pt", fp32_sha256) if distributed.is_main() else None
    checkpoint = make_checkpoint(model, recipe, task.labels, texts, metrics, task=task.kind,
                                 max_length=task.max_length, fp32_reference=reference, text_pairs=task.text_pairs)
    if distributed.is_main():
        save_checkpoint(checkpoint, job.out / "model.pt")
        state_path.unlink(missing_ok=True)
    distributed.barrier()  # no rank reports done before model.pt is there
    log.info("wrote %s: dev %s %.4f (fp32 %.4f), %s %.4f, %.2f MB the paper's way, "
             "%.2fx smaller than fp32", job.out / "model.pt", task.metric, acc, fp32_acc, task.agreement_name,
             agreement, size["size_mb"], size["compression"])
    return checkpoint
