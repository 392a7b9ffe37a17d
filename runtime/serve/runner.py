"""The uvicorn runner of `mixtrt serve`: bind the socket, serve the app until SIGTERM / SIGINT, drain, exit 0.

    serve(ServeSettings("engines/tiny-mixtral-fp32"), host="127.0.0.1", port=8000)   # returns 0 after the drain
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.serve.app import ServeSettings, create_app, log
from mixtrt.runtime.serve.protocol import ApiError


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Run the server until SIGTERM / SIGINT; return 0 after a graceful drain (<= settings.drain_s for the
    open requests, then the engine loop's own drain). A failed load stops the server and raises its error."""
    import uvicorn

    server_process()
    failure: list[BaseException] = []

    def load_failed(e: BaseException) -> None:
        failure.append(e)
        server.should_exit = True

    app = create_app(settings, on_load_error=load_failed, freeze_gc=True)
    # the drain starts at the signal (the engine loop's deadline); uvicorn waits past it for the responses of
    # the requests cancelled at the deadline to be written, instead of cutting them at the same moment
    config = uvicorn.Config(app, lifespan="on", access_log=False, log_level="warning", log_config=None,
                            timeout_graceful_shutdown=int(settings.drain_s) + RESPONSE_GRACE_S,
                            **http_protocol(MAX_HEAD_BYTES))
    # uvicorn cancels the handlers still running past its graceful timeout (or at a second Ctrl-C) and logs each as
    # an "Exception in ASGI application" traceback: their requests' own log lines already say how they ended
    logging.getLogger("uvicorn.error").addFilter(_not_cancelled)

    def begin_drain(forced: bool) -> None:
        state = getattr(app.state, "mixtrt", None)
        if state is not None and forced:
            state.forced = True
        if state is not None and state.loop is not None:
            state.loop.begin_stop(settings.drain_s)

    server = _server(config, begin_drain)
    for sig in (signal.SIGINT, signal.SIGTERM):  # a signal before uvicorn takes them over (it may come as soon as
        signal.signal(sig, server.handle_exit)  # the listening line is out) stops the server as one after would
    sock = listen(host, port)
    bound = sock.getsockname()
    address = _unbracketed(host)
    url = f"http://[{address}]:{bound[1]}" if ":" in address else f"http://{address}:{bound[1]}"
    log.info(json.dumps({"event": "listening", "url": url, "model": settings.name}))
    server.run(sockets=[sock])
    if failure:
        raise failure[0]
    state = getattr(app.state, "mixtrt", None)
    if state is not None and state.loading:  # stopped while loading: a load cannot be interrupted, nor waited for
        log.info(json.dumps({"event": "stopped_while_loading", "artifact": str(settings.artifact)}))
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(0)  # not the interpreter's exit, which would run onnxruntime's teardown under the loading thread
    return 0


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket on host (a name, an IPv4 address, or an IPv6 one, bracketed or not) and port;
    a ConfigError naming the address where it cannot be had (in use, not this machine's, an unknown name)."""
    address = _unbracketed(host)
    try:
        return socket.create_server((address, port), family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                                    reuse_port=False)
    except OSError as e:  # socket.gaierror included
        why = str(e.strerror or e).split(" (while attempting")[0]  # create_server repeats the address
        raise ConfigError(f"cannot listen on {host} port {port}: {why}") from None


def _unbracketed(host: str) -> str:
    """An IPv6 address as URLs write it ("[::1]") without its brackets; any other host as given."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


MAX_HEAD_BYTES = 64 << 10  # a request's line and headers (nginx: 32 KiB in 4 buffers; uvicorn's h11: 16 KiB)


def http_protocol(limit: int) -> dict[str, Any]:
    """uvicorn.Config's HTTP options that bound a request's head (its line and headers) to `limit` bytes: past it,
    431 and the connection closed. uvicorn's httptools parser has no such bound, and it joins a header's pieces
    as they arrive, so a 64 MiB header held the event loop (every stream) for seconds; its h11 parser has one
    (`h11_max_incomplete_event_size`) but costs more event-loop time per streamed token."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools not installed: uvicorn's h11 parser, with its own bound
        return {"http": "h11", "h11_max_incomplete_event_size": limit}

    body = json.dumps(ApiError(f"the request's headers are over the limit of {limit} bytes", 431).body()).encode()
    reply = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
             b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)

    class BoundedHead(HttpToolsProtocol):
        _head = 0  # bytes of the request head read so far
        _tail = b""  # the head's last bytes read (an end-of-head mark split between two reads)
        _in_head = True  # between a request's first byte and the end of its headers

        def data_received(self, data: bytes) -> None:
            if self._in_head:  # counted before the parser sees them: the read that ends the head up to its end
                seen = self._tail + data
                ends = [i for i in (seen.find(b"\r\n\r\n"), seen.find(b"\n\n")) if i >= 0]
                n = min(ends) + (4 if seen.startswith(b"\r\n\r\n", min(ends)) else 2) - len(self._tail) if ends \
                    else len(data)
                if self._head + n > limit:
                    self.transport.write(reply)
                    self.transport.close()
                    return
                self._head += n
                self._tail = seen[-3:]
            was_in_head = self._in_head
            super().data_received(data)
            if self._in_head and not was_in_head:
                # a read that ended a body and began the next head (pipelining): that head's bytes in it are not
                # counted (the head's size is then underestimated by less than one read)
                self._head, self._tail = 0, b""

        def on_message_begin(self) -> None:
            self._in_head = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head, self._head, self._tail = False, 0, b""
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True  # what a kept-alive connection sends next is the next request's head
            super().on_message_complete()

    return {"http": BoundedHead}


