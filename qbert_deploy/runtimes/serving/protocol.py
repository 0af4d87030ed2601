"""The KServe v2 / Triton HTTP inference protocol: request parsing and response encoding.

Tensors come as JSON (`data`) or, with Triton's binary tensor extension (what `tritonclient.http` sends by default),
as raw little-endian bytes after a JSON header whose length is in the `Inference-Header-Content-Length` header.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIMENSION = 2**31 - 1  # far beyond any real batch or sequence, and within numpy's index type everywhere
MAX_RANK = 8  # numpy refuses more than 64 dimensions; the model takes 2
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}


class ServeError(Exception):
    """A request the server refuses: an HTTP status and a one-line message for the JSON error body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.param = param  # the request field at fault, for OpenAI's error shape


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    request_id: str | None = None
    outputs: list[str] | None = None  # None: every output
    binary_outputs: set[str] = field(default_factory=set)
    class_counts: dict[str, int] = field(default_factory=dict)  # Triton's classification extension


def parse_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ServeError(400, f"request body is not valid UTF-8 (byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ServeError(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:  # the C decoder recurses once per nesting level
        raise ServeError(400, "malformed JSON: nested too deeply") from None


def _shape(spec: dict[str, Any], name: str) -> tuple[int, ...]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ServeError(400, f"input {name!r}: 'shape' must be a list of integers")
    if len(shape) > MAX_RANK:
        raise ServeError(400, f"input {name!r}: shape has {len(shape)} dimensions, more than {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise ServeError(400, f"input {name!r}: negative dimension in shape {shape}")
    if any(d > MAX_DIMENSION for d in shape):
        raise ServeError(400, f"input {name!r}: a dimension of shape {shape} is over {MAX_DIMENSION}")
    return tuple(shape)


def _json_tensor(data: Any, dtype: np.dtype[Any], name: str) -> np.ndarray:
    try:
        array = np.asarray(data)
    except ValueError:
        raise ServeError(400, f"input {name!r}: 'data' is a ragged or too deeply nested list") from None
    if array.size and dtype.kind in "iu" and array.dtype.kind not in "iu":
        raise ServeError(400, f"input {name!r}: 'data' must hold integers, got {array.dtype.name} values")
    if array.size and array.dtype.kind not in "biuf":
        raise ServeError(400, f"input {name!r}: 'data' must hold numbers")
    try:
        return array.astype(dtype).reshape(-1)
    except OverflowError:
        raise ServeError(400, f"input {name!r}: a value does not fit in {dtype.name}") from None


def parse_infer(body: bytes, header_length: str | None, expected: dict[str, str]) -> InferRequest:
    """Parse an infer request; `expected` maps each known input name to its datatype (e.g. "INT64")."""
    binary = b""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise ServeError(400, f"{HEADER_LENGTH} is not an integer: {header_length[:40]!r}") from None
        if not 0 < size <= len(body):
            raise ServeError(400, f"{HEADER_LENGTH} {size} does not fit the {len(body)}-byte body")
        body, binary = body[:size], body[size:]
    request = parse_json(body)
    if not isinstance(request, dict):
        raise ServeError(400, "the request must be a JSON object with an 'inputs' list")
    specs = request.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise ServeError(400, "the request has no inputs: 'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ServeError(400, "each input must be an object with a 'name'")
        name = spec["name"]
        if name not in expected:
            raise ServeError(400, f"unknown input {name!r}; the model takes {', '.join(expected)}")
        if name in inputs:
            raise ServeError(400, f"input {name!r} is given twice")
        datatype = spec.get("datatype")
        if datatype != expected[name]:
            raise ServeError(400, f"input {name!r} must have datatype {expected[name]}, got {datatype!r}")
        dtype = DTYPES[datatype]
        shape = _shape(spec, name)
        parameters = spec.get("parameters") or {}
        blob_size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if blob_size is not None:
            if not isinstance(blob_size, int) or blob_size < 0 or offset + blob_size > len(binary):
                raise ServeError(400, f"input {name!r}: binary_data_size {blob_size!r} runs past the binary data")
            size = blob_size
            if size % dtype.itemsize:
                raise ServeError(400, f"input {name!r}: {size} bytes is not a whole number of {datatype} values")
            flat = np.frombuffer(binary, dtype=dtype.newbyteorder("<"), count=size // dtype.itemsize, offset=offset)
            flat = flat.astype(dtype)
            offset += size
        elif "data" in spec:
            flat = _json_tensor(spec["data"], dtype, name)
        else:
            raise ServeError(400, f"input {name!r} has neither 'data' nor binary data")
        count = math.prod(shape)  # Python ints: np.prod wraps around in int64, so [2**32, 2**32] would count 0
        if flat.size != count:
            raise ServeError(400, f"input {name!r}: shape {list(shape)} needs {count} values, got {flat.size}")
        inputs[name] = flat.reshape(shape)
    if offset != len(binary):
        raise ServeError(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    request_id = request.get("id")
    outputs, binary_outputs, class_counts = _requested_outputs(request)
    return InferRequest(inputs, request_id if isinstance(request_id, str) else None, outputs, binary_outputs,
                        class_counts)


def _requested_outputs(request: dict[str, Any]) -> tuple[list[str] | None, set[str], dict[str, int]]:
    parameters = request.get("parameters") or {}
    all_binary = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    specs = request.get("outputs")
    if specs is None:
        return None, {"*"} if all_binary else set(), {}
    if not isinstance(specs, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in specs):
        raise ServeError(400, "'outputs' must be a list of objects with a 'name'")
    names, binary, class_counts = [], set(), {}
    for spec in specs:
        options = spec.get("parameters") if isinstance(spec.get("parameters"), dict) else {}
        names.append(spec["name"])
        if all_binary or options.get("binary_data"):
            binary.add(spec["name"])
        count = options.get("classification", options.get("class_count", 0))
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ServeError(400, f"output {spec['name']!r}: classification count must be a non-negative integer")
        if count:
            class_counts[spec["name"]] = count
    return names, binary, class_counts


def classification(values: np.ndarray, count: int, labels: list[str]) -> np.ndarray:
    """Triton's classification output: per row the top `count` entries as b"value:index:label", best first."""
    top = np.argsort(-values, axis=1, kind="stable")[:, :count]
    out = np.empty(top.shape, dtype=object)
    for row, indices in enumerate(top):
        for k, index in enumerate(indices):
            out[row, k] = f"{values[row, index]:f}:{index}:{labels[index]}".encode()
    return out


def datatype_name(dtype: np.dtype[Any]) -> str:
    if dtype == np.dtype(object):
        return "BYTES"
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"no protocol datatype for {dtype}")


def encode_infer(model_name: str, outputs: dict[str, np.ndarray], binary: set[str],
                 request_id: str | None) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers; outputs named in `binary` (or all, with "*") go as raw bytes."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype_name(array.dtype), "shape": list(array.shape)}
        strings = array.dtype == np.dtype(object)
        if "*" in binary or name in binary:
            if strings:  # each element: 4-byte little-endian length, then the bytes
                blob = b"".join(len(v).to_bytes(4, "little") + v for v in array.reshape(-1))
            else:
                blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            flat = array.reshape(-1).tolist()
            entry["data"] = [v.decode() for v in flat] if strings else flat
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": entries}
    if request_id is not None:
        response["id"] = request_id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
