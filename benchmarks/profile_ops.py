"""Where the time goes: ORT's own profiler, kernel time summed per op type, ours against ORT's int8 files.

    python -m benchmarks.profile_ops --models bert-base,minilm --batches 1,8 --out docs/results/profile.md

Each file gets one session with `enable_profiling` (2 intra-op threads, spinning off), a warm-up run and `--runs`
profiled runs at sequence 128; the JSON trace's `*_kernel_time` events are summed per op type (control-flow nodes
left out: their branches' nodes are in the trace themselves). Each round profiles every configuration once, in a rotated
order; per op type the median round is reported. The shares are what to read, since the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.baselines import dynamic_int8, fused_fp32
from benchmarks.models import SEQUENCE, prepare
from benchmarks.run import ANCHORS, OURS_CPU, ROOT

GEMMS = frozenset({"MatMulIntegerToFloat", "MatMulInteger", "MatMul", "Gemm", "FusedMatMul", "MatMulNBits",
                   "QGemm", "DynamicQuantizeMatMul", "QLinearMatMul"})


def _feed(batch: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(batch).integers(1000, 30000, size=(batch, SEQUENCE)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def per_op_type(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int) -> dict[str, float]:
    """Milliseconds per run spent in each op type's kernels."""
    import onnxruntime as ort

    from qbert_deploy.runtimes.session import session_options

    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / f"ort-profile-{os.getpid()}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        session.run(["logits"], feed)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")
    timed = windows[1:]  # the first run is the warm-up (prepacking, first allocations)
    totals: Counter[str] = Counter()
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        op = event["args"]["op_name"]
        if op in ("If", "Loop", "Scan"):
            continue
        if any(begin <= event["ts"] <= end for begin, end in timed):
            totals[op] += event["dur"]
    return {op: us / 1000 / max(len(timed), 1) for op, us in totals.most_common()}


def anchor_files(model: Any) -> dict[str, Path]:
    """ORT dynamic int8 of the fp32 model and of its fused graph, and ours cpu-w8a8, beside a prepared model."""
    from qbert_deploy.runtimes.lowering import lower

    folder = model.fp32_onnx.parent
    config: Any = model.torch_model.config
    fused = fused_fp32(model.fp32_onnx, folder / "fp32-fused.onnx", int(config.num_attention_heads),
                       int(config.hidden_size))
    return {ANCHORS[0]: dynamic_int8(model.fp32_onnx, folder / "dynamic-int8.onnx"),
            ANCHORS[1]: dynamic_int8(fused, folder / "dynamic-int8-fused.onnx"),
            OURS_CPU: lower(model.export_onnx, "cpu-w8a8", folder / "model.cpu-w8a8.onnx")}


def files(name: str, cache: Path) -> dict[str, Path]:
    return anchor_files(prepare(name, cache))


def measure(names: Sequence[str], batches: Sequence[int], threads: int, runs: int, rounds: int, cache: Path,
            ) -> dict[str, object]:
    """Each round profiles every configuration once (order rotated per round); per op type, the median round."""
    results: dict[str, object] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                  "load_before": os.getloadavg(), "threads": threads, "runs": runs,
                                  "rounds": rounds, "models": {}}
    for name in names:
        paths = files(name, cache)
        labels = list(paths)
        per_batch: dict[str, dict[str, dict[str, float]]] = {}
        for batch in batches:
            samples: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
            for r in range(rounds):
                for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                    print(f"[{name}] batch {batch}, round {r + 1}/{rounds}: {label}", flush=True)
                    samples[label].append(per_op_type(paths[label], _feed(batch), threads, runs))
            per_batch[str(batch)] = {}
            for label in labels:
                ops = {op for sample in samples[label] for op in sample}
                median = {op: float(np.median([sample.get(op, 0.0) for sample in samples[label]])) for op in ops}
                per_batch[str(batch)][label] = dict(sorted(median.items(), key=lambda item: -item[1]))
        results["models"][name] = per_batch  # type: ignore[index]
    results["load_after"] = os.getloadavg()
    return results


def report(results: dict[str, object], command: str, top: int = 10) -> list[str]:
    load = (f"load average {results['load_before'][0]:.2f} before, "  # type: ignore[index]
            f"{results['load_after'][0]:.2f} after")  # type: ignore[index]
    lines = ["# Where the CPU time goes (issue 24, item 1)", "", "```bash", command, "```", "",
             f"{results['started']}, ORT's profiler, {results['threads']} intra-op threads, sequence {SEQUENCE}, "
             f"kernel time per run averaged over {results['runs']} runs after a warm-up, median of "
             f"{results['rounds']} interleaved rounds per op type; {load}. Kernel time is "
             "the sum of the nodes' times (not the wall time of a run).", ""]
    summary = ["| model | batch | configuration | kernel ms / run | GEMM ms | non-GEMM ms | non-GEMM share |",
               "|---|---:|---|---:|---:|---:|---:|"]
    detail: list[str] = []
    for name, per_batch in results["models"].items():  # type: ignore[attr-defined]
        for batch, per_label in per_batch.items():
            for label, ops in per_label.items():
                whole = sum(ops.values())
                gemm = sum(ms for op, ms in ops.items() if op in GEMMS)
                summary.append(f"| {name} | {batch} | {label} | {whole:.1f} | {gemm:.1f} | {whole - gemm:.1f} | "
                               f"{(whole - gemm) / whole:.0%} |")
                cells = ", ".join(f"{op} {ms:.2f} ({ms / whole:.0%})" for op, ms in list(ops.items())[:top])
                detail.append(f"| {name} | {batch} | {label} | {cells} |")
    lines += [*summary, "", f"Per op type (ms per run and share of kernel time, the {top} largest):", "",
                        "| model | batch | configuration | op types |", "|---|---:|---|---|", *detail]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.profile_ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert-base,minilm")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="profiled runs per session (after a warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median round per op type")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here (JSON beside it)")
    args = parser.parse_args(argv)
    results = measure(args.models.split(","), [int(b) for b in args.batches.split(",")], args.threads, args.runs,
                      args.rounds, args.cache)
    command = "python -m benchmarks.profile_ops " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = report(json.loads(json.dumps(results)), command.strip())
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
