"""`mixtrt serve`: the OpenAI-compatible server (runtime/serve), or with --ray the same app on Ray Serve."""

from __future__ import annotations

import argparse
import os

from mixtrt.cli.options import at_least, path, threads


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port in [0, 65535] (0: any free port)")
    return int(text)


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= s <= 3600:
        raise argparse.ArgumentTypeError(f"{s} is not in [0, 3600] seconds")
    return s


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=path, help="artifact directory (written by `mixtrt export`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: any free port, logged)")
    p.add_argument("--max-batch", type=at_least(1), default=16,
                   help="requests' rows decoding together (engine/KV-cache rows; default 16)")
    p.add_argument("--max-queue", type=at_least(0), default=64,
                   help="rows that may wait for a free engine row; past it requests get 429 at once (default 64)")
    p.add_argument("--prefill-chunk", type=at_least(0), default=16, metavar="TOKENS",
                   help="while rows decode, an engine step prefills at most this many prompt tokens (a longer "
                        "prompt is split across steps), so a decoding stream waits for at most one chunk per "
                        "token; 0: no limit (default 16; larger: more tokens/s and sooner first tokens under "
                        "load, longer gaps in the running streams)")
    p.add_argument("--separate-prefill", action="store_true",
                   help="run each prompt chunk as a pass of its own beside the decode step (default: onnxruntime "
                        "runs it in the decode step's pass, one read of the weights for both)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize (/health and "
                   "/metrics stay open); default: the MIXTRT_API_KEY environment variable (which `ps` does not "
                   "show), else none")
    p.add_argument("--allowed-origins", nargs="*", default=["*"], metavar="ORIGIN",
                   help="origins whose browser pages may call the server (CORS; default: any, as vLLM and "
                        "llama-server allow; give none to turn CORS off)")
    p.add_argument("--model-name", default=None, help="the model name clients use (default: the artifact's folder)")
    p.add_argument("--threads", type=threads, default=None,
                   help="onnxruntime intra-op threads, 1 .. the available cores (default: all of them)")
    p.add_argument("--backend", default="onnxruntime", metavar="NAME",
                   help="onnxruntime (default: the CPU), triton or tensorrt, as for `mixtrt generate`")
    p.add_argument("--drain", type=_seconds, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, running requests get this long to finish before they are cancelled (default 30)")
    p.add_argument("--max-body-bytes", type=at_least(1), default=4 << 20,
                   help="request body limit in bytes (413 past it; default 4 MiB)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the artifact's files at load (sizes are still checked)")
    p.add_argument("--ray", action="store_true",
                   help="run on Ray Serve (needs mixtrt[ray]): --replicas copies, each loading the artifact")
    p.add_argument("--replicas", type=at_least(1), default=None, help="with --ray: replicas (default 1)")
    p.add_argument("--ray-address", default=None,
                   help="with --ray: an existing cluster (`ray start --head` prints it; default: a local instance)")


def run(ns: argparse.Namespace) -> int:
    from mixtrt.runtime.errors import ConfigError
    from mixtrt.runtime.serve.app import ServeSettings

    if not ns.ray and (ns.replicas is not None or ns.ray_address is not None):
        raise ConfigError("--replicas and --ray-address need --ray")
    from mixtrt.runtime.manifest import Manifest

    manifest = Manifest.read(ns.artifact)  # a path that is not an artifact is refused before the port is bound
    if manifest.args.head != "causal_lm":  # so is one of a head the server does not serve (it said "listening")
        from mixtrt.runtime.heads import wrong_head

        raise ConfigError(f"{ns.artifact}: {wrong_head(manifest.args, 'causal_lm')}")
    settings = ServeSettings(ns.artifact, model_name=ns.model_name, max_batch=ns.max_batch, max_queue=ns.max_queue,
                             api_key=ns.api_key if ns.api_key is not None else os.environ.get("MIXTRT_API_KEY") or None,
                             threads=ns.threads, backend=ns.backend, verify=not ns.no_verify,
                             max_body_bytes=ns.max_body_bytes, drain_s=ns.drain,
                             prefill_chunk=ns.prefill_chunk, mixed_steps=not ns.separate_prefill,
                             allowed_origins=tuple(ns.allowed_origins))
    if ns.ray:
        from mixtrt.runtime.extras import require

        require("ray", "`mixtrt serve --ray`")
        from mixtrt.runtime.serve.ray_app import serve_on_ray

        return serve_on_ray(settings, host=ns.host, port=ns.port, replicas=ns.replicas or 1, address=ns.ray_address)
    from mixtrt.runtime.serve.runner import serve

    return serve(settings, host=ns.host, port=ns.port)
