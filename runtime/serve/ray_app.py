"""The server as a Ray Serve deployment: each replica loads the artifact and runs the same FastAPI app (its
own engine loop); Ray's proxy routes requests to replicas and streams their responses.

    mixtrt serve ARTIFACT --ray --replicas 2                            # a local Ray instance
    serve run mixtrt.runtime.serve.ray_app:app_builder artifact=/models/m replicas=2 max_batch=16
    ray start --head; mixtrt serve ARTIFACT --ray --replicas 4 --ray-address auto   # a cluster

A replica takes traffic once its artifact is loaded (loading happens in the replica's constructor; a load
that fails is retried at most CONSTRUCTOR_RETRIES times, not Ray's default 20: a corrupt artifact does not heal).
Back-pressure is Ray's: a replica holds at most max_batch requests (`max_ongoing_requests`), at most
max_queue more wait in Ray's queue (`max_queued_requests`; past it 429 with Retry-After, as the plain server
answers a full queue, though with Ray's plain-text body). The artifact path must be readable at the same path on
every node that runs a replica.

Each replica writes the server's JSON log lines to its stderr (Ray's worker logs on its node; `mixtrt serve
--ray` forwards them to its own stderr, without Ray's `(name pid=N)` prefix); Ray's own per-request access log is
off. Stopping: Ray's graceful shutdown, given `drain_s` (+ the plain server's grace for writing responses): a
replica takes no new requests and waits for its running ones, then Ray stops it, cutting what still runs (the
plain server ends those with an error event instead); a second SIGTERM / Ctrl-C stops everything at once. That is
`mixtrt serve --ray`'s stop (the application deleted while the proxy stays, then Ray shut down); Ray's own `serve
run` takes the proxy down at its signal, cutting running streams whatever drain_s says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

# Ray folds log lines that look alike from different workers into one before it forwards them (its default): the
# replicas' request lines are alike but for their numbers, and every one of them is kept. Read when ray is imported.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from ray import serve  # noqa: E402  (after the setting above)
from ray.serve import Application  # noqa: E402

from mixtrt.runtime.errors import ArtifactError, ConfigError, first_line  # noqa: E402
from mixtrt.runtime.manifest import Manifest  # noqa: E402
from mixtrt.runtime.serve.app import ServeSettings, create_app, log  # noqa: E402


@serve.ingress()
class MixtrtReplica:
    """One replica: the artifact loaded in the constructor, the app built around it."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from mixtrt.runtime.serve.runner import server_process

        server_process()  # the replica's own process: its logger has no handler there yet
        self.settings = ServeSettings(**settings)
        start = time.perf_counter()
        self.generator = self.settings.load_generator()
        self.load_s = time.perf_counter() - start

    def __serve_build_asgi_app__(self) -> Any:
        # Ray's proxy gives each request its X-Request-Id and answers with it (the app takes it, adds none), and
        # cancels the handler of a client that left
        return create_app(self.settings, generator=self.generator, freeze_gc=True, load_s=self.load_s,
                          behind_proxy=True)


