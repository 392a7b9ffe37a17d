"""`mixtrt build`: a TensorRT engine added to an artifact (export/tensorrt_build.py)."""

from __future__ import annotations

import argparse

from mixtrt.cli.options import path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=path, help="artifact directory (written by `mixtrt export`)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the engine serves (default 8)")
    p.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0-5",
                   help="TensorRT builder optimisation level (default 3; 0 builds fastest)")
    p.add_argument("--timing-cache", type=path, default=None, metavar="FILE",
                   help="TensorRT timing cache: read if it exists, written after the build")
    p.add_argument("--force", action="store_true", help="rebuild when the artifact already holds an engine")


def run(ns: argparse.Namespace) -> int:
    from mixtrt.export.tensorrt_build import build_engine

    build_engine(ns.artifact, max_batch=ns.max_batch, opt_level=ns.opt_level, timing_cache=ns.timing_cache,
                 force=ns.force)
    return 0
