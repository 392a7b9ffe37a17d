"""Export at scale: peak memory, time and write rate of `mixtrt export` vs llama.cpp's convert_hf_to_gguf.py
(and, with --baseline-python, another mixtrt's exporter: the one before streaming), then the runtime's load.

Checkpoint (issue 11): random Mixtral-shaped, hidden 1024, intermediate 3584, 16/4 heads, 8 experts top-2,
window 512, vocab 32000, fp32 safetensors written by transformers: 8 layers (0.79 B parameters, 3.2 GB), and
the same with 16 layers (the growth of peak memory with the layer count).

Every tool runs in a child process of its own; its peak RSS is the child's ru_maxrss (os.wait4). Runs are
interleaved (tool A, tool B, tool C, then again) and the medians reported, since the machine may be shared.
Then `Generator.load` of the artifact (load seconds, peak RSS, decode step time) under onnxruntime session
option variants.

    MIXTRT_PEERS_DIR=/work/peers python benchmarks/bench_export.py --work /tmp/bench-export [--runs 3]
        [--layers 8 16] [--int4] [--baseline-python /path/to/other/.venv/bin/python] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
from common import exit_on_sigterm, positive  # noqa: E402

from mixtrt.runtime.quantization import METHODS  # noqa: E402  (every int4 --method)

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_attention_heads=16,
             num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, sliding_window=512,
             max_position_embeddings=4096, initializer_range=0.02, router_jitter_noise=0.0)

_MAKE = """
import shutil, sys, torch, transformers
from pathlib import Path
from mistral_common import __file__ as mc
torch.manual_seed(0)
cfg = transformers.MixtralConfig(num_hidden_layers=int(sys.argv[2]), **{shape})
model = transformers.MixtralForCausalLM(cfg)
model.save_pretrained(sys.argv[1])
shutil.copy(Path(mc).parent / "data" / "tokenizer.model.v1", Path(sys.argv[1]) / "tokenizer.model")
"""

_LOAD = """
import json, resource, sys, time
import numpy as np
import onnxruntime as ort
variant = json.loads(sys.argv[2])

class Options(ort.SessionOptions):
    def __init__(self):
        super().__init__()
        for k, v in variant.get("config", {{}}).items():
            self.add_session_config_entry(k, v)
        if "arena" in variant:
            self.enable_cpu_mem_arena = variant["arena"]

ort.SessionOptions = Options
from mixtrt.runtime.generation import Generator
t = time.perf_counter()
gen = Generator.load(sys.argv[1], threads=2, verify=False)
load_s = time.perf_counter() - t
rss_after = int(open("/proc/self/statm").read().split()[1]) * 4096
backend = gen.backend
cache = backend.new_cache(1)
backend.step(cache, np.arange(3, 67)[None])
times = []
for i in range(8):
    t = time.perf_counter()
    backend.step(cache, np.array([[100 + i]]))
    times.append(time.perf_counter() - t)