def deployment(settings: ServeSettings, replicas: int = 1, num_cpus: float = 1.0) -> Application:
    """The bound application for serve.run: `replicas` copies of the server."""
    from ray.serve.config import BackpressureConfig
    from ray.serve.schema import LoggingConfig

    from mixtrt.runtime.serve.runner import RESPONSE_GRACE_S

    options = {"num_cpus": num_cpus}
    wrap = serve.deployment(
        name="mixtrt", num_replicas=replicas, max_ongoing_requests=settings.max_batch,
        max_queued_requests=settings.max_queue, ray_actor_options=options,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        graceful_shutdown_timeout_s=settings.drain_s + RESPONSE_GRACE_S, graceful_shutdown_wait_loop_s=0.5,
        max_constructor_retry_count=CONSTRUCTOR_RETRIES,
        # each request's JSON line says more than Ray's access line; Ray's own lines: warnings and errors
        logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"))
    return wrap(MixtrtReplica).bind(dataclasses.asdict(settings))


CONSTRUCTOR_RETRIES = 2
LOG_FORWARD_S = 1.0  # Ray's log monitor reads the workers' log files every 0.1 s when idle


def _flag(value: Any) -> bool:
    return str(value).lower() not in ("0", "false", "no")


def _origins(value: Any) -> tuple[str, ...]:
    """A list, or a comma-separated string (a config file's or `serve run`'s key=value)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(o).strip() for o in items if str(o).strip())


_ARGS = {"artifact": str, "backend": str, "model_name": str, "max_batch": int, "max_queue": int, "api_key": str,
         "threads": int,
         "verify": _flag, "max_body_bytes": int, "drain_s": float, "prefill_chunk": int, "mixed_steps": _flag,
         "allowed_origins": _origins}


def app_builder(args: dict[str, Any]) -> Application:
    """The import path for `serve run` and Ray Serve config files: args are ServeSettings fields (artifact
    required) plus `replicas` and `num_cpus` (per replica)."""
    args = dict(args)
    replicas, num_cpus = int(args.pop("replicas", 1)), float(args.pop("num_cpus", 1.0))
    unknown = sorted(set(args) - set(_ARGS))
    if unknown or "artifact" not in args:
        raise ConfigError(f"mixtrt ray app: needs artifact=PATH; unknown arguments {unknown}; known: "
                          f"{sorted(_ARGS) + ['num_cpus', 'replicas']}")
    settings = ServeSettings(**{k: _ARGS[k](v) for k, v in args.items()})  # type: ignore[operator]
    return deployment(settings, replicas, num_cpus)


def serve_on_ray(settings: ServeSettings, host: str, port: int, replicas: int, address: str | None = None) -> int:
    """`mixtrt serve --ray`: start (or join) Ray, run the deployment, wait for SIGTERM / SIGINT, shut down."""
    from mixtrt.runtime.serve.runner import listen, log_to_stderr

    if port == 0:
        raise ConfigError("--ray needs a fixed --port (Ray's proxy does not report a port it chose)")
    log_to_stderr()
    if not address:  # a local instance: the proxy listens here, and the replicas load the artifact here
        listen(host, port).close()  # a port in use: one line now, not Ray's traceback later
        Manifest.read(settings.artifact)  # a missing or malformed artifact: the same
    if not sys.stderr.isatty():  # Ray colours the prefix of the lines it forwards, for a terminal or not
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # Ray forwards lines of its own that it does not mark as errors to the driver's stdout (at shutdown, its
    # controller's "(raylet) Task ServeController.graceful_shutdown failed ... killed by `ray.kill`": the
    # controller ending itself); the server writes nothing there, so its stdout stays empty: log lines go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        return _run_on_ray(settings, host, port, replicas, address)


def _run_on_ray(settings: ServeSettings, host: str, port: int, replicas: int, address: str | None) -> int:
    import ray

    from mixtrt.runtime.threads import available_cores

    stop = threading.Event()
    previous: dict[int, Any] = {}
    try:
        # the replicas' stderr (their JSON log lines) reaches this process's; a job logging config makes Ray
        # forward worker lines without its "(name pid=N)" prefix; Serve's own lines: warnings and errors only
        kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True,
                                  logging_config=ray.LoggingConfig(encoding="TEXT", log_level="WARNING"))
        if address:
            try:
                ray.init(address=address, **kw)
            except ConnectionError as e:  # an OSError naming no file: said as what it is, not as an output error
                raise ConfigError(f"--ray-address {address}: {first_line(e)}") from None
        else:
            ray.init(num_cpus=max(available_cores(), replicas), **kw)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        # after ray.init, which installs its own SIGTERM handler (a crash report, then abort)
        def on_signal(*_: Any) -> None:
            if stop.is_set():  # a second one: no drain (serve.shutdown below, at once)
                raise KeyboardInterrupt
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            serve.run(deployment(settings, replicas), name="mixtrt", route_prefix="/", blocking=False)
        except Exception as e:  # Ray's message names no cause; the deployment's status holds the replicas' error
            raise ArtifactError(f"the Ray deployment failed: {_deploy_error(e)}") from None
        log.info(json.dumps({"event": "listening", "url": f"http://{host}:{port}", "model": settings.name,
                             "ray": True, "replicas": replicas}))
        stop.wait()
        # the drain: the replicas take no new requests and finish their running ones (at most drain_s and the
        # grace for writing responses, Ray's graceful shutdown), while the proxy still carries their responses
        serve.delete("mixtrt")
        time.sleep(LOG_FORWARD_S)  # the replicas' last lines, in their log files, reach this process's stderr
    finally:
        # Ray Serve itself goes down with the last application: on a cluster it may hold others' (`serve run`'s
        # stop takes them all down; this leaves them running)
        deployed = _applications() if ray.is_initialized() else None  # Serve's calls would start a Ray of their own
        if deployed and set(deployed) != {"mixtrt"}:
            if "mixtrt" in deployed:  # a failed deployment, a second signal: ours goes, not at once (Ray deletes it)
                with contextlib.suppress(Exception):
                    serve.delete("mixtrt", _blocking=False)
        elif deployed is not None:
            serve.shutdown()
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _applications() -> list[str]:
    """The Serve applications deployed (this one, "mixtrt", and on a shared cluster others'); none where Serve's
    status is not readable (it was not started, or is gone)."""
    try:
        return list(serve.status().applications)
    except Exception:  # Ray's errors of a Serve instance that is not there
        return []


def _deploy_error(e: BaseException) -> str:
    """The cause of a failed deployment, one line: the last line of the replicas' error in its status (the
    exception a replica's constructor raised), else Ray's own message's first line."""
    try:
        message = serve.status().applications["mixtrt"].deployments["mixtrt"].message
    except Exception:  # no status to read: Ray's message is all there is
        message = ""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "Error:" in line), lines[-1] if lines else "")
    if cause.startswith("mixtrt.runtime.errors."):  # one of ours: its message is the line (as the plain server's)
        cause = cause.split(": ", 1)[-1]
    return cause or str(e).strip().splitlines()[0]
