"""mixtrt: Mistral / Mixtral checkpoints -> ONNX artifacts with MoE and sliding-window-attention ops,
run on ONNX Runtime (CPU) or TensorRT.

The package's subpackages live in the repository's top-level folders (this folder links them):
`mixtrt.runtime` (runtime/, torch-free), `mixtrt.export` (export/), `mixtrt.plugins` (plugins/); the
command line is `mixtrt.cli`. Importing `mixtrt` imports nothing else.

It turns onnxruntime's own telemetry off (ORT_DISABLE_TELEMETRY=1, unless the environment sets it): onnxruntime
1.29+ looks up and uploads to Microsoft's servers from inside a run and writes a device id under ~/.cache, and a
runtime that reads a local artifact makes no network requests (edge and air-gapped deployments).
"""

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixtrt")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0.0.0+unknown"


__version__ = _version()
