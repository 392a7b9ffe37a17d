"""The app on Ray Serve: a local Ray instance, 2 replicas, concurrent streaming clients through the openai
client with the Generator's outputs, and a clean shutdown in bounded time."""

from __future__ import annotations

import socket
import threading
import time

import pytest

ray = pytest.importorskip("ray", reason="the Ray Serve test needs mixtrt[ray]")
pytest.importorskip("ray.serve", reason="the Ray Serve test needs ray[serve] (mixtrt[ray])")

import openai  # noqa: E402

from mixtrt.runtime.serve.app import ServeSettings  # noqa: E402
from tests.serve.conftest import TIMEOUT, continuation, httpx  # noqa: E402


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@pytest.mark.slow  # ~20 s on 2 cores (more under load): Ray's start, two replicas loading, its shutdown
def test_two_replicas_stream_concurrently_and_shut_down(serve_artifact, generator):
    import tempfile

    from ray import serve

    from mixtrt.runtime.serve.ray_app import deployment

    port = _free_port()
    temp = tempfile.TemporaryDirectory(prefix="mixtrt-ray-")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp.name)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings(serve_artifact[1], model_name="tiny", max_batch=4, max_queue=16, threads=1)
        serve.run(deployment(settings, replicas=2, num_cpus=0.5), name="mixtrt", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=url, timeout=TIMEOUT)
        deadline = time.monotonic() + 120
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the replicas never became ready"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
        prompts = ["The capital of France is", "Once upon a time", "a", "Hello, my name is", "b c d", "x"] * 2
        want = [continuation(generator, p, generator.generate([p], max_new_tokens=12, do_sample=False)[0])
                for p in prompts]
        got: list[str | None] = [None] * len(prompts)
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=12, temperature=0,
                                                   stream=True)
                got[i] = "".join(c.choices[0].text for c in stream)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
        assert not errors, errors
        assert got == want
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=5, temperature=0)
        assert chat.choices[0].message.content == generator.chat([{"role": "user", "content": "Hi"}],
                                                                 max_new_tokens=5, do_sample=False).text
        status = serve.status().applications["mixtrt"].deployments["mixtrt"]
        assert status.replica_states.get("RUNNING") == 2
        http.close()
        client.close()
        t0 = time.monotonic()
        serve.shutdown()
        assert time.monotonic() - t0 < 60
    finally:
        ray.shutdown()
        temp.cleanup()