print(json.dumps({{"load_s": load_s, "rss_after_load": rss_after, "decode_ms": 1000 * sorted(times)[4],
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""

LOAD_VARIANTS = {
    "default": {},
    "no-prepack": {"config": {"session.disable_prepacking": "1"}},
    "no-arena": {"arena": False},
    "no-prepack,no-arena": {"config": {"session.disable_prepacking": "1"}, "arena": False},
}


def measured(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of the child, its output); raises on failure."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    assert p.stdout is not None
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-3000:]}")
    return wall, usage.ru_maxrss * 1024, out


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_checkpoint(work: Path, layers: int) -> Path:
    path = work / f"mixtral-{layers}l"
    if not (path / "config.json").is_file():
        subprocess.run([sys.executable, "-c", _MAKE.format(shape=repr(SHAPE)), str(path), str(layers)], check=True)
    return path


def tools(baseline: str | None, int4: bool = False) -> dict:
    info = peers._peers("python", "convert_hf_to_gguf")
    out = {
        "mixtrt": lambda ck, out: ([sys.executable, "-m", "mixtrt", "export", str(ck), "--out", str(out), "--quiet",
                                    "--force"], None, None),
        "llama.cpp": lambda ck, out: ([info["python"], info["convert_hf_to_gguf"], str(ck), "--outfile",
                                       str(out) + ".gguf", "--outtype", "f32"], peers.OFFLINE, None),
    }
    if int4:  # int4 exports: quantized in the streaming writer (rtn) and calibrated layer by layer (awq, gptq)
        for method in METHODS:
            out[f"mixtrt-int4-{method}"] = lambda ck, o, m=method: (
                [sys.executable, "-m", "mixtrt", "export", str(ck), "--out", str(o), "--quiet", "--force",
                 "--precision", "int4", "--method", m], None, None)
    if baseline:  # another mixtrt install (its own interpreter, run from outside its checkout's tree)
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        out["mixtrt-baseline"] = lambda ck, out: ([baseline, "-m", "mixtrt", "export", str(ck), "--out", str(out),
                                                   "--quiet", "--force"], env, "/")
        if int4:
            for method in METHODS:
                out[f"mixtrt-baseline-int4-{method}"] = lambda ck, o, m=method: (
                    [baseline, "-m", "mixtrt", "export", str(ck), "--out", str(o), "--quiet", "--force",
                     "--precision", "int4", "--method", m], env, "/")
    return out


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mixtrt-bench-export"))
    ap.add_argument("--runs", type=positive, default=3)
    ap.add_argument("--layers", type=positive, nargs="+", default=[8, 16])
    ap.add_argument("--baseline-python", default=None, help="python of another mixtrt install to time as well")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    ap.add_argument("--int4", action="store_true", help="also time --precision int4 exports (rtn, awq and gptq)")
    ns = ap.parse_args()
    ns.work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    results: dict = {"load_before": load, "runs": {}}
    made: set[Path] = set()  # what this run writes in --work (nothing else there is ever removed)
    for layers in ns.layers:
        fresh = not (ns.work / f"mixtral-{layers}l").exists()
        ck = make_checkpoint(ns.work, layers)
        if fresh:
            made.add(ck)
        ck_bytes = sum(f.stat().st_size for f in ck.glob("*.safetensors"))
        table = tools(ns.baseline_python if layers == ns.layers[0] else None, ns.int4)
        rows: dict[str, list] = {name: [] for name in table}
        for run in range(ns.runs):
            for name, make_cmd in table.items():
                out = ns.work / f"out-{name}-{layers}"
                made.update((out, Path(str(out) + ".gguf")))
                cmd, env, cwd = make_cmd(ck, out)
                wall, rss, _ = measured(cmd, env, cwd)
                written = size_of(Path(str(out) + ".gguf")) if name == "llama.cpp" else size_of(out)
                rows[name].append((wall, rss, written))
                print(f"{layers} layers, run {run + 1}: {name:16s} {wall:6.1f} s  peak RSS {rss / 2**30:5.2f} GiB  "
                      f"{written / 1e9 / wall:5.2f} GB/s", flush=True)
                if not (name == "mixtrt" and run == ns.runs - 1 and layers == ns.layers[0]):
                    shutil.rmtree(out, ignore_errors=True)
                    Path(str(out) + ".gguf").unlink(missing_ok=True)
        summary = {name: {"wall_s": statistics.median(r[0] for r in rs),
                          "peak_rss_gib": statistics.median(r[1] for r in rs) / 2**30,
                          "written_gb": rs[0][2] / 1e9,
                          "gb_per_s": statistics.median(r[2] / 1e9 / r[0] for r in rs)} for name, rs in rows.items()}
        results["runs"][layers] = {"checkpoint_gb": ck_bytes / 1e9, "tools": summary}
        print(json.dumps(results["runs"][layers], indent=1), flush=True)
    first = ns.layers[0]
    art = ns.work / f"out-mixtrt-{first}"
    loads: dict[str, list] = {v: [] for v in LOAD_VARIANTS}
    for _ in range(ns.runs):
        for name, variant in LOAD_VARIANTS.items():
            _, _, out = measured([sys.executable, "-c", _LOAD.format(), str(art), json.dumps(variant)])
            loads[name].append(json.loads(out.strip().splitlines()[-1]))
    results["load"] = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in loads.items()}
    print(json.dumps(results["load"], indent=1))
    results["load_after"] = os.getloadavg()
    (ns.work / "results.json").write_text(json.dumps(results, indent=1))
    if not ns.keep:
        for p in made:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
