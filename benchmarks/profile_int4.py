"""One Mistral-shaped int4 decode step op by op: mixtrt int4 (defaults: INT8 vocabulary tables), mixtrt int4 with
the lm_head in INT4 (`--int8 embed_tokens`, onnxruntime-genai's choice) and onnxruntime-genai int4, all built from the
same checkpoint (benchmarks/common.py's random 0.02-init Mistral shape).

Each engine runs in its own process at 1 intra-op thread (so the step runs on the calling thread and its thread CPU
time is the step's cost, whatever else loads the machine): a 128-token prompt, then --steps greedy decode steps
under onnxruntime's profiler. Per category, ms per step = the category's share of the profiled decode span (kernel
times; the rest is the executor between nodes and the host code between runs: Python for mixtrt, C++ for genai) x
the thread CPU time per step measured in the same process. Engines interleaved, --reps passes; thread CPU is the
median, shares the mean. Needs the peers (benchmarks/setup_peers.sh, MIXTRT_PEERS_DIR).

    .venv/bin/python benchmarks/profile_int4.py [--steps 150] [--reps 2]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = 128


def positive(text: str) -> int:
    """argparse's type for --steps / --reps. Not common's `positive`: the genai child parses its arguments in the
    peers' venv, which has no mixtrt for common to import."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def prompt_row() -> list[int]:
    import numpy as np

    return [1, *np.random.default_rng(1).integers(3, 32000, size=PROMPT - 1).tolist()]


def child_mixtrt(artifact: str, steps: int, prefix: str) -> dict:
    import numpy as np
    import onnxruntime as ort

    from mixtrt.runtime.backends.onnxruntime import OrtBackend

    class Profiled(OrtBackend):
        """The backend's own session, rewrites included, under onnxruntime's profiler."""

        def session_options(self, threads: int | None) -> ort.SessionOptions:
            opts = super().session_options(threads)
            opts.inter_op_num_threads = 1
            opts.enable_profiling, opts.profile_file_prefix = True, prefix
            return opts

    be = Profiled.load(artifact, threads=1, verify=False)
    cache = be.new_cache(1)
    tok = int(be.step(cache, np.asarray([prompt_row()]), last_only=True)[0, -1].argmax())
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        tok = int(be.step(cache, np.asarray([[tok]]))[0, -1].argmax())
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    return {"profile": be.session.end_profiling(), "cpu_ms": cpu / steps * 1e3, "wall_ms": wall / steps * 1e3}


def child_genai(model_dir: str, steps: int, prefix: str) -> dict:
    import onnxruntime_genai as og

    config = og.Config(model_dir)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": 1, "inter_op_num_threads": 1, "enable_profiling": prefix}}}}))
    model = og.Model(config)
    row = prompt_row()
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max(len(row) + steps + 1, 512),
                              min_length=len(row) + steps + 1)
    gen = og.Generator(model, params)
    gen.append_tokens(row)
    gen.generate_next_token()
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        gen.generate_next_token()
        gen.get_next_tokens()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    del gen, model  # the profile is written when the session closes
    return {"profile": max(glob.glob(prefix + "*.json"), key=os.path.getmtime), "cpu_ms": cpu / steps * 1e3,
            "wall_ms": wall / steps * 1e3}


def category(op: str, node: str) -> str:
    if op == "MatMulNBits":
        if "lm_head" in node:
            return "MatMulNBits lm_head"
        return "MatMulNBits q/k/v/o" if "/attention/" in node or "/attn/" in node else "MatMulNBits gate/up/down"
    if op == "GroupQueryAttention":
        return "GroupQueryAttention"
    if op in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Add"):
        return "RMSNorm, residual Add"
    if op in ("QuickGelu", "Sigmoid", "Mul"):
        return "SwiGLU (QuickGelu / Sigmoid, Mul)"
    return "embedding, mask, positions"


