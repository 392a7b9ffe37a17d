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
        # Ray's proxy answers with the request's id (the client's as sent, else its own): the one header, the body's id
        for given in ("lb id 9", None):
            r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1},
                          headers={"X-Request-Id": given} if given else {})
            [rid] = r.headers.get_list("x-request-id")
            assert r.status_code == 200 and r.json()["id"] == "cmpl-" + rid and rid == (given or rid), r.headers
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


def _ray_cli(artifact, port: int, *extra: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mixtrt", "serve", str(artifact), "--ray", "--port", str(port),
                             "--threads", "1", "--model-name", "tiny", *extra],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow  # ~50 s on 2 cores: Ray's start, two replicas loading, a drain, Ray's shutdown
def test_cli_on_ray_logs_each_request_and_sigterm_lets_a_running_stream_finish(serve_artifact):
    """`mixtrt serve --ray`: every line of the replicas' JSON lines reaches its stderr without Ray's prefix (Ray
    folded alike lines of two replicas into one before: 5 request lines of 11 came through), and SIGTERM drains
    (Ray's graceful shutdown given --drain): a running stream ends whole, then the process exits 0."""
    import json
    import signal

    port = _free_port()
    proc = _ray_cli(serve_artifact[1], port, "--drain", "30", "--replicas", "2")
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT)
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the deployment never became ready"
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        for _ in range(6):  # alike requests, alike log lines, from either replica
            assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
        body = {"model": "tiny", "prompt": "a", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2], rest[-3:]
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        # nothing on stdout (Ray's own shutdown line went there, in colour), no colour codes on a piped stderr
        assert out == "" and "\x1b[" not in err, (out, err[-1000:])
        records = [json.loads(line) for line in err.splitlines() if line.startswith('{"ts"')]
        requests = [r for r in records if r["event"] == "request"]
        assert len(requests) == 7 and sum(r["completion_tokens"] == 2 for r in requests) == 6, requests
        [request] = [r for r in requests if r["completion_tokens"] != 2]
        assert (request["end"], request["completion_tokens"], request["finish"]) == ("finished", 100, ["length"])
        assert [r["event"] for r in records if r["event"] == "ready"] == ["ready", "ready"]
        http.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow  # ~25 s: Ray's start, a replica failing its load, Ray's shutdown
def test_cli_on_ray_a_replica_that_cannot_load_the_artifact_is_one_line_naming_why(serve_artifact, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(serve_artifact[1], bad)
    data = bad / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    proc = _ray_cli(bad, _free_port())
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last == f"mixtrt serve: error: the Ray deployment failed: {data}: sha256 does not match the manifest; " \
                   "the file was modified", last


@pytest.mark.slow  # ~25 s: Ray's start, another application, the CLI joining, its drain
def test_cli_joining_a_cluster_leaves_the_clusters_other_applications(serve_artifact):
    """`mixtrt serve --ray --ray-address ADDR` on a cluster whose Serve holds another application: SIGTERM removes
    mixtrt's application and leaves Ray Serve and the other one running (serve.shutdown took them all down)."""
    import signal
    import tempfile

    from ray import serve

    temp = tempfile.TemporaryDirectory(prefix="mixtrt-ray-")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp.name)
    proc = None
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})

        @serve.deployment(ray_actor_options={"num_cpus": 0.1})
        class Other:
            async def __call__(self, request: object) -> str:
                return "other"

        serve.run(Other.bind(), name="other", route_prefix="/other")
        proc = _ray_cli(serve_artifact[1], port, "--ray-address", ray.get_runtime_context().gcs_address)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT)
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the deployment never became ready"
            if "mixtrt" in serve.status().applications and http.get("/health").status_code == 200:
                break
            time.sleep(0.5)
        assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert set(serve.status().applications) == {"other"}
        assert http.get("/other").text == "other"
        http.close()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        serve.shutdown()
        ray.shutdown()
        temp.cleanup()
