"""Fixed shape buckets for a session: pad each batch to the next bucket, run, slice the outputs back.

A CUDA graph replays one captured launch sequence for one set of shapes and device addresses, so it needs fixed
shapes and fixed input/output buffers (ORT's I/O binding). `BucketedSession` gives every bucket (batch x sequence,
by default batch 1/8/32 x sequence 32/64/128/256) its own bound buffers and, on a session opened with
`open_session(..., cuda_graph=True)`, its own captured graph (ORT's `gpu_graph_id` run option). Padding is
invisible to the caller: extra rows repeat the first row, extra tokens are masked padding (right-padded, as the
tokenizer pads), and outputs come back with the caller's batch and sequence lengths.

Everything but the CUDA graph is provider-independent and runs (and is tested) on the CPU EP, I/O binding included.
A batch beyond the largest bucket is refused with a clear error (`oversize="error"`, the default) or run as it is,
without padding or graph (`oversize="unbucketed"`, what the server uses: it is correct, only slower).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

__all__ = ["DEFAULT_BATCHES", "DEFAULT_SEQUENCES", "BucketedSession", "ShapeBucketError", "ShapeBuckets",
           "pad_feed"]

DEFAULT_BATCHES = (1, 8, 32)
DEFAULT_SEQUENCES = (32, 64, 128, 256)
MASK_INPUT = "attention_mask"


class ShapeBucketError(ValueError):
    """A batch that no shape bucket holds, or bucket sizes that make no sense."""


@dataclass(frozen=True)
class ShapeBuckets:
    """Batch sizes and sequence lengths, each ascending; a batch runs in the smallest bucket that holds it."""

    batches: tuple[int, ...] = DEFAULT_BATCHES
    sequences: tuple[int, ...] = DEFAULT_SEQUENCES

    def __post_init__(self) -> None:
        for name, sizes in (("batch", self.batches), ("sequence", self.sequences)):
            if not sizes or any(int(s) < 1 for s in sizes) or list(sizes) != sorted(set(sizes)):
                raise ShapeBucketError(f"{name} buckets must be positive, distinct and ascending, got {list(sizes)}")

    @classmethod
    def parse(cls, text: str) -> ShapeBuckets:
        """`BATCHES x SEQUENCES`, e.g. `1,8,32x32,64,128,256` (the server's --shape-buckets)."""
        try:
            batches, sequences = text.lower().split("x")
            return cls(tuple(int(b) for b in batches.split(",")), tuple(int(s) for s in sequences.split(",")))
        except ValueError as err:
            if isinstance(err, ShapeBucketError):
                raise
            raise ShapeBucketError(f"shape buckets {text!r}: expected BATCHES x SEQUENCES such as "
                                   "1,8,32x32,64,128,256") from None

    def all(self) -> list[tuple[int, int]]:
        return [(b, s) for b in self.batches for s in self.sequences]

    def bucket(self, batch: int, sequence: int) -> tuple[int, int] | None:
        """The smallest (batch, sequence) bucket holding the shape, or None when none does."""
        b = next((size for size in self.batches if size >= batch), None)
        s = next((size for size in self.sequences if size >= sequence), None)
        return (b, s) if b is not None and s is not None else None


def pad_feed(feed: Mapping[str, np.ndarray], bucket: tuple[int, int],
             pad_values: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Each [batch, sequence] input padded to `bucket`: tokens on the right with the input's pad value (0 unless
    given; the attention mask's is always 0), then rows that repeat the first row (a real row: no kernel meets an
    all-masked one). The padded tokens are masked, so the caller's rows compute what they compute unpadded."""
    rows, length = bucket
    out = {}
    for name, value in feed.items():
        array = np.asarray(value)
        if array.ndim != 2:
            raise ShapeBucketError(f"input {name!r} must be [batch, sequence] to be bucketed, got {list(array.shape)}")
        if array.shape[0] > rows or array.shape[1] > length:
            raise ShapeBucketError(f"input {name!r} of shape {list(array.shape)} does not fit bucket {rows} x {length}")
        fill = 0 if name == MASK_INPUT else int((pad_values or {}).get(name, 0))
        padded = np.full((rows, length), fill, dtype=array.dtype)
        padded[:array.shape[0], :array.shape[1]] = array
        padded[array.shape[0]:] = padded[0]
        out[name] = padded
    return out


class BucketedSession:
    """An ORT session that runs every batch in a fixed shape bucket (see the module docstring).

    `run(output_names, feed)` answers like `InferenceSession.run`; any other attribute is the session's own.
    `io_binding` runs through fixed bound buffers per bucket (always on with a CUDA graph). Thread-safe: runs are
    serialized, since the bound buffers are shared.
    """

    def __init__(self, session: ort.InferenceSession, buckets: ShapeBuckets | None = None, io_binding: bool = False,
                 pad_values: Mapping[str, int] | None = None,
                 oversize: Literal["error", "unbucketed"] = "error") -> None:
        self._session = session
        self.buckets = buckets or ShapeBuckets()
        self.pad_values = dict(pad_values or {})
        self.oversize = oversize
        provider = session.get_providers()[0]
        options = session.get_provider_options().get(provider, {})
        self.cuda_graph = provider == "CUDAExecutionProvider" and options.get("enable_cuda_graph") in ("1", "True")
        self.io_binding = io_binding or self.cuda_graph
        self.device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        inputs = session.get_inputs()
        if not inputs or any(len(i.shape) != 2 for i in inputs):
            raise ShapeBucketError("shape buckets need [batch, sequence] inputs only")
        self._batch_dim, self._sequence_dim = inputs[0].shape
        self._input_dtypes = {i.name: np.int64 if i.type == "tensor(int64)" else np.int32 for i in inputs}
        self._sequence_outputs = {o.name for o in session.get_outputs()
                                  if len(o.shape) > 1 and o.shape[1] == self._sequence_dim}
        self._lock = threading.Lock()
        self._bound: dict[tuple[int, int], tuple[Any, dict[str, Any], dict[str, Any], Any]] = {}
        self.runs: dict[str, int] = {"bucketed": 0, "unbucketed": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def _output_shape(self, output: Any, bucket: tuple[int, int]) -> list[int]:
        dims = []
        for index, dim in enumerate(output.shape):
            if dim == self._batch_dim or (index == 0 and isinstance(dim, str)):
                dims.append(bucket[0])
            elif dim == self._sequence_dim:
                dims.append(bucket[1])
            elif isinstance(dim, int):
                dims.append(dim)
            else:
                raise ShapeBucketError(f"output {output.name!r} has a dimension {dim!r} that is neither the batch "
                                       "nor the sequence: its buffer cannot be bound ahead")
        return dims

    def _binding(self, bucket: tuple[int, int]) -> tuple[Any, dict[str, Any], dict[str, Any], Any]:
        """Bound input and output buffers of one bucket (made on its first use), and its run options."""
        if bucket not in self._bound:
            binding = self._session.io_binding()
            inputs, outputs = {}, {}
            for name, dtype in self._input_dtypes.items():
                inputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(list(bucket), dtype, self.device, 0)
                binding.bind_ortvalue_input(name, inputs[name])
            for meta in self._session.get_outputs():
                floats = np.float16 if meta.type == "tensor(float16)" else np.float32
                outputs[meta.name] = ort.OrtValue.ortvalue_from_shape_and_type(
                    self._output_shape(meta, bucket), floats, self.device, 0)
                binding.bind_ortvalue_output(meta.name, outputs[meta.name])
            run_options = ort.RunOptions()
            if self.cuda_graph:  # one captured graph per bucket
                run_options.add_run_config_entry("gpu_graph_id", str(len(self._bound) + 1))
            self._bound[bucket] = (binding, inputs, outputs, run_options)
        return self._bound[bucket]

    def _run_unbucketed(self, names: list[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        run_options = ort.RunOptions()
        if self.cuda_graph:
            run_options.add_run_config_entry("gpu_graph_id", "-1")  # no capture, no replay
        self.runs["unbucketed"] += 1
        return [np.asarray(v) for v in self._session.run(names, dict(feed), run_options)]

    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, np.ndarray],
            run_options: Any = None) -> list[np.ndarray]:
        names = list(output_names or [o.name for o in self._session.get_outputs()])
        first = np.asarray(next(iter(feed.values())))
        if first.ndim != 2:
            raise ShapeBucketError(f"inputs must be [batch, sequence], got shape {list(first.shape)}")
        batch, length = first.shape
        missing = [i.name for i in self._session.get_inputs() if i.name not in feed]
        if missing:
            raise ShapeBucketError(f"input {missing[0]!r} is missing")
        bucket = self.buckets.bucket(batch, length)
        with self._lock:
            if bucket is None:
                if self.oversize == "unbucketed":
                    return self._run_unbucketed(names, feed)
                raise ShapeBucketError(
                    f"batch {batch} x sequence {length} is larger than the largest shape bucket "
                    f"{self.buckets.batches[-1]} x {self.buckets.sequences[-1]}; split the batch, truncate, or "
                    "open the session with larger buckets")
            padded = pad_feed(feed, bucket, self.pad_values)
            self.runs["bucketed"] += 1
            if self.io_binding:
                binding, inputs, outputs, options = self._binding(bucket)
                for name, value in inputs.items():
                    value.update_inplace(padded[name].astype(self._input_dtypes[name], copy=False))
                self._session.run_with_iobinding(binding, options)
                results = [outputs[name].numpy() for name in names]
            else:
                results = [np.asarray(v) for v in self._session.run(names, padded, run_options)]
        return [r[:batch, :length] if name in self._sequence_outputs else r[:batch]
                for name, r in zip(names, results, strict=True)]
