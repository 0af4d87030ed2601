"""CI accuracy gate on the real pipeline.

The user's path on the real model and data: `qbert-quantize` (MiniLM-L6 fine-tuned on the movie-review train split
with a reduced step budget, then quantized with a preset), `qbert-export`, then `qbert-validate` on the dev split
against the baseline committed in ci/baseline.json. Exit code: the first failing step's, else the gate's.

    python ci/accuracy_gate.py --out ci-out                       # gate (what .ci/run does)
    python ci/accuracy_gate.py --out ci-out --write-baseline      # refresh ci/baseline.json
    python ci/accuracy_gate.py --out ci-out --profiles canonical,cpu-w8a8          # fewer ORT profiles
    python ci/accuracy_gate.py --out ci-out --providers cuda --min-agreement 99.5  # on a GPU (onnxruntime-gpu)
    python ci/accuracy_gate.py --out ci-out --recipe mp23 --max-drop-vs-fp32 8    # bound 2/3-bit's larger loss

Besides the baseline, the gate bounds the quantization drop against the fine-tuned fp32 model qbert-quantize kept in
OUT/fp32 (`qbert-validate --max-drop-vs-fp32`): by default 1 point for w4, none for mp23.

With `--providers cuda` the ORT side runs on the GPU under the CUDA profiles (default cuda, cuda-fp16, cuda-fused,
cuda-fused-w8: the fused ones fold the 8-bit activation quantizers away, a numerics change this checks).
ci/baseline.json holds CPU backends only, so a CUDA run is gated against PyTorch fake-quant (accuracy drop and
agreement) unless --baseline names a CUDA baseline.
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
PROVIDERS = ("cpu", "cuda")
DEFAULT_PROFILES = {"cpu": "canonical,cpu-w8a8,weight-only",
                    "cuda": "cuda,cuda-fp16,cuda-fused,cuda-fused-w8"}
# Quantization drop allowed below the fine-tuned fp32 model, points: w4 measured 0.1-0.4 (docs/RESULTS.md, issue 5);
# mp23 loses several points without QAT, so it is reported there, not bounded, unless --max-drop-vs-fp32 says so.
FP32_DROP = {"w4": "1.0", "mp23": None}


def _refuse(message: str) -> int:
    print(f"accuracy_gate: error: {message}", file=sys.stderr)
    return 2


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("ci-out"), help="work folder (reused between runs)")
    parser.add_argument("--recipe", choices=RECIPES, default="w4")
    parser.add_argument("--steps", type=int, default=FINE_TUNE_STEPS, help="float fine-tuning steps")
    parser.add_argument("--qat-steps", type=int, default=0, help="quantization-aware training steps")
    parser.add_argument("--providers", choices=PROVIDERS, default="cpu",
                        help="where ONNX Runtime runs: cpu (default) or cuda (needs onnxruntime-gpu and a GPU)")
    parser.add_argument("--profiles", default=None,
                        help="ORT profiles to validate, comma-separated (default: "
                             + "; ".join(f"{k}: {v}" for k, v in DEFAULT_PROFILES.items()) + ")")
    parser.add_argument("--baseline", type=Path, default=None,
                        help=f"baseline JSON (default {BASELINE.relative_to(ROOT)} on the CPU, none on CUDA)")
    parser.add_argument("--write-baseline", action="store_true", help="record --baseline from this run instead")
    parser.add_argument("--max-drop", default="0.5", help="accuracy drop allowed, percentage points")
    parser.add_argument("--min-agreement", default="99.0", help="ORT vs PyTorch fake-quant agreement floor, %%")
    parser.add_argument("--max-drop-vs-fp32", default=None, metavar="POINTS",
                        help="quantization drop allowed below the fine-tuned fp32 model (default: "
                             + ", ".join(f"{k} {v or 'none'}" for k, v in FP32_DROP.items()) + ")")
    parser.add_argument("--layerwise", action="store_true")
    return parser


def resolve(args: argparse.Namespace) -> tuple[str, Path | None]:
    """(profiles, baseline file or None) for the chosen provider."""
    return args.profiles or DEFAULT_PROFILES[args.providers], args.baseline or (
        BASELINE if args.providers == "cpu" else None)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profiles, baseline = resolve(args)
    if args.providers != "cpu":
        if args.write_baseline and args.baseline is None:
            return _refuse(f"--write-baseline with --providers {args.providers} needs --baseline PATH "
                           f"({BASELINE.relative_to(ROOT)} holds the CPU backends)")
        from qbert_deploy.runtimes.session import SessionError, first_available

        try:
            first_available([args.providers])
        except SessionError as err:
            return _refuse(f"--providers {args.providers}: {err} (install onnxruntime-gpu on a machine with a GPU)")

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
               "--data", str(data["dev"]), "--providers", args.providers, "--profile", profiles, "--threads", "2",
               "--report", str(args.out / f"report.{args.recipe}"), "--max-drop", args.max_drop,
               "--min-agreement", args.min_agreement]
    fp32_drop = args.max_drop_vs_fp32 or FP32_DROP[args.recipe]
    if fp32_drop is not None:
        command += ["--max-drop-vs-fp32", fp32_drop]
    if args.layerwise:
        command.append("--layerwise")
    if args.write_baseline:
        command += ["--write-baseline", str(baseline)]
    elif baseline is not None:
        command += ["--baseline", str(baseline)]
    code = _run(command)
    print(f"accuracy gate: exit {code} after {time.time() - started:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
