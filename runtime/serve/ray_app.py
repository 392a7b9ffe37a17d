"""The server as a Ray Serve deployment: each replica loads the artifact and runs the same FastAPI app (its
own engine loop); Ray's proxy routes requests to replicas and streams their responses.

    mixtrt serve ARTIFACT --ray --replicas 2                            # a local Ray instance
    serve run mixtrt.runtime.serve.ray_app:app_builder artifact=/models/m replicas=2 max_batch=16
    ray start --head; mixtrt serve ARTIFACT --ray --replicas 4 --ray-address auto   # a cluster

A replica takes traffic once its artifact is loaded (loading happens in the replica's constructor).
Back-pressure is Ray's: a replica holds at most max_batch requests (`max_ongoing_requests`), at most
max_queue more wait in Ray's queue (`max_queued_requests`, 503 past it). The artifact path must be
readable at the same path on every node that runs a replica.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
from typing import Any

from ray import serve
from ray.serve import Application

from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.serve.app import ServeSettings, create_app, log


@serve.ingress()
class MixtrtReplica:
    """One replica: the artifact loaded in the constructor, the app built around it."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = ServeSettings(**settings)
        self.generator = self.settings.load_generator()

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.settings, generator=self.generator, freeze_gc=True)


def deployment(settings: ServeSettings, replicas: int = 1, num_cpus: float = 1.0) -> Application:
    """The bound application for serve.run: `replicas` copies of the server."""
    options = {"num_cpus": num_cpus}
    wrap = serve.deployment(name="mixtrt", num_replicas=replicas, max_ongoing_requests=settings.max_batch,
                            max_queued_requests=settings.max_queue, ray_actor_options=options)
    return wrap(MixtrtReplica).bind(dataclasses.asdict(settings))


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
    import ray

    from mixtrt.runtime.serve.runner import log_to_stderr
    from mixtrt.runtime.threads import available_cores

    if port == 0:
        raise ConfigError("--ray needs a fixed --port (Ray's proxy does not report a port it chose)")
    log_to_stderr()
    stop = threading.Event()
    previous: dict[int, Any] = {}
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=max(available_cores(), replicas), include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": host, "port": port})
        # after ray.init, which installs its own SIGTERM handler (a crash report, then abort)
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        serve.run(deployment(settings, replicas), name="mixtrt", route_prefix="/", blocking=False)
        log.info(json.dumps({"event": "listening", "url": f"http://{host}:{port}", "model": settings.name,
                             "ray": True, "replicas": replicas}))
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
