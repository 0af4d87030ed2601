"""RSS of N sessions of one file in one process, with the weights inside the file or as external data.

    python -m benchmarks.memory_sessions --models bert-base,minilm --sessions 1,4

Each (file, storage, N) runs in a fresh process (`python -m benchmarks.memory_sessions --child ...`): open N sessions,
run batch 1 then batch 8 on each, report the peak RSS (VmHWM) and the proportional set size (Pss, which splits
shared file pages among the processes mapping them) minus the same process's figures after its imports.
External data is memory-mapped by ORT on the CPU: pages that no kernel copies stay shared with the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.run import ROOT


def _status(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _pss() -> float:
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(path: str, sessions: int, threads: int) -> dict[str, float]:
    import onnxruntime  # noqa: F401  (counted in the baseline)

    from benchmarks.memory import _feed
    from qbert_deploy.runtimes.session import open_session

    base_hwm, base_rss, base_pss = _status("VmHWM"), _status("VmRSS"), _pss()
    opened = [open_session(path, threads=threads) for _ in range(sessions)]
    for batch in (1, 8):
        for session in opened:
            session.run(["logits"], _feed(batch))
    return {"peak_mib": _status("VmHWM") - base_hwm, "rss_mib": _status("VmRSS") - base_rss,
            "pss_mib": _pss() - base_pss}


def external_copy(path: Path) -> Path:
    """The same model with every initializer in `model.data` beside it (ORT memory-maps it on the CPU)."""
    import onnx_ir as ir

    out = path.with_name(path.stem + ".external.onnx")
    if not out.is_file():
        model = ir.load(path)
        ir.save(model, out, external_data=out.with_suffix(".data").name, size_threshold_bytes=1024)
    return out


def measure(names: Sequence[str], counts: Sequence[int], rounds: int, threads: int, cache: Path) -> dict[str, object]:
    from benchmarks.memory_compare import configs_for

    results: dict[str, object] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                  "load_before": os.getloadavg(), "rounds": rounds, "models": {}}
    for name in names:
        rows = {}
        for label, path in configs_for(name, cache).items():
            for storage, target in (("inside the file", path), ("external data", external_copy(path))):
                for n in counts:
                    samples = []
                    for _ in range(rounds):
                        done = subprocess.run([sys.executable, "-m", "benchmarks.memory_sessions", "--child",
                                               str(target), str(n), str(threads)], capture_output=True, text=True,
                                              cwd=ROOT, timeout=900, check=True)
                        samples.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    rows[f"{label} | {storage} | {n}"] = {
                        key: float(np.median([s[key] for s in samples])) for key in samples[0]}
                    print(name, label, storage, n, rows[f"{label} | {storage} | {n}"], flush=True)
        results["models"][name] = rows  # type: ignore[index]
    results["load_after"] = os.getloadavg()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--child"]:
        print(json.dumps(child(args_in[1], int(args_in[2]), int(args_in[3]))))
        return 0
    parser = argparse.ArgumentParser(prog="benchmarks.memory_sessions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert-base,minilm")
    parser.add_argument("--sessions", default="1,4")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(args_in)
    results = measure(args.models.split(","), [int(n) for n in args.sessions.split(",")], args.rounds,
                      args.threads, args.cache)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("| model | file | weights | sessions | peak RSS increment MiB | RSS MiB | PSS MiB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, rows in results["models"].items():  # type: ignore[attr-defined]
        for key, row in rows.items():
            print(f"| {name} | {key} | {row['peak_mib']:.0f} | {row['rss_mib']:.0f} | {row['pss_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
