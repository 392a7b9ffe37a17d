"""Backends by name: one registry, read by the loader, the exporter's cache plan and the CLI.

    >>> sorted(BACKENDS)
    ['onnxruntime', 'tensorrt', 'triton']
    >>> BACKENDS["onnxruntime"].window_slack
    16

An artifact's manifest lists the backends that can run it (`backends`); `load_backend` refuses others
with a message naming them, and a backend whose extra is not installed with the extra to install.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtrt.runtime.backends.base import Backend, Cache, PassBackend
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.extras import require

__all__ = ["BACKENDS", "EXPORT_BACKENDS", "Backend", "BackendInfo", "Cache", "PassBackend", "load_backend",
           "window_slack"]


@dataclass(frozen=True)
class BackendInfo:
    target: str  # "module:Class"; the class has `from_artifact(directory, manifest, **options)`
    extra: str  # the extra providing its dependencies (extras.EXTRAS)
    window_slack: int  # cache rows it needs beyond the window in the windowed layout
    summary: str
    mixed_steps: bool = False  # takes the `mixed_steps` option (a prompt chunk in the decode step's pass)


BACKENDS: dict[str, BackendInfo] = {
    "onnxruntime": BackendInfo(
        "mixtrt.runtime.backends.onnxruntime:OrtBackend", "base",
        # onnxruntime's windowed attention compacts its buffer once the slack is used up (every `slack`
        # decode steps), so the slack trades copies for memory (onnxruntime-genai uses 16 as well)
        16, "ONNX Runtime on the CPU: the artifact's model.onnx", mixed_steps=True),
    # torch + our Triton kernels over the graph's weights (a ring cache: no slack); imported only from here, so
    # the onnxruntime path stays torch-free
    "triton": BackendInfo(
        "mixtrt.runtime.backends.triton_backend:TritonBackend", "gpu",
        0, "torch + the Triton kernels on CUDA (or the CPU under the Triton interpreter): model.onnx's weights"),
    # the artifact's engine.plan (`mixtrt build` adds it and lists this backend in the manifest); needs torch too
    "tensorrt": BackendInfo(
        "mixtrt.runtime.backends.tensorrt_backend:TensorRTBackend", "tensorrt",
        0, "TensorRT: the engine `mixtrt build` added to the artifact, with our plugins (not run yet)"),
}


# The backends an exported artifact serves (the exporter writes them into the manifest).
EXPORT_BACKENDS: tuple[str, ...] = ("onnxruntime", "triton")


def window_slack(backends: list[str] | tuple[str, ...]) -> int:
    """The slack a windowed cache needs to serve every backend in `backends`."""
    return max(BACKENDS[b].window_slack for b in backends)


def load_backend(name: str, directory: str | Path, *, verify: bool = True, head: str | None = None,
                 **options: Any) -> Backend:
    """The backend `name` running the artifact in `directory` (its manifest read and its files checked): a
    Backend for a causal LM, a PassBackend for the other heads (onnxruntime's one class is both). `head`: the
    head the caller runs; an artifact of another one is refused, naming what fits, before the backend loads."""
    import os

    from mixtrt.runtime.manifest import Manifest

    if not isinstance(directory, (str, os.PathLike)) or not isinstance(os.fspath(directory), str):
        raise ConfigError(f"the artifact must be a path (str or os.PathLike of str), got {type(directory).__name__}")
    if name not in BACKENDS:
        raise ConfigError(f"backend={name!r} is not supported; choose one of {sorted(BACKENDS)}")
    info = BACKENDS[name]
    manifest = Manifest.load(directory, verify=verify)
    if head is not None and manifest.args.head != head:
        from mixtrt.runtime.heads import wrong_head

        raise ConfigError(f"{directory}: {wrong_head(manifest.args, head)}")
    if name not in manifest.backends:
        hint = {"tensorrt": f" (`mixtrt build {directory}` adds a TensorRT engine, on a GPU, with "
                            "pip install 'mixtrt[tensorrt]')",
                "triton": " (artifacts exported before the triton backend list only onnxruntime: export it again)"
                if manifest.args.head == "causal_lm" else " (the triton backend runs causal LMs only)"}.get(name, "")
        raise ConfigError(f"{directory}: this artifact runs on {', '.join(manifest.backends)}, not on {name}{hint}")
    require(info.extra, f"the {name} backend")
    if not info.mixed_steps:
        options.pop("mixed_steps", None)  # a backend without mixed steps runs a server's steps apart
    module, cls = info.target.split(":")
    return getattr(importlib.import_module(module), cls).from_artifact(Path(directory), manifest, **options)
