"""`mixtrt export`: a checkpoint -> an artifact directory (export_onnx)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixtrt.runtime.precision import PRECISIONS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (config.json + *.safetensors, or params.json)")
    p.add_argument("--out", type=Path, default=None, help="artifact directory (default: engines/<name>-<precision>)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    p.add_argument("--max-context", type=int, default=None,
                   help="positions the artifact serves; the KV cache length of models without a sliding window "
                        "(default: max_position_embeddings with a window, else min(it, 4096))")
    p.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run(ns: argparse.Namespace) -> int:
    from mixtrt.export.onnx_export import export_onnx

    export_onnx(ns.checkpoint, ns.out, precision=ns.precision, max_context=ns.max_context, overwrite=ns.force,
                progress=None if ns.quiet else print)
    return 0
