"""CI accuracy gate on the real pipeline.

The user's path on the real model and data: `qbert-quantize` (MiniLM-L6 fine-tuned on the movie-review train split
with a reduced step budget, then quantized with a preset), `qbert-export`, then `qbert-validate` on the dev split
against the baseline committed in ci/baseline.json. Exit code: the first failing step's, else the gate's.

    python ci/accuracy_gate.py --out ci-out                       # gate (what .ci/run does)
    python ci/accuracy_gate.py --out ci-out --write-baseline      # refresh ci/baseline.json
    python ci/accuracy_gate.py --out ci-out --profiles canonical,cpu-w8a8          # fewer ORT profiles
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "ci" / "baseline.json"
SEED = 0
# A reduced budget: 60 steps of 16 examples (~1,000 of the 8,066 training examples) at length <= 64, about a minute
# on 2 free cores. Raise it with --steps; the baseline must then be refreshed.
FINE_TUNE_STEPS = 60
TRAIN_BATCH = 16
LEARNING_RATE = 2e-4
RECIPES = ("w4", "mp23")  # qbert-quantize's presets (models/qbert-*.json)


def quantize(out: Path, recipe: str, steps: int, qat_steps: int) -> tuple[int, Path]:
    """model.pt made by `qbert-quantize`, as a user makes it; the fine-tuned fp32 model is kept in OUT/fp32."""
    job = out / f"quantize.{recipe}"
    command = [sys.executable, "-m", "qbert_deploy.cli.quantize", "--preset", recipe,
               "--finetune-steps", str(steps), "--qat-steps", str(qat_steps), "--batch-size", str(TRAIN_BATCH),
               "--max-length", "64", "--lr", str(LEARNING_RATE), "--seed", str(SEED),
               "--fp32-cache", str(out / "fp32"), "-o", str(job)]
    return _run(command), job / "model.pt"


def _run(command: list[str]) -> int:
    print("+ " + " ".join(command), flush=True)
    return subprocess.run(command, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("ci-out"), help="work folder (reused between runs)")
    parser.add_argument("--recipe", choices=RECIPES, default="w4")
    parser.add_argument("--steps", type=int, default=FINE_TUNE_STEPS, help="float fine-tuning steps")
    parser.add_argument("--qat-steps", type=int, default=0, help="quantization-aware training steps")
    parser.add_argument("--profiles", default="canonical,cpu-w8a8,weight-only",
                        help="ORT CPU profiles to validate, comma-separated")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--write-baseline", action="store_true", help="record --baseline from this run instead")
    parser.add_argument("--max-drop", default="0.5", help="accuracy drop allowed, percentage points")
    parser.add_argument("--min-agreement", default="99.0", help="ORT vs PyTorch fake-quant agreement floor, %%")
    parser.add_argument("--layerwise", action="store_true")
    args = parser.parse_args(argv)

    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    from qbert_deploy.data.movie_reviews import write_splits

    data = write_splits(args.out / "data")
    code, model_pt = quantize(args.out, args.recipe, args.steps, args.qat_steps)
    if code:
        return code
    export = args.out / f"export.{args.recipe}"
    python = sys.executable
    code = _run([python, "-m", "qbert_deploy.cli.export", str(model_pt), "-o", str(export)])
    if code:
        return code
    command = [python, "-m", "qbert_deploy.cli.validate", str(export), "--checkpoint", str(model_pt),
               "--data", str(data["dev"]), "--providers", "cpu", "--profile", args.profiles, "--threads", "2",
               "--report", str(args.out / f"report.{args.recipe}"), "--max-drop", args.max_drop,
               "--min-agreement", args.min_agreement]
    if args.layerwise:
        command.append("--layerwise")
    command += ["--write-baseline", str(args.baseline)] if args.write_baseline else ["--baseline", str(args.baseline)]
    code = _run(command)
    print(f"accuracy gate: exit {code} after {time.time() - started:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