RESPONSE_GRACE_S = 5  # after the drain deadline: time for the cancelled requests' responses to be written


def _server(config: Any, on_signal: Any = None) -> Any:
    """A uvicorn.Server whose SIGTERM / SIGINT start the engine's drain (on_signal(forced): forced is a second
    SIGINT, uvicorn's forced exit) and end the process normally after it (uvicorn re-raises the signal afterwards,
    which would exit with 128 + signal instead of 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if on_signal is not None:
                on_signal(self.should_exit and sig == signal.SIGINT)  # uvicorn's rule for its forced exit
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server(config)


def _not_cancelled(record: logging.LogRecord) -> bool:
    """A logging filter: False for a record whose exception is a CancelledError (uvicorn's cancelling at exit; its
    lifespan logs the traceback as the message)."""
    if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
        return False
    message = record.getMessage()
    return not (message.startswith("Traceback") and message.rstrip().endswith("CancelledError"))


class _JsonLines(logging.Formatter):
    """Each record one JSON line with its time first (`ts`, Unix seconds): the server's own lines are JSON objects
    already; any other (uvicorn's: an invalid HTTP request, an exception in the app) becomes {"event": "http",
    "level", "message"}, its traceback in "exc", so a log pipeline parses every line and loses nothing."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        body = None
        if record.name.startswith("mixtrt") and message.startswith("{"):
            try:
                body = json.loads(message)
            except ValueError:
                body = None
        if not isinstance(body, dict):
            body = {"event": "http" if record.name.startswith("uvicorn") else "log",
                    "level": record.levelname.lower(), "message": message}
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            body["stack"] = self.formatStack(record.stack_info)
        return json.dumps({"ts": round(record.created, 3), **body})


def server_process() -> None:
    """What a process that serves (`mixtrt serve`, each Ray replica) sets once: its JSON log lines on stderr, and
    no prometheus_client `*_created` series (they double the series a scrape reads; vLLM leaves them out)."""
    import prometheus_client

    log_to_stderr()
    prometheus_client.disable_created_metrics()


def log_to_stderr() -> None:
    """The server's request lines and uvicorn's own warnings: JSON lines on stderr."""
    for logger in (log, logging.getLogger("uvicorn")):
        if not any(getattr(h, "_mixtrt", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_JsonLines())
            handler._mixtrt = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.propagate = False
    log.setLevel(logging.INFO)
