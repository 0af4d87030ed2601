"""uvicorn as qbert-serve runs it: what uvicorn gives is used, and only what it lacks is added here.

uvicorn gives: a connection limit (`limit_concurrency`: past it, requests get 503), the keep-alive timeout (an idle
connection is closed after its last answer), a bound on the size of request headers (h11's 16 KiB) and a graceful
shutdown with a timeout. It lacks:

- a deadline on request headers: a client that connects and sends nothing, or half a request line, or headers
  without the blank line, is held open for ever (the keep-alive timer runs only after an answer, and stops at the
  first byte of the next request). `HeaderDeadline` closes a connection whose request headers are not complete
  `header_timeout_s` after it opened or after its last answer;
- a stop that answers instead of cancelling: at the graceful timeout uvicorn cancels the requests still running,
  which answers them 500 text/plain while the batcher goes on to compute them. `GracefulServer` has the app answer
  them 503 at the timeout and drop their work (uvicorn's own timeout, a second later, is only a backstop); it also
  cuts body reads still waiting when the stop begins, so a stalled client does not hold the stop to its timeout;
- an exit status of 0 after a drain: uvicorn re-raises the signal it caught once it has drained, so the process dies
  of SIGTERM (143) and nothing after `run()` runs. `GracefulServer` keeps the signal to itself;
- a hook for "now accepting": `on_ready` runs once the listening socket accepts connections.

(The body deadline is the app's: `Server.read_body`.)
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from qbert_deploy.runtimes.serving.app import Server


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers (subclass it to set `header_timeout_s`)."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._answered: object = None  # the request cycle whose answer started the wait (None: a new connection)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_deadline is not None and self.cycle is not self._answered:
            self._stop_waiting()  # the headers of the next request are complete: the body has its own deadline

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()  # may already read the next, pipelined request
        if self.cycle is answered and not self.transport.is_closing():
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._stop_waiting()
        self._answered = self.cycle
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_late)

    def _stop_waiting(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_late(self) -> None:
        self._header_deadline = None
        if self.cycle is self._answered and not self.transport.is_closing():
            self.transport.close()  # no answer: like nginx's client_header_timeout, the connection just ends


def with_header_deadline(timeout_s: float) -> type[HeaderDeadline]:
    """The protocol class to give uvicorn.Config(http=...)."""
    return type("HeaderDeadlineH11", (HeaderDeadline,), {"header_timeout_s": timeout_s})


class GracefulServer(uvicorn.Server):
    """A uvicorn server whose stop is bounded by `graceful_timeout_s` from the signal, answered with JSON 503s
    past it, and ends the process normally; `on_ready` runs when the socket accepts connections."""

    def __init__(self, config: uvicorn.Config, app_server: Server, graceful_timeout_s: float,
                 on_ready: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.app_server = app_server
        self.graceful_timeout_s = graceful_timeout_s
        self.on_ready = on_ready
        self.stop_signal: int | None = None
        self._stop_asked: float | None = None  # time.monotonic() of the first signal
        self._loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own handler also records the signal, to raise it again after the drain; not here
        if self.stop_signal is None:
            self.stop_signal, self._stop_asked = sig, time.monotonic()
        if self.should_exit and sig == signal.SIGINT:  # a second Ctrl-C: stop now
            self.force_exit = True
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self.app_server.abandon)
        else:
            self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()  # the listening socket accepts from here on

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.app_server.begin_stop()
        asked = self._stop_asked if self._stop_asked is not None else time.monotonic()
        loop = asyncio.get_running_loop()  # loop.time() is time.monotonic()
        deadline = loop.call_at(asked + self.graceful_timeout_s, self.app_server.abandon)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()
