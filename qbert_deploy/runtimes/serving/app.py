"""The ASGI app: KServe v2 / Triton HTTP endpoints, a text endpoint, Prometheus metrics, all on one batcher.

The work one request may cost is bounded before it is done: the body by size and by a deadline, the queue place
before the body is parsed or tokenised, each text by characters before it is tokenised (`CHARS_PER_TOKEN` per token
of the model maximum), the texts by count (`max_batch`) and the tokens the model runs by `max_request_tokens`.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import ctypes.util
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from qbert_deploy.runtimes.serving.batcher import Admission, Batcher, BatcherClosed, QueueFull
from qbert_deploy.runtimes.serving.metrics import ServeMetrics
from qbert_deploy.runtimes.serving.model import CHARS_PER_TOKEN, Encoded, ServedModel, softmax
from qbert_deploy.runtimes.serving.protocol import (
    HEADER_LENGTH,
    ServeError,
    classification,
    encode_infer,
    parse_infer,
    parse_json,
)
from qbert_deploy.tasks import FEATURE, QA, SEQUENCE, TOKEN, output_dims, split

VERSION = "1"
CLIENT_GONE = 499  # nginx's code for a client that closed the connection before the answer: counted, not logged
TRIM_AFTER_BYTES = 1 << 20  # after a request body this large, freed memory is handed back to the system
T = TypeVar("T")
log = logging.getLogger("qbert_deploy.serve")


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "qbert"
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256
    max_body_bytes: int = 8 << 20
    reject_long_text: bool = False  # default: truncate text longer than the model maximum
    retry_after_s: int = 1
    body_timeout_s: float = 30.0  # from the end of the headers to the end of the body
    max_request_tokens: int | None = None  # rows x tokens one request may run; None: max_batch x the model maximum

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_body_bytes < 1 or self.max_delay_ms < 0:
            raise ValueError("max batch, queue and body size must be positive and the delay not negative")
        if self.body_timeout_s <= 0 or (self.max_request_tokens is not None and self.max_request_tokens < 1):
            raise ValueError("the body timeout and the tokens per request must be positive")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def openai_error(err: ServeError) -> JSONResponse:
    """OpenAI's error body, which its clients parse: {"error": {"message", "type", "param", "code"}}."""
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    code = "model_not_found" if err.status == 404 else None
    return JSONResponse({"error": {"message": err.message, "type": kind, "param": err.param, "code": code}},
                        status_code=err.status, headers=err.headers)


OPENAI_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")  # "user" is an opaque end-user id
ENCODING_FORMATS = ("float", "base64")


