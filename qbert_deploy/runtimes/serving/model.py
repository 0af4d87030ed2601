"""An export directory made ready to serve: the ONNX file for a profile, its session, labels and tokenizer.

By default the execution provider's fast lowering profile is served (cpu-w8a8 on the CPU): the export's
model.<profile>.onnx when it holds one, else model.onnx lowered in memory at start. `profile="canonical"` serves
model.onnx as exported (the dequantize-then-float graph).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from qbert_deploy.families import TEXT_INPUTS
from qbert_deploy.runtimes.buckets import BucketedSession, ShapeBuckets
from qbert_deploy.runtimes.export_dir import (
    ExportConfig,
    ExportDirError,
    check_label_count,
    check_signature,
    load_tokenizer,
    model_files,
    read_config,
    verify_file,
)
from qbert_deploy.runtimes.session import PROVIDERS, SessionError, first_available, open_session
from qbert_deploy.runtimes.trained_length import recorded_max_length, recorded_text_pairs
from qbert_deploy.tasks import FEATURE, best_span, combine, entities, served_outputs

INPUT_NAMES = TEXT_INPUTS  # a graph takes these or a subset (DistilBERT's and RoBERTa's have no token_type_ids)
OUTPUT_NAME = "logits"
CANONICAL = "canonical"  # the profile name that serves model.onnx as exported
ORT_TYPES = {"tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(float)": "FP32", "tensor(float16)": "FP16"}
# Text is cut to this many characters per token of the model maximum before it is tokenised: tokenising costs time
# and memory in proportion to the whole text (8 MB: ~10 s and 1.2 GB), while only the first max_length tokens are
# used. Ordinary text has 3-6 characters per token; only whitespace-padded text could lose a token in the window.
CHARS_PER_TOKEN = 64


ModelDirError = ExportDirError  # an export directory that cannot be served as asked (the shared validation's error)


@dataclass(frozen=True)
class ServedFile:
    path: Path  # the file read from the export directory
    profile: str  # the lowering profile it runs as, or CANONICAL
    lowered_in_memory: bool  # the canonical graph lowered at start: the export has no file for the profile

    def describe(self) -> str:
        if self.lowered_in_memory:
            return f"{self.path} lowered in memory to profile {self.profile}"
        return f"{self.path} (profile {self.profile})"


def served_file(export_dir: str | os.PathLike[str], profile: str | None = None,
                provider: str = "cpu") -> ServedFile:
    """Which file and profile to serve.

    `profile=None`: `provider`'s fast profile (`qbert_deploy.runtimes.lowering.default_profile`). A lowering
    profile is served from its lowered file when the export holds it (model.<profile>.onnx, or a deployment
    folder's model.onnx), else from the canonical graph lowered in memory; any other name needs its
    model.<name>.onnx; "canonical" serves the canonical graph as it is.
    """
    from qbert_deploy.runtimes.lowering import PROFILES, default_profile

    folder = Path(export_dir)
    if not folder.is_dir():
        raise ModelDirError(f"{folder}: not an export directory")
    files = model_files(folder)
    if not files.canonical.is_file():
        raise ModelDirError(f"{folder}: no {files.canonical.name} (is it a qbert-export directory?)")
    if profile == CANONICAL:
        return ServedFile(files.canonical, CANONICAL, False)
    chosen = profile or default_profile(provider)
    if chosen in files.lowered:
        return ServedFile(files.lowered[chosen], chosen, False)
    if chosen not in PROFILES:
        raise ModelDirError(f"{folder}: no profile {chosen!r}: no model.{chosen}.onnx here (lowered files: "
                            f"{', '.join(files.lowered) or 'none'}) and not a lowering profile "
                            f"({', '.join((*PROFILES, CANONICAL))})")
    return ServedFile(files.canonical, chosen, True)


def open_served(served: ServedFile, providers: Sequence[str] = ("cpu",), threads: int | None = None,
                allow_fallback: bool = False, cuda_graph: bool = False) -> ort.InferenceSession:
    """A session on a served file, under its profile's session settings (lowered in memory when it must be)."""
    from qbert_deploy.runtimes.lowering import PROFILES

    return open_session(served.path, providers, threads=threads, allow_fallback=allow_fallback,
                        profile=served.profile if served.profile in PROFILES else None, cuda_graph=cuda_graph)


@dataclass(frozen=True)
class Window:
    """The tokens of one text as fed to the model (at most max_length), with what /tag reads: word ids, offsets."""
    ids: list[int]
    type_ids: list[int]
    attention_mask: list[int]
    word_ids: list[int | None]
    offsets: list[tuple[int, int]]


@dataclass(frozen=True)
class Encoded:
    feeds: dict[str, np.ndarray]  # int64 [texts, longest]
    truncated: list[bool]  # per text: cut to the model maximum
    encodings: Sequence[Any] = ()  # per row: its Window (or tokenizers Encoding): ids, word ids, offsets


@dataclass(frozen=True)
class QAEncoded:
    feeds: dict[str, np.ndarray]  # int64 [windows, longest]: a long context gives several overlapping windows
    question_of: list[int]  # per window, the question it belongs to
    encodings: Sequence[Any]  # per window: its tokenizers Encoding (offsets, sequence ids)


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # characters into the context
    end: int
    score: float  # probability of the start token times that of the end token, within the window


def padded_feeds(encodings: Sequence[Any], pad_values: dict[str, int], names: Sequence[str]) -> dict[str, np.ndarray]:
    """A batch of `tokenizers` encodings as the graph's `names` inputs, each row padded after its text."""
    longest = max(len(e.ids) for e in encodings)
    feeds = {n: np.full((len(encodings), longest), pad_values[n], dtype=np.int64) for n in INPUT_NAMES}
    for row, e in enumerate(encodings):
        feeds["input_ids"][row, :len(e.ids)] = e.ids
        feeds["attention_mask"][row, :len(e.ids)] = e.attention_mask
        feeds["token_type_ids"][row, :len(e.ids)] = e.type_ids
    return {n: feeds[n] for n in names}


class ServedModel:
    """One ORT session on an export directory, plus what the server needs to feed it text."""

    def __init__(self, export_dir: str | os.PathLike[str], profile: str | None = None,
                 providers: Sequence[str] = ("cpu",), threads: int | None = None,
                 shape_buckets: ShapeBuckets | None = None, cuda_graph: bool = False, verify: bool = True,
                 max_length: int | None = None) -> None:
        """`max_length` is the most tokens per sequence: by default the length the model was trained and calibrated
        at (`qbert.max_length`, recorded by qbert-export), else the model's position table. `shape_buckets` runs
        every batch padded to a fixed shape bucket (invisible to clients; a batch beyond the largest bucket runs
        unpadded); `cuda_graph` (CUDA only) adds a captured CUDA graph per bucket. `verify`
        checks the served file against the sha256 qbert-export recorded in qbert_recipe.json.

        The directory goes through the same validation as `qbert-export --check` (`runtimes/export_dir.py`), so a
        directory that cannot be served is refused here, in one line, and not with 500s later."""
        self.export_dir = Path(export_dir)
        if cuda_graph and first_available(providers) != "cuda":
            raise SessionError(f"CUDA graphs need the cuda provider; {first_available(providers)} would run")
        self.served = served_file(self.export_dir, profile, first_available(providers))
        self.path, self.profile = self.served.path, self.served.profile
        config = read_config(self.export_dir)
        self.tokenizer = load_tokenizer(self.export_dir, config)
        self.sha256 = verify_file(self.export_dir, self.path) if verify else None
        try:
            session = open_served(self.served, providers, threads=threads, allow_fallback=len(providers) > 1,
                                  cuda_graph=cuda_graph)
        except SessionError as err:
            if profile is not None:
                raise
            raise SessionError(f"{err} (--profile {CANONICAL} serves the graph as exported)") from None
        check_signature(config, session.get_inputs(), session.get_outputs(), self.path)
        metadata = session.get_modelmeta().custom_metadata_map  # qbert-export's records: trained length, text form
        # True: /classify takes sentence pairs only; False: single texts only; None (an older export): either
        self.text_pairs = recorded_text_pairs(metadata, str(self.path))
        self.config = config
        self.pad_id = config.pad_id
        self.session: ort.InferenceSession | BucketedSession = session
        if shape_buckets is not None or cuda_graph:
            self.session = BucketedSession(session, shape_buckets, pad_values=self.pad_values, oversize="unbucketed")
        names = [i.name for i in self.session.get_inputs()]
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.task = config.task
        self.output_names = list(served_outputs(self.task))
        self.input_names = [n for n in INPUT_NAMES if n in names]
        self.input_types = {i.name: ORT_TYPES.get(i.type, i.type) for i in self.session.get_inputs()}
        first = outputs[self.output_names[0]]
        self.output_type = ORT_TYPES.get(first.type, first.type)
        self.labels = config.labels
        self.trained_length = recorded_max_length(metadata, str(self.path))
        self.max_length = _sequence_limit(config, max_length, self.trained_length, self.path)
        self.vocab_size = config.vocab_size
        self.type_vocab_size = config.type_vocab_size
        self.providers = self.session.get_providers()
        self.tokenizer.no_padding()  # padding is per batch, in the batcher
        # sentence pairs: cut longest first to max_length, as transformers' truncation=True did in training
        self.pair_tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        self.pair_tokenizer.enable_truncation(max_length=self.max_length, strategy="longest_first")
        self.max_text_chars = CHARS_PER_TOKEN * self.max_length
        # question answering: contexts longer than the window go in overlapping windows (HF's doc stride)
        self.qa_tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        self.qa_tokenizer.enable_truncation(max_length=self.max_length, stride=min(128, self.max_length // 4),
                                            strategy="only_second")
        # Text is truncated here, not by tokenizers: its truncation builds every overflow window of the rest of the
        # text, which nothing here uses. The template's closing special tokens are kept after the cut.
        self.tokenizer.no_truncation()
        self._closing_specials = _closing_specials(self.tokenizer)
        if self._closing_specials is None:  # a template this cannot see through: tokenizers truncates
            self.tokenizer.enable_truncation(max_length=self.max_length)
        self._run_lock = threading.Lock()
        self._run_options: ort.RunOptions | None = None  # of the run in progress, so that it can be stopped
        self._warm_up()

    def _warm_up(self) -> None:
        """One run before serving: ORT allocates on the first run, and a model that cannot run fails here, once.
        Two rows of different lengths, so the padding (pad_token_id, the attention mask) runs too."""
        try:
            result = self.run(self.encode(["warm up", "warm up a padded batch of two rows"]).feeds)
        except Exception as err:  # onnxruntime raises its own untyped exceptions
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise SessionError(f"{self.path}: the model does not run: {first}") from None
        check_label_count(self.config, int(result.shape[-1]), self.path)  # a dynamic label axis, now known
        # the per-row width of the served output: the labels, or an embedding model's embedding size
        self.output_width = int(result.shape[-1]) if self.task == FEATURE else len(self.labels)

    @property
    def pad_values(self) -> dict[str, int]:
        return {"input_ids": self.pad_id, "attention_mask": 0, "token_type_ids": 0}

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The model's outputs as one array: logits, QA's start/end logits stacked on a last axis of 2, or an
        embedding model's sentence embeddings."""
        options = ort.RunOptions()
        with self._run_lock:
            self._run_options = options
        try:
            outputs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names}, options)
        finally:
            with self._run_lock:
                self._run_options = None
        return combine(self.task, outputs)

    def stop_run(self) -> None:
        """Ask the run in progress (in another thread) to stop: ORT checks the flag between kernels and fails it.
        (A shape-bucketed session runs with its own options and finishes its batch.)"""
        with self._run_lock:
            if self._run_options is not None:
                self._run_options.terminate = True

    def cut(self, text: str) -> tuple[str, bool]:
        """`text` cut to `max_text_chars` characters (at a space when there is one in the last quarter, so that
        no word is split), and whether it was cut."""
        if len(text) <= self.max_text_chars:
            return text, False
        cut = text[:self.max_text_chars]
        if text[self.max_text_chars].isspace():
            return cut, True
        space = cut.rfind(" ")
        return (cut[:space] if space >= self.max_text_chars * 3 // 4 else cut), True

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate a [rows, tokens] batch of ids and fill the optional inputs; ValueError says what is wrong."""
        if "input_ids" not in inputs:
            raise ValueError("input 'input_ids' is required")
        ids = inputs["input_ids"]
        if ids.ndim != 2:
            raise ValueError(f"input 'input_ids' must be 2-D [batch, sequence], got shape {list(ids.shape)}")
        if ids.size == 0:
            raise ValueError(f"empty input: input_ids has shape {list(ids.shape)}")
        if ids.shape[1] > self.max_length:
            raise ValueError(f"sequence of {ids.shape[1]} tokens is longer than the model maximum {self.max_length}")
        for name, array in inputs.items():
            if array.shape != ids.shape:
                raise ValueError(f"input {name!r} has shape {list(array.shape)}, input_ids {list(ids.shape)}")
        feeds = {"input_ids": ids,
                 "attention_mask": inputs.get("attention_mask", np.ones_like(ids)),
                 "token_type_ids": inputs.get("token_type_ids", np.zeros_like(ids))}
        limits = {"input_ids": self.vocab_size, "token_type_ids": self.type_vocab_size, "attention_mask": 2}
        for name, limit in limits.items():
            array = feeds[name]
            if limit is not None and (array.min() < 0 or array.max() >= limit):
                raise ValueError(f"input {name!r} has values outside [0, {limit - 1}]")
        return {n: np.ascontiguousarray(feeds[n], dtype=np.int64) for n in self.input_names}

    def encode(self, texts: Sequence[str]) -> Encoded:
        """Each text's first max_length tokens (special tokens included); `truncated` says which lost any."""
        cuts = [self.cut(t) for t in texts]
        encodings = self.tokenizer.encode_batch([c for c, _ in cuts])
        windows: list[Any] = []
        truncated = []
        for (_, cut), e in zip(cuts, encodings, strict=True):
            if self._closing_specials is None:
                windows.append(e)
                truncated.append(cut or bool(e.overflowing))
                continue
            window = _window(e, self.max_length, self._closing_specials)
            windows.append(window)
            truncated.append(cut or len(window.ids) < len(e.ids))
        return Encoded(padded_feeds(windows, self.pad_values, self.input_names), truncated, windows)

    def encode_pairs(self, texts: Sequence[str], pairs: Sequence[str]) -> Encoded:
        """Each sentence pair as one sequence ([CLS] a [SEP] b [SEP], token types 0 then 1) of at most max_length
        tokens, the longer text losing tokens first; `truncated` says which pairs lost any."""
        cuts = [(self.cut(a), self.cut(b)) for a, b in zip(texts, pairs, strict=True)]
        encodings = self.pair_tokenizer.encode_batch([(a, b) for (a, _), (b, _) in cuts])
        truncated = [cut_a or cut_b or bool(e.overflowing) for ((_, cut_a), (_, cut_b)), e in
                     zip(cuts, encodings, strict=True)]
        return Encoded(padded_feeds(encodings, self.pad_values, self.input_names), truncated, encodings)

    def question_windows(self, questions: Sequence[str], contexts: Sequence[str]) -> int:
        """The fewest windows the question + context pairs can fill: each window holds at most max_length less the
        question and the special tokens of the context. Counted on the tokens alone, before any window is made."""
        specials = self.tokenizer.num_special_tokens_to_add(True)
        question_tokens = self.tokenizer.encode_batch(list(questions), add_special_tokens=False)
        context_tokens = self.tokenizer.encode_batch(list(contexts), add_special_tokens=False)
        rooms = [self.max_length - specials - len(q.ids) for q in question_tokens]
        # a question that fills the window is refused with its own message when the windows are made
        return sum(math.ceil(len(c.ids) / room) if room > 0 else 1
                   for room, c in zip(rooms, context_tokens, strict=True))

    def encode_questions(self, questions: Sequence[str], contexts: Sequence[str]) -> QAEncoded:
        """Question + context windows; each context is cut into overlapping windows when it is too long."""
        windows, question_of = [], []
        try:
            encodings = self.qa_tokenizer.encode_batch(list(zip(questions, contexts, strict=True)))
        except Exception as err:  # tokenizers raises its own untyped exception when a question fills the window
            raise ValueError(f"cannot fit the question and context into {self.max_length} tokens "
                             f"({str(err)[:160]})") from None
        for index, e in enumerate(encodings):
            for window in [e, *e.overflowing]:
                windows.append(window)
                question_of.append(index)
        return QAEncoded(padded_feeds(windows, self.pad_values, self.input_names), question_of, windows)

    @staticmethod
    def tag(logits: np.ndarray, encoding: Any, text: str, labels: Sequence[str]) -> list[dict[str, Any]]:
        """Entities of one text from its [tokens, tags] logits: each word takes its first sub-token's tag (as in
        training), words of one entity join, character offsets come from the tokenizer."""
        probabilities = softmax(logits[:len(encoding.ids)])
        words: dict[int, int] = {}
        for position, word in enumerate(encoding.word_ids):
            if word is not None and word not in words:
                words[word] = position
        order = sorted(words)
        tags = [labels[int(probabilities[words[w]].argmax())] for w in order]
        out = []
        for kind, first, last in entities(tags):
            first_token = words[order[first]]
            last_token = max(p for p, w in enumerate(encoding.word_ids) if w == order[last])
            start, end = int(encoding.offsets[first_token][0]), int(encoding.offsets[last_token][1])
            score = float(np.mean([probabilities[words[order[i]]].max() for i in range(first, last + 1)]))
            out.append({"entity": kind, "text": text[start:end], "start": start, "end": end, "score": score})
        return out

    @staticmethod
    def answers(combined: np.ndarray, encoded: QAEncoded, contexts: Sequence[str]) -> list[Answer]:
        """Each question's best span over its windows, from [windows, tokens, 2] start/end logits."""
        best: dict[int, Answer] = {}
        for row, encoding in enumerate(encoded.encodings):
            length = len(encoding.ids)
            context = np.array([s == 1 for s in encoding.sequence_ids], dtype=bool)
            start_logits, end_logits = combined[row, :length, 0], combined[row, :length, 1]
            first, last, _ = best_span(start_logits, end_logits, context)
            starts, ends = softmax(np.where(context, start_logits, -np.inf)), softmax(np.where(context, end_logits,
                                                                                               -np.inf))
            score = float(starts[first] * ends[last])
            question = encoded.question_of[row]
            if question not in best or score > best[question].score:
                start, end = int(encoding.offsets[first][0]), int(encoding.offsets[last][1])
                best[question] = Answer(contexts[question][start:end], start, end, score)
        return [best[i] for i in range(len(contexts))]


def _closing_specials(tokenizer: Tokenizer) -> int | None:
    """How many special tokens the tokenizer's single-sequence template puts after the text ([SEP], </s>: 1), or
    None when the text's tokens do not appear as one run inside the template's output."""
    probe = "a b"
    content = tokenizer.encode(probe, add_special_tokens=False).ids
    full = tokenizer.encode(probe).ids
    if not content:
        return None
    starts = [i for i in range(len(full) - len(content) + 1) if full[i:i + len(content)] == content]
    if len(starts) != 1:
        return None
    return len(full) - starts[0] - len(content)


def _sequence_limit(config: ExportConfig, asked: int | None, trained: int | None, path: Path) -> int:
    """The tokens per sequence to serve: the asked length, else the trained one; never beyond the position table."""
    if asked is None:
        return min(trained, config.max_length) if trained is not None else config.max_length
    if asked > config.max_length:
        raise ModelDirError(f"{path}: --max-length {asked} is beyond the model's {config.max_length} positions")
    return asked


def _window(encoding: Any, max_length: int, closing: int) -> Window:
    """The first max_length tokens of an encoding, its closing special tokens kept at the end: what tokenizers'
    own truncation gives for one sequence, without building the overflow windows."""
    ids, types, mask = encoding.ids, encoding.type_ids, encoding.attention_mask
    words, offsets = encoding.word_ids, encoding.offsets
    if len(ids) <= max_length:
        return Window(ids, types, mask, words, offsets)
    keep = max_length - closing

    def cut(values: list[Any]) -> list[Any]:
        return values[:keep] + values[len(values) - closing:]

    return Window(cut(ids), cut(types), cut(mask), cut(words), cut(offsets))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return result


__all__ = ["CANONICAL", "CHARS_PER_TOKEN", "INPUT_NAMES", "OUTPUT_NAME", "PROVIDERS", "Encoded", "ModelDirError",
           "ServedFile", "ServedModel", "Window", "open_served", "served_file", "softmax"]
