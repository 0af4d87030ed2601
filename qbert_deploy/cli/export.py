"""qbert-export: model.pt -> export directory (QDQ ONNX with packed low-bit weights)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qbert_deploy.cli.common import fail, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qbert-export", description=__doc__)
    parser.add_argument("checkpoint", nargs="?", help="the model.pt (or safetensors directory) to export")
    parser.add_argument("-o", "--out", help="export directory (replaced whole, never half written)")
    parser.add_argument("--opset", type=int, default=21, choices=(21, 25),
                        help="target ONNX opset: 25 stores 2-bit weights as int2, 21 in int4 (default 21)")
    parser.add_argument("--no-parity", action="store_true",
                        help="skip the PyTorch vs ONNX parity check (median logit error at most 0.5 output steps)")
    parser.add_argument("--lower", action="append", type=_profiles, default=[], metavar="PROFILE[,PROFILE]",
                        help="also write OUT/model.PROFILE.onnx lowered for a runtime: cpu-w8a8, weight-only, "
                             "cuda, cuda-fp16, tensorrt (repeatable or a comma list)")
    parser.add_argument("--deploy", default=None, type=_profile, metavar="PROFILE",
                        help="write a deployment folder: PROFILE's lowered graph (e.g. cpu-w8a8) as OUT/model.onnx, "
                             "the file Optimum's ORTModel and other tools load by default, and the canonical graph "
                             "as OUT/model.canonical.onnx; qbert-serve, qbert-validate and --check read both")
    parser.add_argument("--pack-3bit", action="store_true",
                        help="lowered files store 3-bit weights at 3 bits per value: a smaller file, but ONNX Runtime "
                             "unpacks them when it opens the file, which doubles the peak memory (BERT-base MP 2/3: "
                             "369 against 174 MiB). Default: int4 containers (the canonical model.onnx is packed "
                             "either way)")
    parser.add_argument("--no-3bit-packing", action="store_true", help=argparse.SUPPRESS)  # now the default
    parser.add_argument("--triton-repo", default=None, metavar="DIR",
                        help="also write a Triton model repository here (see qbert-triton-repo for more options)")
    parser.add_argument("--triton-device", choices=("cpu", "gpu"), default="cpu",
                        help="instance group of the Triton repository (default cpu)")
    parser.add_argument("--check", metavar="EXPORT_DIR",
                        help="verify an export directory instead of exporting (exit 0 when every check passes)")
    parser.add_argument("--checkpoint", dest="check_checkpoint", metavar="MODEL_PT",
                        help="with --check: also require the export to come from this checkpoint")
    return parser


def _profile(text: str) -> str:
    names = _profiles(text)
    if len(names) != 1:
        raise argparse.ArgumentTypeError(f"--deploy takes one profile, got {text!r}")
    return names[0]


def _profiles(text: str) -> list[str]:
    from qbert_deploy.runtimes.lowering import PROFILES

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PROFILES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown lowering profile {(unknown or [text])[0]!r}; "
                                         f"choose from {', '.join(PROFILES)}")
    return names


def _check(args: argparse.Namespace) -> int:
    from qbert_deploy.exporters.check import check_export

    results = check_export(args.check, args.check_checkpoint)
    for result in results:
        print(result.line())
    failed = [r.name for r in results if not r.ok]
    if failed:
        return fail(f"{args.check}: {len(failed)} check(s) failed: {', '.join(failed)}", code=1, prog="qbert-export")
    print(f"{args.check}: all {len(results)} checks passed")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.check is not None:
        return _check(args)
    if args.checkpoint is None or args.out is None:
        return fail("give a checkpoint and -o/--out to export, or --check EXPORT_DIR", prog="qbert-export")
    import qbert_deploy
    from qbert_deploy.validation.parity import ParityError

    try:
        # Lowering, the self-check and parity all run before the export takes the place of OUT.
        result = qbert_deploy.export(args.checkpoint, args.out, opset=args.opset,
                                     lower=[name for names in args.lower for name in names], deploy=args.deploy,
                                     pack_3bit=args.pack_3bit and not args.no_3bit_packing,
                                     parity=not args.no_parity, echo=print)
    except ParityError as err:  # exit 1, like a failed --check
        return fail(str(err), code=1, prog="qbert-export")
    size = result.size
    print(f"wrote {result.model_path} ({size['file_bytes'] / 2**20:.2f} MB; fp32 weights "
          f"{size['fp32_bytes'] / 2**20:.2f} MB; {size['compression_on_disk']:.2f}x smaller on disk)")
    for profile, path in result.lowered.items():
        role = ", the folder's default model.onnx" if profile == args.deploy else ""
        print(f"wrote {path} (lowered for {profile}{role}, {path.stat().st_size / 2**20:.2f} MB)")
    if args.triton_repo:
        from qbert_deploy.runtimes.triton_repo import write_triton_repo

        repo = write_triton_repo(result.out_dir, args.triton_repo, device=args.triton_device)
        print(f"wrote Triton repository {repo.root} ({repo.source.name}, {args.triton_device})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("qbert-export", lambda: _export(args))


if __name__ == "__main__":
    sys.exit(main())
