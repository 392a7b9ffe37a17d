"""A real uvicorn server on loopback (a random free port) per test module, over an artifact exported once
per session; clients are the official `openai` package and httpx."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server tests need mixtrt[serve]")
pytest.importorskip("openai", reason="the server tests use the official openai client (mixtrt[test])")

import httpx2 as httpx  # noqa: E402  (the HTTP client openai itself uses)
import openai  # noqa: E402
import uvicorn  # noqa: E402

from mixtrt.runtime.generation import Generator, primed_stream  # noqa: E402
from mixtrt.runtime.serve.app import ServeSettings, create_app  # noqa: E402
from mixtrt.runtime.serve.runner import MAX_HEAD_BYTES, http_protocol  # noqa: E402

TIMEOUT = 30.0  # every client call is bounded


@pytest.fixture(scope="session")
def serve_artifact(tmp_path_factory):
    """(checkpoint, artifact): the tiny windowed Mixtral of tests.checkpoints, 128 positions."""
    from tests.checkpoints import EXPORT_CASES, export_cases

    root = tmp_path_factory.mktemp("serve")
    return export_cases(root, {"mixtral-window": EXPORT_CASES["mixtral-window"]},
                        max_position_embeddings=128)["mixtral-window"]


@pytest.fixture(scope="session")
def generator(serve_artifact) -> Generator:
    """Loaded as `mixtrt serve` loads it: prompt chunks run in the decode step's pass (mixed steps)."""
    return Generator.load(serve_artifact[1], threads=1, mixed_steps=True)


class SlowBackend:
    """The real backend with a pause before every step: keeps rows busy long enough to act on them."""

    def __init__(self, backend: Any, pause_s: float) -> None:
        self._backend, self.pause_s = backend, pause_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.pause_s)
        return self._backend.step(*args, **kwargs)

    def step_mixed(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.pause_s)
        return self._backend.step_mixed(*args, **kwargs)


class SeparateSteps:
    """The real backend without its mixed steps: a server's prompt chunks then run as passes of their own."""

    mixed_steps = False

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


def slow(gen: Generator, pause_s: float = 0.02) -> Generator:
    return Generator(SlowBackend(gen.backend, pause_s), gen.tokenizer, gen.defaults)


class Server:
    """create_app served by uvicorn in a thread; `openai` and `http` clients bound to it."""

    def __init__(self, generator: Generator | None, artifact: Any, wait: bool = True, app_options: Any = None,
                 proxy: Any = None, sndbuf: int | None = None, **settings: Any) -> None:
        """app_options: more create_app keywords; proxy: an ASGI middleware class the app is served behind;
        sndbuf: the connections' kernel send buffer (fixed, not grown by the kernel: a client that stops reading
        blocks the server's writes after that much)."""
        self.settings = ServeSettings(artifact, model_name="tiny", drain_s=2.0, **settings)
        self.app = create_app(self.settings, generator=generator, **(app_options or {}))
        served = self.app if proxy is None else proxy(self.app)
        self.server = uvicorn.Server(uvicorn.Config(served, lifespan="on", log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2, **http_protocol(MAX_HEAD_BYTES)))
        sock = socket.create_server(("127.0.0.1", 0))
        if sndbuf is not None:  # accepted connections inherit it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        self.http = httpx.Client(base_url=self.url, timeout=TIMEOUT)
        key = settings.get("api_key") or "unused"
        self.openai = openai.OpenAI(base_url=self.url + "/v1", api_key=key, timeout=TIMEOUT, max_retries=0)
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.http.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.02)

    def metric(self, name: str, **labels: str) -> float:
        """A sample of /metrics (labels other than model_name given as keywords)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.http.get("/metrics").text):
            for sample in family.samples:
                extra = {k: v for k, v in sample.labels.items() if k != "model_name"}
                if sample.name == name and extra == labels:
                    return float(sample.value)
        return 0.0

    def close(self) -> None:
        self.http.close()
        self.openai.close()
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def server(generator, serve_artifact) -> Iterator[Server]:
    s = Server(generator, serve_artifact[1], max_batch=16, max_queue=64)
    yield s
    s.close()


def continuation(gen: Generator, prompt: str | list[int], out: Any) -> str:
    """The text a completion of `prompt` returns for the generated ids of `out`: it continues the prompt's text
    (a word's leading space kept), where GenerationOutput.text is the decode of the generated ids alone."""
    ids = prompt if isinstance(prompt, list) else gen.tokenizer.encode(prompt)
    stream = primed_stream(gen.tokenizer, ids)
    return "".join(stream.put(t) for t in out.token_ids) + stream.flush()
