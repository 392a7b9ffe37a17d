"""Generation speed and memory: mixtrt (onnxruntime CPU) vs transformers (eager, fp32), same checkpoint.

For each model shape (Mixtral-shaped and Mistral-shaped, random weights), a 128-token prompt and 256
greedy new tokens (EOS ignored so every run has the same length), batch 1 and batch 8, 2 threads:
prefill tokens/s, decode tokens/s, peak RSS; then the decode rate as a fraction of the memory-bandwidth
limit (weight bytes read per decoded token / measured read bandwidth), and RSS after 512 vs 4096
generated tokens (mixtrt, batch 1). Each engine runs in its own subprocess so peak RSS is its own.

    .venv/bin/python benchmarks/bench_generate.py [--models mixtral mistral] [--batches 1 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHAPES, at_least, current_rss_mib, exit_on_sigterm, make_benchmark_checkpoint, peak_rss_mib, positive  # noqa: E402


def prompts(batch: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [[1, *rng.integers(3, 32000, size=length - 1).tolist()] for _ in range(batch)]


def child_mixtrt(ns: argparse.Namespace) -> dict:
    from mixtrt.runtime.generation import GenerationConfig, Generator

    gen = Generator.load(ns.artifact, threads=ns.threads)
    ids = prompts(ns.batch, ns.prompt_len)
    cfg = GenerationConfig(max_new_tokens=ns.new_tokens, eos_token_id=(), do_sample=False)
    gen.generate(ids[:1], GenerationConfig(max_new_tokens=4, eos_token_id=()))  # warm-up
    t = time.perf_counter()
    outs = gen.generate(ids, cfg)
    total = time.perf_counter() - t
    ttft = max(o.stats.time_to_first_token_s for o in outs)
    n_new = sum(len(o.token_ids) for o in outs)
    return {"prefill_tok_s": ns.batch * ns.prompt_len / ttft, "decode_tok_s": (n_new - ns.batch) / (total - ttft),
            "peak_rss_mib": peak_rss_mib(), "generated": n_new}


def child_transformers(ns: argparse.Namespace) -> dict:
    import torch
    import transformers

    torch.set_num_threads(ns.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(ns.checkpoint, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    ids = torch.tensor(prompts(ns.batch, ns.prompt_len))
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        t = time.perf_counter()
        model(ids[:, :])  # prefill alone, for the prefill rate
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=ns.new_tokens, min_new_tokens=ns.new_tokens, **kw)
        total = time.perf_counter() - t
    n_new = (out.shape[1] - ids.shape[1]) * ns.batch
    return {"prefill_tok_s": ns.batch * ns.prompt_len / t_prefill,
            "decode_tok_s": (n_new - ns.batch) / max(total - t_prefill, 1e-9),
            "peak_rss_mib": peak_rss_mib(), "generated": n_new}


def child_rss(ns: argparse.Namespace) -> dict:
    """RSS of mixtrt while generating 4096 tokens (batch 1), sampled at 512 and 4096."""
    from mixtrt.runtime.generation import GenerationConfig, Generator

    gen = Generator.load(ns.artifact, threads=ns.threads)
    ids = prompts(1, ns.prompt_len)[0]
    cfg = GenerationConfig(max_new_tokens=4096, eos_token_id=())
    rss = {}
    for i, _event in enumerate(gen.stream(ids, cfg), start=1):
        if i in (512, 4096):
            rss[i] = current_rss_mib()
    return {"rss_512_mib": rss.get(512), "rss_4096_mib": rss.get(4096)}


def bandwidth_gb_s(threads: int) -> float:
    """Read bandwidth with `threads` threads (numpy's sum releases the GIL): best of 5 passes over 1 GiB."""
    from concurrent.futures import ThreadPoolExecutor

    parts = [np.ones((1 << 28) // threads, np.float32) for _ in range(threads)]
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(6):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, sum(p.nbytes for p in parts) / (time.perf_counter() - t))
    return best / 1e9


def bytes_per_token(shape: dict) -> int:
    """fp32 weight bytes read per decoded token at batch 1 (active experts only; embedding row ignored)."""
    h, i, n_l = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    attn = h * d * (2 * shape["num_attention_heads"] + 2 * shape["num_key_value_heads"])
    if shape["family"] == "mixtral":
        ffn = shape["num_experts_per_tok"] * 3 * h * i + shape["num_local_experts"] * h
    else:
        ffn = 3 * h * i
    return 4 * (n_l * (attn + ffn + 2 * h) + shape["vocab_size"] * h)


def run_child(mode: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    env = {**os.environ, "OMP_NUM_THREADS": str(kw["threads"])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixtral", "mistral"], choices=sorted(SHAPES))
    ap.add_argument("--batches", nargs="+", type=positive, default=[1, 8])
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--prompt-len", type=positive, default=128)
    ap.add_argument("--new-tokens", type=at_least(3), default=256)
    ap.add_argument("--no-rss", action="store_true", help="skip the 4096-token RSS run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mixtrt-bench"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--artifact", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=positive, default=1, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        fn = {"mixtrt": child_mixtrt, "transformers": child_transformers, "rss": child_rss}[ns.child]
        print(json.dumps(fn(ns)))
        return

    from mixtrt.export.onnx_export import export_onnx, is_current

    bw = bandwidth_gb_s(ns.threads)
    print(f"threads {ns.threads}, prompt {ns.prompt_len}, new tokens {ns.new_tokens}, greedy; "
          f"measured read bandwidth {bw:.1f} GB/s")
    for name in ns.models:
        ckpt = make_benchmark_checkpoint(name, ns.work)
        art = ns.work / f"{name}-fp32"
        if not is_current(art, ckpt):
            export_onnx(ckpt, art, overwrite=True, progress=None)
        limit = bw * 1e9 / bytes_per_token(SHAPES[name])
        print(f"\n{name}: weight bytes/token {bytes_per_token(SHAPES[name]) / 2**20:.1f} MiB, "
              f"bandwidth-limited decode {limit:.1f} tok/s")
        print(f"{'batch':>5} {'engine':<13}{'prefill tok/s':>14}{'decode tok/s':>14}{'peak RSS MiB':>14}"
              f"{'vs transformers':>17}{'of bw limit':>13}")
        for batch in ns.batches:
            kw = dict(threads=ns.threads, prompt_len=ns.prompt_len, new_tokens=ns.new_tokens, batch=batch)
            ours = run_child("mixtrt", artifact=art, **kw)
            ref = run_child("transformers", checkpoint=ckpt, **kw)
            for eng, r in (("mixtrt", ours), ("transformers", ref)):
                ratio = r["decode_tok_s"] / ref["decode_tok_s"]
                # the limit is for batch 1 (a step of B rows reads the same weights, B tokens a step)
                frac = f"{r['decode_tok_s'] / limit:.0%}" if batch == 1 else "-"
                print(f"{batch:>5} {eng:<13}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>14.1f}"
                      f"{r['peak_rss_mib']:>14.0f}{ratio:>16.2f}x{frac:>12}")
        if not ns.no_rss:
            r = run_child("rss", artifact=art, threads=ns.threads, prompt_len=ns.prompt_len)
            print(f"mixtrt RSS after 512 / 4096 generated tokens: {r['rss_512_mib']:.0f} / {r['rss_4096_mib']:.0f} MiB "
                  f"({(r['rss_4096_mib'] / r['rss_512_mib'] - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