def _decode(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate body decoded, refused past `limit` bytes, when cut short, or with bytes after its end."""
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    parts, size, rest = [], 0, body
    while True:  # gzip allows several members one after another (RFC 1952); deflate is one stream
        decoder = zlib.decompressobj(wbits)
        try:
            part = decoder.decompress(rest, limit + 1 - size)
        except zlib.error as err:
            raise ServeError(400, f"request body is not valid {encoding} data ({err})") from None
        size += len(part)
        if size > limit:
            raise ServeError(413, f"decompressed request body is over the {limit}-byte limit")
        if not decoder.eof:  # the stream stops early: for gzip, its CRC and length trailer went missing
            raise ServeError(400, f"request body is not valid {encoding} data (it is cut short)")
        parts.append(part)
        rest = decoder.unused_data
        if not rest:
            return b"".join(parts)
        if encoding != "gzip":
            raise ServeError(400, f"request body is not valid {encoding} data ({len(rest)} bytes after its end)")


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def give_memory_back() -> None:
    """Return freed heap memory to the system. glibc keeps what large requests freed, in every thread's arena, for
    reuse (the probe saw ~650 MB kept per 8 MB text); malloc_trim(0) releases the free pages of all arenas."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Server:
    """The state one app serves: the model, its batcher and metrics."""

    def __init__(self, model: ServedModel, config: ServeConfig) -> None:
        self.model = model
        self.config = config
        self.metrics = ServeMetrics()
        self.batcher: Batcher | None = None
        self.ready = False
        self.stopping = False  # a shutdown began: body reads still waiting are cut, readiness answers 503
        self.abandoned = 0  # requests answered 503 because the graceful timeout ran out
        self.max_request_tokens = config.max_request_tokens or config.max_batch * model.max_length
        self._body_reads: set[asyncio.Timeout] = set()
        # One thread tokenises: a request's tokenising is bounded (a few ms), and one thread keeps one malloc arena
        # instead of one per worker thread holding its freed memory.
        self._tokenizer: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qbert-tokenize")
        self.batcher = Batcher(self.model.run, max_batch=self.config.max_batch,
                               max_delay=self.config.max_delay_ms / 1000, max_queue=self.config.max_queue,
                               pad_values=self.model.pad_values, metrics=self.metrics, stop_run=self.model.stop_run)
        await self.batcher.start()
        self.ready = True

    def begin_stop(self) -> None:
        """A shutdown began: readiness says 503, and a body still on its way is not waited for (a stalled client
        would hold the shutdown to its timeout); its request gets a 503. Requests already read are finished."""
        self.ready = False
        self.stopping = True
        now = asyncio.get_running_loop().time()
        for read in self._body_reads:
            read.reschedule(now)

    def abandon(self) -> None:
        """The graceful timeout ran out: every request not yet answered gets a 503 now, and nothing is computed
        for them."""
        self.begin_stop()
        if self.batcher is not None:
            self.abandoned += self.batcher.pending
            self.batcher.abandon()

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.close()
        if self._tokenizer is not None:
            self._tokenizer.shutdown(wait=False, cancel_futures=True)

    def _retry(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Retry-After": str(self.config.retry_after_s), **(extra or {})}

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused past the size limit (before or after gzip/deflate decoding) and when it does
        not arrive within the body timeout."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ServeError(413, f"request body of {declared} bytes is over the {limit}-byte limit",
                             {"Connection": "close"})  # rather than read and drop what follows
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (0.0 if self.stopping else self.config.body_timeout_s)
        try:
            async with asyncio.timeout_at(deadline) as read:
                self._body_reads.add(read)
                try:
                    async for chunk in request.stream():
                        size += len(chunk)
                        if size > limit:
                            raise ServeError(413, f"request body is over the {limit}-byte limit",
                                             {"Connection": "close"})
                        chunks.append(chunk)
                finally:
                    self._body_reads.discard(read)
        except TimeoutError:
            if self.stopping:
                raise ServeError(503, "the server is shutting down", self._retry({"Connection": "close"})) from None
            raise ServeError(408, f"the request body did not arrive within {self.config.body_timeout_s:g} s",
                             {"Connection": "close"}) from None
        except ClientDisconnect:
            raise ServeError(CLIENT_GONE, "the client closed the connection before sending the whole body") from None
        if size >= TRIM_AFTER_BYTES:
            request.state.large = True
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding == "identity":
            return body
        if encoding not in ("gzip", "deflate"):
            raise ServeError(415, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
        plain = _decode(body, encoding, limit)
        if len(plain) >= TRIM_AFTER_BYTES:
            request.state.large = True
        return plain

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[Admission]:
        """A place in the batcher's queue for the request being prepared, or 503 at once when there is none."""
        if self.batcher is None:
            raise ServeError(503, "the model is not ready", self._retry())
        try:
            admission = self.batcher.admit()
        except QueueFull as err:
            raise ServeError(503, str(err), self._retry()) from None
        except BatcherClosed as err:
            raise ServeError(503, str(err), self._retry()) from None
        try:
            yield admission
        finally:
            admission.release()  # unless the batcher took it; then it is released when the request is answered

    async def tokenized(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the tokenizer thread: long text must not stall the event loop."""
        assert self._tokenizer is not None, "the server has not started"
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer, fn, *args)

    async def infer_rows(self, feeds: dict[str, np.ndarray], admission: Admission) -> np.ndarray:
        if self.batcher is None:
            raise ServeError(503, "the model is not ready", self._retry())
        rows, tokens = feeds["input_ids"].shape
        if rows * tokens > self.max_request_tokens:
            raise ServeError(400, f"the request needs {rows} x {tokens} tokens, more than the "
                                  f"{self.max_request_tokens} one request may run")
        try:
            future = self.batcher.submit(feeds, admission)
        except BatcherClosed as err:
            raise ServeError(503, str(err), self._retry()) from None
        except ValueError as err:
            raise ServeError(400, str(err)) from None
        try:
            return await asyncio.shield(future)  # a client that hangs up does not cancel the batch
        except BatcherClosed as err:  # the graceful timeout ran out before it was computed
            raise ServeError(503, str(err), self._retry()) from None
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
                             "shape": [-1, *output_dims(self.model.task, self.model.output_width)]}
                            for n in self.model.output_names],
                "parameters": {"task": self.model.task, "labels": self.model.labels,
                               "text_pairs": self.model.text_pairs,
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
                            "dims": output_dims(self.model.task, self.model.output_width)}
                           for n in self.model.output_names],
                "dynamic_batching": {"max_queue_delay_microseconds": round(self.config.max_delay_ms * 1000)}}

    async def observed(self, endpoint: str, handler: Callable[[], Awaitable[Response]],
                       request: Request | None = None,
                       error: Callable[[ServeError], JSONResponse] | None = None) -> Response:
        """Run a handler, turn ServeError into a JSON error (`error`'s shape, else {"error": message}), and count
        and time the request. Any other error is a 500 with a JSON body and one log line (counted: alerting on 5xx
        must see it), never a traceback."""
        render = error or (lambda err: _error(err.status, err.message, err.headers))
        started = time.perf_counter()
        try:
            response = await handler()
        except ServeError as err:
            response = render(err)
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            # uvicorn cancels what outlasts its own (longer) graceful timeout: still a JSON 503
            self.abandoned += 1
            response = render(ServeError(503, "the server stopped before this request was answered", self._retry()))
        except Exception as err:
            detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else "(no message)"
            log.error("qbert-serve: a %s request failed: %s: %s", endpoint, type(err).__name__, detail)
            response = render(ServeError(500, f"internal error ({type(err).__name__}); the server log has the "
                                              "details"))
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        if request is not None and getattr(request.state, "large", False):
            response.background = BackgroundTask(give_memory_back)  # after the answer is sent
        return response

    async def infer(self, request: Request, name: str, version: str | None) -> Response:
        self.check_model(name, version)
        body = await self.read_body(request)
        async with self.admitted() as admission:
            parsed = parse_infer(body, request.headers.get(HEADER_LENGTH), self.model.input_types)
            del body
            names = self.model.output_names
            unknown = [o for o in parsed.outputs or [] if o not in names]
            if unknown:
                raise ServeError(400, f"unknown output {unknown[0]!r}; the model gives "
                                      f"{', '.join(map(repr, names))}")
            try:
                feeds = self.model.check_inputs(parsed.inputs)
            except ValueError as err:
                raise ServeError(400, str(err)) from None
            outputs = split(self.model.task, await self.infer_rows(feeds, admission))
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
            endpoints = {SEQUENCE: "classify", TOKEN: "tag", QA: "answer", FEATURE: "embed or /v1/embeddings"}
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
        for index, value in enumerate(values):
            if not value.isascii():
                try:  # JSON's \ud800 escapes decode to lone surrogates, which are not text and not UTF-8
                    value.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise ServeError(400, f"{key} {index} holds a lone UTF-16 surrogate "
                                          f"(U+{ord(value[err.start]):04X} at character {err.start}), which is not "
                                          "text") from None
        return values

    @staticmethod
    def _only(body: Any, fields: tuple[str, ...]) -> None:
        """Refuse a field the endpoint does not read: a misspelt or unsupported one must not be ignored."""
        unknown = [key for key in body if key not in fields] if isinstance(body, dict) else []
        if unknown:
            raise ServeError(400, f"unknown field {unknown[0][:60]!r}; this endpoint reads "
                                  f"{', '.join(map(repr, fields))}")

    def _pairs(self, body: Any, texts: list[str]) -> list[str] | None:
        """The second text of each pair ("text_pair"), or None for single texts; the model decides which it takes
        (an export that does not record it takes either)."""
        given = isinstance(body, dict) and "text_pair" in body
        if self.model.text_pairs is True and not given:
            raise ServeError(400, 'this model was trained on sentence pairs: send {"text": ..., "text_pair": ...}, '
                                  "one text_pair for each text")
        if self.model.text_pairs is False and given:
            raise ServeError(400, 'this model was trained on single texts: send {"text": ...} without "text_pair"')
        if not given:
            return None
        pairs = self._strings(body, "text_pair", "a second sentence")
        if len(pairs) != len(texts):
            raise ServeError(400, f"{len(texts)} texts but {len(pairs)} text_pair values: each text needs its pair")
        return pairs

    def _check_chars(self, texts: list[str], pairs: list[str] | None = None) -> None:
        """Refuse, before tokenising, text this server would not read whole."""
        limit = self.model.max_text_chars
        if self.config.reject_long_text:
            for key, values in (("text", texts), ("text_pair", pairs or [])):
                for index, text in enumerate(values):
                    if len(text) > limit:
                        raise ServeError(400, f"{key} {index} has {len(text)} characters, more than the {limit} "
                                              f"({CHARS_PER_TOKEN} per token of the model maximum of "
                                              f"{self.model.max_length} tokens) this server reads (it rejects long "
                                              "text instead of truncating it)")
        total = sum(min(len(t), limit) for t in texts + (pairs or []))
        budget = CHARS_PER_TOKEN * self.max_request_tokens
        if total > budget:
            raise ServeError(400, f"the request holds {total} characters of text to tokenise, more than the {budget} "
                                  f"({CHARS_PER_TOKEN} per token of the {self.max_request_tokens} tokens one "
                                  "request may run)")

    async def _text_logits(self, request: Request, name: str, task: str, endpoint: str
                           ) -> tuple[list[str], Encoded, np.ndarray]:
        """The texts of a {"text": ...} request (classify: with "text_pair" for a sentence-pair model), their
        encoding and the model's logits (classify and tag)."""
        self.check_model(name)
        self.check_task(task, endpoint)
        body = await self.read_body(request)
        async with self.admitted() as admission:  # a full queue refuses before any parsing or tokenising
            parsed = parse_json(body)
            del body
            self._only(parsed, ("text", "text_pair") if task == SEQUENCE else ("text",))
            texts = self._strings(parsed, "text", "a sentence")
            pairs = self._pairs(parsed, texts) if task == SEQUENCE else None
            self._check_chars(texts, pairs)
            if pairs is None:
                encoded = await self.tokenized(self.model.encode, texts)
            else:
                encoded = await self.tokenized(self.model.encode_pairs, texts, pairs)
            self._check_length(encoded.truncated, "text" if pairs is None else "text pair")
            logits = await self.infer_rows(encoded.feeds, admission)
        return texts, encoded, logits

    async def tag(self, request: Request, name: str) -> Response:
        """Token classification: the entities of each text, with character offsets into it."""
        texts, encoded, logits = await self._text_logits(request, name, TOKEN, "tag")
        predictions = [{"entities": self.model.tag(row, encoding, text, self.model.labels), "truncated": cut}
                       for row, encoding, text, cut in zip(logits, encoded.encodings, texts, encoded.truncated,
                                                           strict=True)]
        return JSONResponse({"model_name": self.config.model_name, "model_version": VERSION,
                             "predictions": predictions})

    async def answer(self, request: Request, name: str) -> Response:
        """Extractive QA: for each question + context, the answer text, its character span and its score.

        A long context is read in overlapping windows (the doc stride), all of one request in one batch: the
        windows are counted on the tokens before any is made, and a request needing more than `max_batch` is
        refused, so the windows made are bounded by the batch, not by the text."""
        self.check_model(name)
        self.check_task(QA, "answer")
        body = await self.read_body(request)
        async with self.admitted() as admission:
            parsed = parse_json(body)
            del body
            self._only(parsed, ("question", "context"))
            questions = self._strings(parsed, "question", "a question")
            contexts = self._strings(parsed, "context", "a passage")
            if len(questions) != len(contexts):
                raise ServeError(400, f"{len(questions)} questions but {len(contexts)} contexts")
            limit = self.model.max_text_chars
            long = next((i for i, q in enumerate(questions) if len(q) > limit), None)
            if long is not None:
                raise ServeError(400, f"question {long} has {len(questions[long])} characters; a question must fit "
                                      f"in one window of {self.model.max_length} tokens")
            total, budget = sum(map(len, contexts)), CHARS_PER_TOKEN * self.max_request_tokens
            if total > budget:
                raise ServeError(400, f"the contexts hold {total} characters, more than the {budget} "
                                      f"({CHARS_PER_TOKEN} per token of the {self.max_request_tokens} tokens one "
                                      "request may run)")
            needed = await self.tokenized(self.model.question_windows, questions, contexts)
            if needed > self.config.max_batch:
                raise ServeError(400, f"the contexts need at least {needed} windows of {self.model.max_length} "
                                      f"tokens, more than the maximum batch of {self.config.max_batch}")
            try:
                encoded = await self.tokenized(self.model.encode_questions, questions, contexts)
            except ValueError as err:
                raise ServeError(400, str(err)) from None
            if len(encoded.question_of) > self.config.max_batch:
                raise ServeError(400, f"the contexts need {len(encoded.question_of)} windows of "
                                      f"{self.model.max_length} tokens, more than the maximum batch of "
                                      f"{self.config.max_batch}")
            combined = await self.infer_rows(encoded.feeds, admission)
        answers = self.model.answers(combined, encoded, contexts)
        return JSONResponse({"model_name": self.config.model_name, "model_version": VERSION,
                             "predictions": [{"answer": a.text, "start": a.start, "end": a.end, "score": a.score}
                                             for a in answers]})

    def _check_length(self, truncated: list[bool], what: str = "text") -> None:
        if self.config.reject_long_text and any(truncated):
            first = truncated.index(True)
            raise ServeError(400, f"{what} {first} is longer than the model maximum of {self.model.max_length} "
                                  "tokens (this server rejects long text instead of truncating it)")

    async def _embeddings(self, texts: list[str], admission: Admission) -> tuple[Encoded, np.ndarray]:
        """The encoding of texts already checked by `_strings` and their sentence embeddings [texts, hidden]."""
        self._check_chars(texts)
        encoded = await self.tokenized(self.model.encode, texts)
        self._check_length(encoded.truncated)
        return encoded, await self.infer_rows(encoded.feeds, admission)

    async def embed(self, request: Request, name: str) -> Response:
        """Sentence embeddings of {"text": ...}: the graph's pooled and normalised sentence_embedding per text."""
        self.check_model(name)
        self.check_task(FEATURE, "embed")
        body = await self.read_body(request)
        async with self.admitted() as admission:
            parsed = parse_json(body)
            del body
            self._only(parsed, ("text",))
            encoded, embeddings = await self._embeddings(self._strings(parsed, "text", "a sentence"), admission)
        predictions = [{"embedding": row.tolist(), "tokens": len(encoding.ids), "truncated": cut}
                       for row, encoding, cut in zip(embeddings, encoded.encodings, encoded.truncated, strict=True)]
        return JSONResponse({"model_name": self.config.model_name, "model_version": VERSION,
                             "predictions": predictions})

    async def openai_embeddings(self, request: Request) -> Response:
        """OpenAI's POST /v1/embeddings: `input` a string or a list of strings, `model` the served model's name,
        `encoding_format` float or base64 (little-endian float32 bytes, as OpenAI sends them); usage counts the
        tokens the model ran (special tokens included, after truncation)."""
        body = await self.read_body(request)
        async with self.admitted() as admission:
            parsed = parse_json(body)
            del body
            if not isinstance(parsed, dict):
                raise ServeError(400, "the request must be a JSON object with 'input' and 'model'")
            model = parsed.get("model")
            if not isinstance(model, str):
                raise ServeError(400, "'model' must name the served model "
                                      f"({self.config.model_name!r})", param="model")
            if model != self.config.model_name:
                raise ServeError(404, f"the model {model[:80]!r} does not exist; this server serves "
                                      f"{self.config.model_name!r}", param="model")
            if self.model.task != FEATURE:
                raise ServeError(400, f"the model {model!r} is a {self.model.task} model: it gives no embeddings",
                                 param="model")
            unknown = [key for key in parsed if key not in OPENAI_FIELDS]
            if unknown:  # a misspelt or unsupported field must not be ignored
                raise ServeError(400, f"unknown field {unknown[0][:60]!r}; this endpoint reads "
                                      f"{', '.join(map(repr, OPENAI_FIELDS))}", param=unknown[0][:60])
            encoding_format = parsed.get("encoding_format", "float")
            if encoding_format not in ENCODING_FORMATS:
                raise ServeError(400, f"encoding_format must be one of {', '.join(map(repr, ENCODING_FORMATS))}, "
                                      f"got {str(encoding_format)[:40]!r}", param="encoding_format")
            dimensions = parsed.get("dimensions")
            if dimensions is not None and dimensions != self.model.output_width:
                raise ServeError(400, f"dimensions must be {self.model.output_width} (this model's embedding size); "
                                      f"got {str(dimensions)[:40]}", param="dimensions")
            values = parsed.get("input")
            if isinstance(values, list) and values and all(isinstance(v, int | list) for v in values):
                raise ServeError(400, "token-id input is not supported: send text (a string or a list of strings)",
                                 param="input")
            try:
                texts = self._strings(parsed, "input", "a sentence")
                empty = next((i for i, text in enumerate(texts) if not text.strip()), None)
                if empty is not None:  # as OpenAI does: an empty text has no embedding worth paying for
                    raise ServeError(400, f"input {empty} is an empty string")
                encoded, embeddings = await self._embeddings(texts, admission)
            except ServeError as err:
                err.param = err.param or ("input" if err.status == 400 else None)
                raise
        tokens = sum(len(encoding.ids) for encoding in encoded.encodings)
        data = [{"object": "embedding", "index": index,
                 "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
                 if encoding_format == "base64" else row.tolist()}
                for index, row in enumerate(embeddings)]
        return JSONResponse({"object": "list", "data": data, "model": self.config.model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def classify(self, request: Request, name: str) -> Response:
        _, encoded, logits = await self._text_logits(request, name, SEQUENCE, "classify")
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
            await server.stop()  # uvicorn has finished (or abandoned) the in-flight requests by now

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
        return await server.observed("infer", lambda: server.infer(request, name, None), request)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def version_infer(name: str, version: str, request: Request) -> Response:
        return await server.observed("infer", lambda: server.infer(request, name, version), request)

    @app.post("/v2/models/{name}/classify")
    async def classify(name: str, request: Request) -> Response:
        return await server.observed("classify", lambda: server.classify(request, name), request)

    @app.post("/v2/models/{name}/tag")
    async def tag(name: str, request: Request) -> Response:
        return await server.observed("tag", lambda: server.tag(request, name), request)

    @app.post("/v2/models/{name}/answer")
    async def answer(name: str, request: Request) -> Response:
        return await server.observed("answer", lambda: server.answer(request, name), request)

    @app.post("/v2/models/{name}/embed")
    async def embed(name: str, request: Request) -> Response:
        return await server.observed("embed", lambda: server.embed(request, name), request)

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request) -> Response:
        return await server.observed("embeddings", lambda: server.openai_embeddings(request), request,
                                     error=openai_error)

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
