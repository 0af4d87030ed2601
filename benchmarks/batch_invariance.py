"""cpu-w8a8 with one masked attention kernel (the profile) vs with the flash kernel's If: batch dependence and cost.

    python -m benchmarks.batch_invariance EXPORT_DIR [--requests 128] [--rounds 15] [--threads 2] [--json OUT]

Both graphs are lowered in memory from EXPORT_DIR/model.onnx. Batch dependence: random requests of 4..128 tokens,
each run alone (unpadded) and in padded batches of 8 mixed lengths; a row differs when any of its logits is not
bitwise equal. Latency: one process, interleaved rounds, medians, at batch 1 and 8 of 128 tokens without padding
and at batch 1 of 16 tokens (where the If takes the flash kernel), and at batch 8 of 4..128 and batch 4 of 4..32
tokens padded to the longest (both run masked).
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

Feed = dict[str, np.ndarray]
NAMES = ("cpu-w8a8 (masked kernel always)", "cpu-w8a8 + flash If (before)")


def padded(requests: Sequence[np.ndarray], length: int | None = None) -> Feed:
    longest = length or max(r.shape[1] for r in requests)
    feed = {n: np.zeros((len(requests), longest), np.int64) for n in ("input_ids", "attention_mask", "token_type_ids")}
    for row, ids in enumerate(requests):
        feed["input_ids"][row, :ids.shape[1]] = ids[0]
        feed["attention_mask"][row, :ids.shape[1]] = 1
    return feed


def requests(count: int, shortest: int = 4, longest: int = 128, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.integers(1000, 30000, size=(1, int(rng.integers(shortest, longest + 1)))).astype(np.int64)
        ids[0, 0], ids[0, -1] = 101, 102
        out.append(ids)
    return out


def lowered(canonical: Path, flash_branch: bool) -> bytes:
    import onnx_ir as ir

    from qbert_deploy.runtimes.attention_fusion import unmasked_attention_branch
    from qbert_deploy.runtimes.lowering import lower_model

    model = ir.load(canonical)
    lower_model(model, "cpu-w8a8", for_file=False)
    if flash_branch:
        unmasked_attention_branch(model)
    return ir.to_proto(model).SerializeToString()


def batch_dependence(session: object, reqs: Sequence[np.ndarray], batch: int = 8) -> dict[str, float]:
    run = session.run  # type: ignore[attr-defined]
    alone = [run(["logits"], padded([r]))[0][0] for r in reqs]
    differ, worst = 0, 0.0
    for start in range(0, len(reqs), batch):
        out = run(["logits"], padded(reqs[start:start + batch]))[0]
        for row, logits in enumerate(out):
            diff = float(np.abs(logits - alone[start + row]).max())
            differ += diff != 0.0 or not np.array_equal(logits, alone[start + row])
            worst = max(worst, diff)
    return {"rows": len(reqs), "rows_differing": differ, "max_abs_diff": worst}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.batch_invariance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from benchmarks.run import time_interleaved
    from qbert_deploy.runtimes.session import open_session

    canonical = args.export_dir / "model.onnx"
    started = time.perf_counter()
    models = {name: lowered(canonical, flash) for name, flash in zip(NAMES, (False, True), strict=True)}
    lower_s = (time.perf_counter() - started) / len(models)  # what qbert-serve adds at start without a lowered file
    sessions = {name: open_session(model, threads=args.threads) for name, model in models.items()}
    reqs = requests(args.requests)
    result: dict[str, object] = {
        "load_before": os.getloadavg()[0], "threads": args.threads, "rounds": args.rounds,
        "lower_in_memory_s": lower_s,
        "batch_dependence": {name: batch_dependence(s, reqs) for name, s in sessions.items()}}
    full = requests(8, 128, 128, seed=1)
    short = requests(4, 4, 32, seed=2)  # what benchmarks.serve_load sends: one row of 4..32 tokens per request
    feeds = {"batch 1, 128 tokens": padded(full[:1]), "batch 8, 128 tokens": padded(full),
             "batch 8, 4..128 tokens padded": padded(reqs[:8]), "batch 1, 16 tokens": padded([full[0][:, :16]]),
             "batch 4, 4..32 tokens padded": padded(short)}
    latency: dict[str, dict[str, float]] = {}
    for label, feed in feeds.items():
        runners = {name: (lambda f, s=s: s.run(["logits"], f)) for name, s in sessions.items()}
        times = time_interleaved(runners, feed, args.rounds, warmup=2)
        medians = {name: float(np.median(wall)) * 1000 for name, (wall, _) in times.items()}
        latency[label] = {**{f"{name} ms": ms for name, ms in medians.items()},
                          "ratio masked/flash": medians[NAMES[0]] / medians[NAMES[1]]}
    result["latency_median"] = latency
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