def shares(profile: str) -> tuple[dict[str, float], dict[str, int]]:
    """Each category's share of the decode span (the prompt's run left out) and its nodes per step."""
    events = json.loads(Path(profile).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][1:]
    t0, span = runs[0]["ts"], runs[-1]["ts"] + runs[-1]["dur"] - runs[0]["ts"]
    time_, nodes = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0:
            c = category(e["args"]["op_name"], e["name"])
            time_[c] += e["dur"]
            nodes[c] += 1
    return {c: d / span for c, d in time_.items()}, {c: n // len(runs) for c, n in nodes.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=positive, default=150)
    ap.add_argument("--reps", type=positive, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mixtrt-bench"))
    ap.add_argument("--child", choices=["mixtrt", "genai"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:  # the genai child runs in the peers' venv: nothing from mixtrt at module level
        fn = child_mixtrt if ns.child == "mixtrt" else child_genai
        print(json.dumps(fn(ns.path, ns.steps, ns.prefix)))
        return

    sys.path.insert(0, str(HERE))
    from common import make_benchmark_checkpoint
    from peers import _peers, genai_model_from_checkpoint

    from mixtrt.export.onnx_export import export_onnx, is_current
    from mixtrt.export.quantize import INT8_DEFAULT, Int4Options
    from mixtrt.runtime.manifest import Manifest

    ckpt = make_benchmark_checkpoint("mistral", ns.work)
    engines: dict[str, tuple[str, Path]] = {}
    for label, name, int8 in (("mixtrt int4", "mistral-int4", INT8_DEFAULT),
                              ("mixtrt int4, lm_head INT4", "mistral-int4-lmhead4", ("embed_tokens",))):
        art = ns.work / name
        if not is_current(art, ckpt) or Manifest.read(art).precision != "int4" \
                or tuple(sorted(Manifest.read(art).quantization.int8)) != tuple(sorted(int8)):
            export_onnx(ckpt, art, precision="int4", int4=Int4Options(int8=int8), overwrite=True, progress=None)
        engines[label] = ("mixtrt", art)
    genai, why = genai_model_from_checkpoint(ckpt, ns.work / "mistral-genai-int4", "int4")
    if genai is None:
        raise SystemExit(f"onnxruntime-genai: {why}")
    engines["onnxruntime-genai int4"] = ("genai", Path(genai))

    profiles = ns.work / "profiles"
    profiles.mkdir(exist_ok=True)
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for rep in range(ns.reps):
        for label, (kind, path) in engines.items():
            python = sys.executable if kind == "mixtrt" else _peers("python")["python"]
            prefix = str(profiles / f"{kind}-{path.name}-{rep}-{os.getpid()}")
            out = subprocess.run([python, __file__, "--child", kind, "--path", str(path), "--steps", str(ns.steps),
                                  "--prefix", prefix], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{label} failed:\n{out.stderr[-3000:]}")
            runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    load = os.getloadavg()
    print(f"Mistral-shaped int4, batch 1, 1 thread, {PROMPT}-token prompt, {ns.steps} decode steps x {ns.reps} "
          f"passes; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n")
    cols = {}
    for label, rs in runs.items():
        cpu = statistics.median(r["cpu_ms"] for r in rs)
        parts = [shares(r["profile"]) for r in rs]
        cats = set().union(*(p[0] for p in parts))
        ms = {c: statistics.mean(p[0].get(c, 0.0) for p in parts) * cpu for c in cats}
        cols[label] = (cpu, ms, parts[0][1])
    cats = sorted(set().union(*(c[1] for c in cols.values())), key=lambda c: -max(v[1].get(c, 0) for v in
                                                                                   cols.values()))
    print("| ms per step (nodes) | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for c in cats:
        print(f"| {c} | " + " | ".join(f"{v[1].get(c, 0):.2f} ({v[2].get(c, 0)})" for v in cols.values()) + " |")
    print("| between nodes and runs | " + " | ".join(f"{v[0] - sum(v[1].values()):.2f}" for v in cols.values())
          + " |")
    print("| step, thread CPU | " + " | ".join(f"{v[0]:.2f} ({sum(v[2].values())})" for v in cols.values()) + " |")
    ref = cols["onnxruntime-genai int4"][0]
    print("\n" + ", ".join(f"{k}: {ref / v[0]:.2f}x genai's speed" for k, v in cols.items()
                           if not k.startswith("onnx")))


if __name__ == "__main__":
    main()
