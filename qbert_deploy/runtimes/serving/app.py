"""The ASGI app: KServe v2 / Triton HTTP endpoints, a text endpoint, Prometheus metrics, all on one batcher."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from qbert_deploy.runtimes.serving.batcher import Batcher, BatcherClosed, QueueFull
from qbert_deploy.runtimes.serving.metrics import ServeMetrics
from qbert_deploy.runtimes.serving.model import ServedModel, softmax
from qbert_deploy.runtimes.serving.protocol import (
    HEADER_LENGTH,
    ServeError,
    classification,
    encode_infer,
    parse_infer,
    parse_json,
)
from qbert_deploy.tasks import QA, SEQUENCE, TOKEN, output_dims, split

VERSION = "1"


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "qbert"
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256
    max_body_bytes: int = 8 << 20
    reject_long_text: bool = False  # default: truncate text longer than the model maximum
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_body_bytes < 1 or self.max_delay_ms < 0:
            raise ValueError("max batch, queue and body size must be positive and the delay not negative")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused past `limit` bytes (before or after gzip/deflate decoding)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"request body of {declared} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ServeError(415, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        plain = decoder.decompress(body, limit + 1)
    except zlib.error as err:
        raise ServeError(400, f"request body is not valid {encoding} data ({err})") from None
    if len(plain) > limit:
        raise ServeError(413, f"decompressed request body is over the {limit}-byte limit")
    return plain


class Server:
    """The state one app serves: the model, its batcher and metrics."""

    def __init__(self, model: ServedModel, config: ServeConfig) -> None:
        self.model = model
        self.config = config
        self.metrics = ServeMetrics()
        self.batcher: Batcher | None = None
        self.ready = False

    async def start(self) -> None:
        self.batcher = Batcher(self.model.run, max_batch=self.config.max_batch,
                               max_delay=self.config.max_delay_ms / 1000, max_queue=self.config.max_queue,
                               pad_values=self.model.pad_values, metrics=self.metrics)
        await self.batcher.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.close()

    async def infer_rows(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.batcher is None or not self.ready:
            raise ServeError(503, "the model is not ready", {"Retry-After": str(self.config.retry_after_s)})
        try:
            future = self.batcher.submit(feeds)
        except QueueFull as err:
            raise ServeError(503, str(err), {"Retry-After": str(self.config.retry_after_s)}) from None
        except BatcherClosed as err:
            raise ServeError(503, str(err)) from None
        except ValueError as err:
            raise ServeError(400, str(err)) from None
        try:
            return await asyncio.shield(future)  # a client that hangs up does not cancel the batch
        except Exception as err:  # the model run failed; report it as the server's fault
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise ServeError(500, f"inference failed: {first}") from None

    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.config.model_name:
            raise ServeError(404, f"unknown model {name!r}; this server serves {self.config.model_name!r}")
        if version not in (None, "", VERSION):
            raise ServeError(404, f"model {name!r} has no version {version!r}; it has version {VERSION}")

    def model_metadata(self) -> dict[str, Any]:
        tensors = [{"name": n, "datatype": self.model.input_types[n], "shape": [-1, -1]}
                   for n in self.model.input_names]
        return {"name": self.config.model_name, "versions": [VERSION], "platform": "onnxruntime_onnx",
                "inputs": tensors,
                "outputs": [{"name": n, "datatype": self.model.output_type,
                             "shape": [-1, *output_dims(self.model.task, len(self.model.labels))]}
                            for n in self.model.output_names],
                "parameters": {"task": self.model.task, "labels": self.model.labels,
                               "max_sequence_length": self.model.max_length,
                               "model_file": self.model.path.name, "profile": self.model.profile,
                               "lowered_in_memory": self.model.served.lowered_in_memory,
                               "providers": self.model.providers}}

    def model_config(self) -> dict[str, Any]:
        """The Triton-style model configuration (as JSON, like Triton's /config endpoint)."""
        types = {"INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "FP32": "TYPE_FP32", "FP16": "TYPE_FP16"}
        return {"name": self.config.model_name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
                "max_batch_size": self.config.max_batch,
                "input": [{"name": n, "data_type": types.get(self.model.input_types[n], "TYPE_INVALID"),
                           "dims": [-1]} for n in self.model.input_names],
                "output": [{"name": n, "data_type": types.get(self.model.output_type, "TYPE_INVALID"),
                            "dims": output_dims(self.model.task, len(self.model.labels))}
                           for n in self.model.output_names],
                "dynamic_batching": {"max_queue_delay_microseconds": round(self.config.max_delay_ms * 1000)}}

    async def observed(self, endpoint: str, handler: Callable[[], Awaitable[Response]]) -> Response:
        """Run a handler, turn ServeError into a JSON error, and count and time the request."""
        started = time.perf_counter()
        try:
            response = await handler()
        except ServeError as err:
            response = _error(err.status, err.message, err.headers)
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def infer(self, request: Request, name: str, version: str | None) -> Response:
        self.check_model(name, version)
        body = await read_body(request, self.config.max_body_bytes)
        parsed = parse_infer(body, request.headers.get(HEADER_LENGTH), self.model.input_types)
        names = self.model.output_names
        unknown = [o for o in parsed.outputs or [] if o not in names]
        if unknown:
            raise ServeError(400, f"unknown output {unknown[0]!r}; the model gives {', '.join(map(repr, names))}")
        try:
            feeds = self.model.check_inputs(parsed.inputs)
        except ValueError as err:
            raise ServeError(400, str(err)) from None
        outputs = split(self.model.task, await self.infer_rows(feeds))
        if parsed.outputs:
            outputs = {n: outputs[n] for n in names if n in parsed.outputs}
        for name, count in parsed.class_counts.items():
            if self.model.task != SEQUENCE:
                raise ServeError(400, "the classification extension applies to sequence classifiers only")
            outputs[name] = classification(outputs[name], min(count, outputs[name].shape[1]), self.model.labels)
        payload, headers = encode_infer(self.config.model_name, outputs, parsed.binary_outputs, parsed.request_id)
        return Response(payload, headers=headers)

    def check_task(self, task: str, endpoint: str) -> None:
        if self.model.task != task:
            endpoints = {SEQUENCE: "classify", TOKEN: "tag", QA: "answer"}
            raise ServeError(400, f"/{endpoint} needs a {task} model; this one is {self.model.task} "
                                  f"(use /{endpoints[self.model.task]})")

    def _strings(self, body: Any, key: str, example: str) -> list[str]:
        values = body.get(key) if isinstance(body, dict) else None
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not all(isinstance(t, str) for t in values):
            raise ServeError(400, f'expected {{"{key}": "{example}"}} or {{"{key}": ["{example}", ...]}}')
        if not values:
            raise ServeError(400, f"empty input: '{key}' is an empty list")
        if len(values) > self.config.max_batch:
            raise ServeError(400, f"{len(values)} texts is more than the maximum batch of {self.config.max_batch}")
        return values

    async def tag(self, request: Request, name: str) -> Response:
        """Token classification: the entities of each text, with character offsets into it."""
        self.check_model(name)
        self.check_task(TOKEN, "tag")
        texts = self._strings(parse_json(await read_body(request, self.config.max_body_bytes)), "text", "a sentence")
        encoded = await asyncio.to_thread(self.model.encode, texts)
        self._check_length(encoded.truncated)
        logits = await self.infer_rows(encoded.feeds)
        predictions = [{"entities": self.model.tag(row, encoding, text, self.model.labels), "truncated": cut}
                       for row, encoding, text, cut in zip(logits, encoded.encodings, texts, encoded.truncated,
                                                           strict=True)]
        return JSONResponse({"model_name": self.config.model_name, "model_version": VERSION,
                             "predictions": predictions})

    async def answer(self, request: Request, name: str) -> Response:
        """Extractive QA: for each question + context, the answer text, its character span and its score."""
        self.check_model(name)
        self.check_task(QA, "answer")
        body = parse_json(await read_body(request, self.config.max_body_bytes))
        questions = self._strings(body, "question", "a question")
        contexts = self._strings(body, "context", "a passage")
        if len(questions) != len(contexts):
            raise ServeError(400, f"{len(questions)} questions but {len(contexts)} contexts")
        try:
            encoded = await asyncio.to_thread(self.model.encode_questions, questions, contexts)
        except ValueError as err:
            raise ServeError(400, str(err)) from None
        if len(encoded.question_of) > self.config.max_batch:
            raise ServeError(400, f"the contexts need {len(encoded.question_of)} windows of "
                                  f"{self.model.max_length} tokens, more than the maximum batch of "
                                  f"{self.config.max_batch}")
        combined = await self.infer_rows(encoded.feeds)
        answers = self.model.answers(combined, encoded, contexts)
        return JSONResponse({"model_name": self.config.model_name, "model_version": VERSION,
                             "predictions": [{"answer": a.text, "start": a.start, "end": a.end, "score": a.score}
                                             for a in answers]})

    def _check_length(self, truncated: list[bool]) -> None:
        if self.config.reject_long_text and any(truncated):
            first = truncated.index(True)
            raise ServeError(400, f"text {first} is longer than the model maximum of {self.model.max_length} tokens "
                                  "(this server rejects long text instead of truncating it)")

    async def classify(self, request: Request, name: str) -> Response:
        self.check_model(name)
        self.check_task(SEQUENCE, "classify")
        texts = self._strings(parse_json(await read_body(request, self.config.max_body_bytes)), "text", "a sentence")
        encoded = await asyncio.to_thread(self.model.encode, texts)  # long text must not stall the event loop
        self._check_length(encoded.truncated)
        logits = await self.infer_rows(encoded.feeds)
        probabilities = softmax(logits)
        labels = self.model.labels
        predictions = [{"label": labels[int(p.argmax())], "score": float(p.max()),
                        "probabilities": {label: float(v) for label, v in zip(labels, p, strict=True)},
                        "truncated": cut}
                       for p, cut in zip(probabilities, encoded.truncated, strict=True)]
        return JSONResponse({"model_name": self.config.model_name, "model_version": VERSION,
                             "predictions": predictions})


def create_app(model: ServedModel, config: ServeConfig | None = None) -> FastAPI:
    server = Server(model, config or ServeConfig())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await server.start()
        try:
            yield
        finally:
            await server.stop()  # uvicorn has finished the in-flight requests by now; drain what is queued

    app = FastAPI(title="qbert-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> Response:
        return _error(err.status_code, str(err.detail))

    @app.get("/v2")
    async def server_metadata() -> Response:
        version = metadata.version("qbert-deploy") if _installed("qbert-deploy") else "0"
        return JSONResponse({"name": "qbert-serve", "version": version, "extensions": ["binary_tensor_data"]})

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if server.ready else 503)

    async def _metadata(name: str, version: str | None) -> Response:
        server.check_model(name, version)
        return JSONResponse(server.model_metadata())

    async def _ready(name: str, version: str | None) -> Response:
        server.check_model(name, version)
        return Response(status_code=200 if server.ready else 503)

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str) -> Response:
        return await server.observed("metadata", lambda: _metadata(name, None))

    @app.get("/v2/models/{name}/versions/{version}")
    async def version_metadata(name: str, version: str) -> Response:
        return await server.observed("metadata", lambda: _metadata(name, version))

    async def _config(name: str) -> Response:
        server.check_model(name)
        return JSONResponse(server.model_config())

    @app.get("/v2/models/{name}/config")
    async def model_config(name: str) -> Response:
        return await server.observed("config", lambda: _config(name))

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> Response:
        return await server.observed("ready", lambda: _ready(name, None))

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def version_ready(name: str, version: str) -> Response:
        return await server.observed("ready", lambda: _ready(name, version))

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        return await server.observed("infer", lambda: server.infer(request, name, None))

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def version_infer(name: str, version: str, request: Request) -> Response:
        return await server.observed("infer", lambda: server.infer(request, name, version))

    @app.post("/v2/models/{name}/classify")
    async def classify(name: str, request: Request) -> Response:
        return await server.observed("classify", lambda: server.classify(request, name))

    @app.post("/v2/models/{name}/tag")
    async def tag(name: str, request: Request) -> Response:
        return await server.observed("tag", lambda: server.tag(request, name))

    @app.post("/v2/models/{name}/answer")
    async def answer(name: str, request: Request) -> Response:
        return await server.observed("answer", lambda: server.answer(request, name))

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _installed(package: str) -> bool:
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return True
