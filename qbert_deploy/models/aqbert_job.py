"""`qbert-quantize --method aqbert`: fp32 fine-tune, AQ-BERT search, physical pruning, QAT, model.pt and a plot."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from qbert_deploy.atomic import atomic_file
from qbert_deploy.checkpoint import save_checkpoint
from qbert_deploy.data.batches import batches
from qbert_deploy.models.aqbert import (
    CostModel,
    SearchSettings,
    Target,
    describe,
    finalize,
    plot_choices,
    ramp_steps,
    search,
)
from qbert_deploy.models.build import make_checkpoint, tokenizer_files
from qbert_deploy.models.layers import drop_layers
from qbert_deploy.models.size import paper_size
from qbert_deploy.models.task import Task, fp32_model, fp32_reference, load_teacher
from qbert_deploy.models.train import accuracy

log = logging.getLogger("qbert_deploy.quantize")
HELD_OUT = 0.2  # of the training examples: the architecture's batches (never the dev split)


def target_of(args: argparse.Namespace) -> Target:
    return Target(budget_mb=args.budget_mb, keep_macs=args.keep_macs)


def check_aqbert_args(args: argparse.Namespace) -> None:
    """Refuse what cannot work before anything is trained or written."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    for flag in ("preset", "recipe", "bits", "avg_bits", "bits_from"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to --method aqbert (it searches the bits)")
    target = target_of(args)
    config = AutoConfig.from_pretrained(args.model_dir)
    if config.model_type != "bert":
        raise ValueError(f"{args.model_dir}: model_type {config.model_type!r} is not supported; only 'bert'")
    config.num_labels = len(args.labels.split(",")) if args.labels else 2
    if args.kept_layers is not None:
        config.num_hidden_layers = len(args.kept_layers)
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(config)
    CostModel.of(skeleton, SearchSettings.ffn_block, SearchSettings.column_bits, 8).check(target)


def _settings_json(settings: SearchSettings) -> dict[str, Any]:
    """The search settings for aqbert.json (the teacher is a model, not a setting)."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "teacher"}
    values["distill"] = dataclasses.asdict(settings.distill) if settings.distill is not None else None
    return values


def run_aqbert(args: argparse.Namespace, task: Task, out: Path, qat_task: Task | None = None) -> None:
    """The run; `qat_task` is `task` with --augment's variants, for the distillation after the search only."""
    qat_task = qat_task or task
    target = target_of(args)
    fp32_dir = Path(args.fp32_cache) if args.fp32_cache else out / "fp32"
    fp32, fp32_acc = fp32_model(args.model_dir, task, args.finetune_steps, args.lr, fp32_dir, args.seed)
    distill = getattr(args, "distill_weights", None)
    teacher = load_teacher(Path(args.teacher), task) if distill is not None and args.teacher else None
    # --keep-layers: the search and its QAT run on a copy with only the kept layers, distilled from all of fp32
    student = fp32 if args.kept_layers is None else drop_layers(copy.deepcopy(fp32), args.kept_layers)
    if student is not fp32:
        teacher = teacher or fp32
        count = len(args.kept_layers)
        log.info("AQ-BERT: student of %d layer%s from fp32 layers %s, %s", count, "" if count == 1 else "s",
                 list(args.kept_layers), f"distilled against teacher layers {list(args.layer_map)}"
                 if distill is not None else "trained on the task loss alone (--distill none)")
    settings = SearchSettings(steps=args.search_steps, qat_steps=args.qat_steps, weight_lr=args.qat_lr,
                              qat_lr=args.qat_lr, calibration_batches=args.calibration_batches, seed=args.seed,
                              distill=distill, teacher=teacher, layer_map=args.layer_map)
    log.info("AQ-BERT: %s", f"distils from the {args.teacher or 'fp32 model'}: {distill}" if distill is not None
             else "plain task loss (--distill none)")
    split = max(1, int(len(task.train) * HELD_OUT))
    held_out = list(batches(task.tokenizer, task.train[-split:], task.batch_size, task.max_length, shuffle_seed=1))
    training = list(batches(task.tokenizer, task.train[:-split] or task.train, task.batch_size, task.max_length,
                            shuffle_seed=2))
    calibration = [{k: v for k, v in b.items() if k != "labels"}
                   for b in task.input_batches(settings.calibration_batches, settings.seed)]
    budget = {"search_steps": settings.steps, "ramp_steps": ramp_steps(settings.steps), "qat_epochs": args.qat_epochs,
              "qat_steps": settings.qat_steps, "steps_per_epoch": qat_task.steps_per_epoch(),
              "augment": args.augment, "augment_probability": args.augment_probability if args.augment else None,
              "distillation_examples": len(qat_task.train) + len(qat_task.distill_only)}
    log.info("AQ-BERT budget: %d search steps (the target reaches its final value at step %d), then %.3g epochs of "
             "distillation = %d steps of %d examples", budget["search_steps"], budget["ramp_steps"],
             budget["qat_epochs"], budget["qat_steps"], budget["distillation_examples"])
    result, searched = search(student, training, held_out, calibration, target, settings)
    log.info("AQ-BERT: %s", describe(result))
    plot_choices(result, out / "aqbert_choice.png")
    model = finalize(student, searched, result, calibration, qat_task.train_batches, settings)
    acc = accuracy(model, task.dev_batches(), "dev AQ-BERT")
    size = paper_size(model, result.recipe)
    metrics = {"dev_accuracy_fp32": fp32_acc, "dev_accuracy_quantized": acc, "size_mb": result.size_mb,
               "compression": size["compression"], "macs_kept": result.macs_kept}
    with tempfile.TemporaryDirectory() as tmp:
        texts = tokenizer_files(task.tokenizer, Path(tmp))
    checkpoint = make_checkpoint(model, result.recipe, task.labels, texts, metrics, max_length=task.max_length,
                                 fp32_reference=fp32_reference(fp32_dir, out / "model.pt"), text_pairs=task.text_pairs)
    save_checkpoint(checkpoint, out / "model.pt")
    summary: dict[str, Any] = {"target": dataclasses.asdict(target), "metrics": metrics,
                               "settings": _settings_json(settings), "budget": budget,
                               "expected_at_end": {"size_mb": result.expected[0], "macs_kept": result.expected[1]},
                               "kept_layers": list(args.kept_layers) if args.kept_layers is not None else None,
                               "confidence": list(result.confidence),
                               "head_bits": result.head_choices.tolist(), "block_bits": result.block_choices.tolist()}
    with atomic_file(out / "aqbert.json") as tmp_path:
        tmp_path.write_text(json.dumps(summary, indent=1) + "\n")
    log.info("wrote %s: dev accuracy %.4f (fp32 %.4f), %.2f MB the paper's way, %.1f%% of the GEMM work",
             out / "model.pt", acc, fp32_acc, result.size_mb, 100 * result.macs_kept)
