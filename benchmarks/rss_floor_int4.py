"""The INT4 peak-RSS target against onnxruntime itself: the least memory an onnxruntime process holds for a benchmark
model's int4 artifact, with no mixtrt in it, beside mixtrt's and llama.cpp q4_0's peak RSS measured in the same run.

For each model (the default int4 artifact of benchmarks/bench_int4.py, made here if missing):

1. `save`: the backend loads the artifact as it always does (its load-time rewrites, its session options) with
   onnxruntime's `session.save_external_prepacked_constant_initializers` added, which writes onnxruntime's optimized
   model with each weight's pre-packed (MLAS) form beside its unpacked one. Its index gives the packed bytes
   against the unpacked INT4 / INT8 bytes they come from.
2. `lean`: a fresh process that imports only numpy and onnxruntime loads that model (graph optimizations off,
   nothing left to fuse; the pre-packed weights memory-mapped, nothing packed at load) and reads its resident size:
   what onnxruntime holds for these weights before any KV cache or step.
3. mixtrt's peak (Generator, 128-token prompt, 256 greedy tokens) and llama.cpp q4_0's (llama-server, the same),
   for the issue's target: peak RSS <= q4_0's + 25%.

The saved model is onnxruntime's and this CPU's (MLAS packs per instruction set): it is written under --work and
used only here. Needs the peers for llama.cpp (benchmarks/setup_peers.sh, MIXTRT_PEERS_DIR).

    .venv/bin/python benchmarks/rss_floor_int4.py [--models mistral mixtral] [--threads 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAVED = "ort-saved.onnx"


def status_mib() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, MiB (read here, not with common.py's readers: the lean
    child imports nothing of mixtrt, and common.py does)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def child_save(artifact: Path, out_dir: Path, threads: int) -> dict:
    """Load `artifact` with the backend, saving onnxruntime's optimized model with its pre-packed weights."""
    import onnx

    from mixtrt.runtime.backends.onnxruntime import OrtBackend

    class Saving(OrtBackend):
        def session_options(self, threads: int | None):  # type: ignore[no-untyped-def]
            opts = super().session_options(threads)
            opts.optimized_model_filepath = str(out_dir / SAVED)
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", SAVED + ".data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            opts.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
            return opts

    out_dir.mkdir(parents=True, exist_ok=True)
    Saving.load(artifact, threads=threads, verify=False)
    model = onnx.load(str(out_dir / SAVED), load_external_data=False)
    unpacked = packed = 0
    for t in model.graph.initializer:
        entries = {e.key: e.value for e in t.external_data}
        blobs = [v for k, v in entries.items() if k.startswith("prepacked")]
        if blobs:
            unpacked += int(entries["length"])
            packed += sum(int(b.split("|")[1].split(";")[1]) for b in blobs)  # "kernel+hash|offset;length;..."
    return {"unpacked_bytes": unpacked, "packed_bytes": packed}


def child_lean(model: Path, threads: int) -> dict:
    """Only numpy and onnxruntime imported: the saved model's resident size right after loading."""
    import numpy  # noqa: F401  (the floor counts it: any Python runtime of these graphs feeds them numpy arrays)
    import onnxruntime as ort

    floor = status_mib()["VmRSS"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    after = status_mib()  # while the session lives
    del session
    return {"floor_mib": floor, "after_load_mib": after["VmRSS"], "peak_mib": after["VmHWM"],
            "anon_mib": after["RssAnon"], "file_mib": after["RssFile"]}


def child(mode: str, **kw) -> dict:
    args = [sys.executable, __file__, "--child", mode, json.dumps({k: str(v) for k, v in kw.items()})]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{mode} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        kw = json.loads(sys.argv[3])
        threads = int(kw["threads"])
        result = child_save(Path(kw["artifact"]), Path(kw["out"]), threads) if sys.argv[2] == "save" \
            else child_lean(Path(kw["model"]), threads)
        print(json.dumps(result))
        return
    sys.path.insert(0, str(HERE))
    from bench_generate import prompts, run_child
    from bench_int4 import INT4_FORMS, int4_artifact, llama_server_generate
    from common import SHAPES, exit_on_sigterm, make_benchmark_checkpoint, positive
    from peers import gguf_from_checkpoint, require

    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mistral", "mixtral"], choices=sorted(SHAPES))
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mixtrt-bench"))
    ns = ap.parse_args()
    require("convert_hf_to_gguf", "llama-quantize", "llama-server")

    for name in ns.models:
        ckpt = make_benchmark_checkpoint(name, ns.work)
        art = int4_artifact(ckpt, ns.work / f"{name}-int4", *INT4_FORMS["int4"],  # bench_int4.py's default one
                            SHAPES[name]["family"] == "mixtral")
        saved = ns.work / f"{name}-int4-ort-saved"
        sizes = child("save", artifact=art, out=saved, threads=ns.threads)
        lean = child("lean", model=saved / SAVED, threads=ns.threads)
        mixtrt = run_child("mixtrt", artifact=art, threads=ns.threads, prompt_len=128, new_tokens=256, batch=1)
        gguf = gguf_from_checkpoint(ckpt, ns.work / "gguf", "q4_0")
        q4_0 = llama_server_generate(gguf, prompts(1, 128)[0], 256, ns.threads)["peak_rss_mib"]
        target = 1.25 * q4_0
        print(f"\n{name}-shaped, default int4 artifact ({ns.threads} threads)")
        print(f"  onnxruntime's packed weights:  {sizes['packed_bytes'] / 2**20:7.1f} MiB "
              f"({sizes['packed_bytes'] / sizes['unpacked_bytes']:.2f}x the {sizes['unpacked_bytes'] / 2**20:.1f} MiB "
              "of INT4 / INT8 values they pack, scales apart)")
        print(f"  numpy + onnxruntime imported:  {lean['floor_mib']:7.1f} MiB")
        print(f"  + the session, weights mapped: {lean['after_load_mib']:7.1f} MiB after loading (anonymous "
              f"{lean['anon_mib']:.1f}, file {lean['file_mib']:.1f}), peak {lean['peak_mib']:.1f}: before any cache or "
              "step, no mixtrt in the process")
        print(f"  mixtrt peak (generate):        {mixtrt['peak_rss_mib']:7.1f} MiB")
        print(f"  llama.cpp q4_0 peak:           {q4_0:7.1f} MiB; the target, 1.25x it: {target:.1f} MiB")
        print(f"  against q4_0's peak: onnxruntime alone {lean['after_load_mib'] / q4_0:.2f}x after loading "
              f"({lean['peak_mib'] / q4_0:.2f}x at its peak), mixtrt {mixtrt['peak_rss_mib'] / q4_0:.2f}x")


if __name__ == "__main__":
    main()
