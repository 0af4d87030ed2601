"""Peak-RSS increments side by side, each configuration in fresh processes, rounds interleaved, medians.

    python -m benchmarks.memory_compare --models bert-base,minilm --rounds 3 --out docs/results/memory.json

Memory does not depend on the machine's load the way time does, so this runs apart from `benchmarks.run`'s timing.
Each round starts one `python -m benchmarks.memory` process per configuration (peak RSS after session start and a
batch-1 then a batch-8 run at sequence 128, minus the same process's peak after its imports), in a rotated order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.models import prepare
from benchmarks.run import ANCHORS, OURS_CPU, OURS_SMALL, ROOT, configs, peak_memory

PACKED = "ours cpu-w8a8 --pack-3bit"
LABELS = (*ANCHORS, OURS_CPU, PACKED, OURS_SMALL)


def configs_for(name: str, cache: Path) -> dict[str, Path]:
    """ORT dynamic int8, ours cpu-w8a8 and ours cpu-small files of a model (built in `cache` if missing)."""
    from benchmarks.baselines import dynamic_int8
    from qbert_deploy.runtimes.lowering import lower

    model = prepare(name, cache)
    folder = model.fp32_onnx.parent
    return {ANCHORS[0]: dynamic_int8(model.fp32_onnx, folder / "dynamic-int8.onnx"),
            OURS_CPU: lower(model.export_onnx, "cpu-w8a8", folder / "model.cpu-w8a8.onnx"),
            OURS_SMALL: lower(model.export_onnx, "cpu-small", folder / "model.cpu-small.onnx")}


def measure(names: Sequence[str], rounds: int, threads: int, cache: Path) -> dict[str, object]:
    results: dict[str, object] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                  "load_before": os.getloadavg(), "threads": threads, "rounds": rounds, "models": {}}
    for name in names:
        items = [c for c in configs(prepare(name, cache), cache) if c.label in LABELS]
        samples: dict[str, dict[int, list[float]]] = {c.label: {1: [], 8: []} for c in items}
        for r in range(rounds):
            for c in items[r % len(items):] + items[:r % len(items)]:
                print(f"[{name}] round {r + 1}/{rounds}: {c.label}", flush=True)
                for batch, mib in peak_memory(c, threads).items():
                    samples[c.label][batch].append(mib)
        results["models"][name] = {c.label: {"file_bytes": c.file_bytes, "peak_increment_mib": samples[c.label]}  # type: ignore[index]
                                   for c in items}
    results["load_after"] = os.getloadavg()
    return results


def table(results: dict[str, object]) -> list[str]:
    lines = ["| model | configuration | file MB | peak RSS increment, batch 1 / 8 (MiB, median) | vs ORT dynamic "
             "int8, batch 1 / 8 |", "|---|---|---:|---:|---:|"]
    for name, rows in results["models"].items():  # type: ignore[attr-defined]
        anchor = {b: float(np.median(rows[ANCHORS[0]]["peak_increment_mib"][b])) for b in ("1", "8")}
        for label, row in rows.items():
            median = {b: float(np.median(row["peak_increment_mib"][b])) for b in ("1", "8")}
            lines.append(f"| {name} | {label} | {row['file_bytes'] / 1e6:.1f} | {median['1']:.0f} / {median['8']:.0f} "
                         f"| {median['1'] / anchor['1']:.2f}x / {median['8'] / anchor['8']:.2f}x |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.memory_compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert-base,minilm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--out", type=Path, default=None, help="also write the samples as JSON here")
    args = parser.parse_args(argv)
    results = measure(args.models.split(","), args.rounds, args.threads, args.cache)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(table(json.loads(json.dumps(results)))))
    return 0


__all__ = ["main", "measure", "table"]

if __name__ == "__main__":
    sys.exit(main())
