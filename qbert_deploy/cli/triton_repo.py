"""qbert-triton-repo: write a Triton Inference Server model repository (onnxruntime backend) for an export dir."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qbert_deploy.cli.common import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qbert-triton-repo", description=__doc__)
    parser.add_argument("export_dir", help="an export directory written by qbert-export")
    parser.add_argument("-o", "--out", required=True, help="repository folder (replaced whole, never half written)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="instance group kind (default cpu)")
    parser.add_argument("--profile", default=None,
                        help="lowering profile to ship (default: the device's fast one, cpu-w8a8 for cpu, cuda for "
                             "gpu): model.<PROFILE>.onnx if the export has it, else model.onnx lowered into the "
                             "repository; 'canonical' ships model.onnx as exported")
    parser.add_argument("--model-name", default="qbert", help="the model's name in Triton (default qbert)")
    parser.add_argument("--max-batch", type=int, default=32, help="max_batch_size (default 32)")
    parser.add_argument("--max-delay-ms", type=float, default=5.0, help="dynamic batching queue delay (default 5)")
    parser.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    return parser


def _write(args: argparse.Namespace) -> int:
    from qbert_deploy.runtimes.triton_repo import write_triton_repo

    repo = write_triton_repo(args.export_dir, args.out, model_name=args.model_name, device=args.device,
                             profile=args.profile, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                             instances=args.instances)
    how = "lowered from" if repo.lowered else "from"
    print(f"wrote Triton repository {repo.root} ({repo.config.parent.name}: profile {repo.profile}, {how} "
          f"{repo.source.name}, {args.device})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("qbert-triton-repo", lambda: _write(args))


if __name__ == "__main__":
    sys.exit(main())
