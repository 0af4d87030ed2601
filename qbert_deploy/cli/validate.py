"""qbert-validate: the fine-tuned fp32 model | PyTorch master weights and fake-quant | ORT spec | ORT per profile.

pytorch-fp32 is the fine-tuned model qbert-quantize started from (OUT/fp32, recorded in model.pt; --fp32 DIR
overrides it), so the report states the quantization drop; pytorch-master-weights is model.pt's float weights after
QAT. By default every profile the export holds is run, plus the one qbert-serve ships (cpu-w8a8 on the CPU), at
the sequence length the model was trained at.

Exit codes: 0 every backend within tolerance; 1 the gate failed (a table says what); 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from qbert_deploy.cli.common import run_cli
from qbert_deploy.data.tsv import add_column_options, columns_of


def _list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qbert-validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path, help="export directory written by qbert-export")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the model.pt the export was made from")
    parser.add_argument("--data", type=Path, required=True,
                        help="labelled data of the model's task: GLUE-style TSV (one of GLUE's layouts, single "
                        "texts or sentence pairs as the model was trained on), CoNLL columns (.conll/.txt) or SQuAD "
                        "v1.1 JSON; for an embedding model, texts: a .txt file (one per line) or a TSV's text "
                        "column (its labels, if any, are the probe's test labels)")
    add_column_options(parser)
    parser.add_argument("--providers", type=_list, default=["cpu"], help="ORT execution providers (default cpu)")
    parser.add_argument("--fp32", type=Path, help="the fine-tuned fp32 model's Hugging Face folder to measure the "
                        "quantization drop against (default: the one model.pt records, qbert-quantize's OUT/fp32)")
    parser.add_argument("--profile", type=_list, default=None,
                        help="runtime profiles, comma-separated: canonical (model.onnx), or a lowering profile "
                             "such as cpu-w8a8 or weight-only (model.<profile>.onnx, or lowered now) (default: "
                             "canonical, every model.<profile>.onnx in the export, and the profile qbert-serve "
                             "ships on each provider)")
    parser.add_argument("--report", type=Path, help="write report.json, report.md and PNG plots into this folder")
    parser.add_argument("--batch-size", type=_positive, default=32)
    parser.add_argument("--max-length", type=_positive, default=None,
                        help="tokens per example (default: the length model.pt was trained and calibrated at; 128 "
                             "for a model.pt that does not record it)")
    parser.add_argument("--threads", type=_positive, help="intra-op threads for ORT and PyTorch")
    parser.add_argument("--limit", type=_positive, help="only N examples, evenly spaced over the file")
    layer = parser.add_argument_group("layerwise")
    layer.add_argument("--layerwise", action="store_true",
                       help="compare each encoder layer and quantized Linear with PyTorch; name the first that departs")
    layer.add_argument("--layer-examples", type=_positive, default=32, help="examples for the layerwise pass")
    layer.add_argument("--layer-tolerance", type=float, default=0.1,
                       help="median |error| allowed per layer, in 8-bit steps of the PyTorch tensor (default 0.1)")
    gate = parser.add_argument_group("gate")
    gate.add_argument("--baseline", type=Path, help="baseline JSON to compare the task metric with (accuracy, "
                      "entity F1 or SQuAD F1)")
    gate.add_argument("--max-drop", type=float, default=0.5,
                      help="accuracy drop allowed vs the baseline and vs PyTorch fake-quant, percentage points")
    gate.add_argument("--max-drop-vs-fp32", type=float, default=None, metavar="POINTS",
                      help="quantization drop allowed for fake-quant and every ONNX backend below the fine-tuned "
                           "fp32 model, percentage points (default: reported, not gated); a run without the fp32 "
                           "model then fails")
    gate.add_argument("--relative", action="store_true", help="--max-drop (and --max-drop-vs-fp32) is percent of "
                      "the reference accuracy")
    gate.add_argument("--min-agreement", type=float, default=99.0,
                      help="least %% of ORT predictions equal to PyTorch fake-quant's (default 99)")
    gate.add_argument("--max-error-steps", type=float, default=0.5,
                      help="median |logit error| vs PyTorch fake-quant allowed for the ONNX spec and the canonical "
                           "profile, in 8-bit output steps (default 0.5)")
    embed = parser.add_argument_group("embedding models")
    embed.add_argument("--probe-train", type=Path, help="labelled TSV (e.g. the train split) a logistic-regression "
                       "probe is trained on per backend and tested on --data's labels (MTEB's classification)")
    embed.add_argument("--min-cosine", type=float, default=None, metavar="COS",
                       help="least mean cosine of every quantized backend's embeddings to fp32's, 0..1 (default: "
                            "reported, not gated)")
    embed.add_argument("--min-neighbours", type=float, default=None, metavar="OVERLAP",
                       help="least 10-nearest-neighbour overlap with fp32's embeddings within --data, 0..1 "
                            "(default: reported, not gated)")
    gate.add_argument("--write-baseline", type=Path, help="record this run's accuracies (the fp32 model's too) as a "
                      "baseline file")
    return parser


def _validate(args: argparse.Namespace) -> int:
    import qbert_deploy

    report = qbert_deploy.validate(
        args.export_dir, args.checkpoint, args.data, report_dir=args.report, baseline=args.baseline,
        write_baseline=args.write_baseline, providers=args.providers, profiles=args.profile,
        batch_size=args.batch_size, max_length=args.max_length, threads=args.threads, limit=args.limit,
        layerwise=args.layerwise, layer_examples=args.layer_examples, layer_tolerance=args.layer_tolerance,
        max_drop=args.max_drop, relative=args.relative, min_agreement=args.min_agreement,
        max_error_steps=args.max_error_steps, fp32=args.fp32, max_drop_vs_fp32=args.max_drop_vs_fp32,
        columns=columns_of(args), probe_train=args.probe_train, min_cosine=args.min_cosine,
        min_neighbours=args.min_neighbours)
    if report.failures:
        from qbert_deploy.validation.gate import failure_table

        print(f"\nqbert-validate: GATE FAILED ({len(report.failures)} checks)\n{failure_table(report.failures)}",
              file=sys.stderr)
        return 1
    print("qbert-validate: every backend within tolerance")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("qbert-validate", lambda: _validate(args))


if __name__ == "__main__":
    sys.exit(main())
