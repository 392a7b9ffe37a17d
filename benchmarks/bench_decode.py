"""Decode and prefill speed of mixtrt fp32 beside llama.cpp f32 and onnxruntime-genai fp32, all in one run, and the
per-step overhead measured directly; writes a chart (PNG) and, optionally, every number as JSON.

For each benchmark model (benchmarks/common.py: Mixtral-shaped and Mistral-shaped, random weights), a 128-token
prompt and 256 greedy new tokens (EOS ignored), batch 1, the same threads for every engine; `--passes` passes, each
running every engine once in turn (each in its own subprocess, so peak RSS is its own), so a change of machine load
hits all engines alike. Reported: the median and min-max over passes of decode tok/s, the median prefill tok/s,
peak RSS, and decode as a fraction of the bandwidth limit (weight bytes a decode step reads / the best read
bandwidth the probe measured in this run; the probe runs before and after the passes).

The overhead: the decode step of a model with the Mixtral-shaped topology (8 layers, 8 experts top-2, the same graph
and node count: attention through GroupQueryAttention with its rotary) but negligible weights (hidden 32,
intermediate 64, a 256-piece tokenizer made here), batch 1 and 8: what a step costs beyond reading weights. Two such
models: "hidden 32" has attention as wide as its hidden size (2 query heads and 1 KV head of dim 16, the smallest
head dim the graph's attention takes), so its KV cache is negligible too: the decode issue's measure of the
overhead. "attention 8x64" keeps the benchmark model's attention shape (8/2 heads of dim 64), so its attention
reads as many cache bytes per step as the benchmark's: at batch 8 after a 128-token prompt that is most of its step
(printed beside it). Each measured twice: with the benchmark's context (prompt + new tokens) and with a short one
(8-token prompts, 32 new tokens), which shows the fixed part, the cost per node.

A quick check that everything runs: `--passes 1 --new-tokens 32`; `--overhead-only` measures only the overhead.

onnxruntime-genai has no Mixtral (its builder refuses it); that row says so. The peers come from
benchmarks/setup_peers.sh (MIXTRT_PEERS_DIR).

    MIXTRT_PEERS_DIR=/work/peers .venv/bin/python benchmarks/bench_decode.py [--models mixtral mistral]
        [--threads 2] [--passes 3] [--prompt-len 128] [--new-tokens 256] [--chart docs/bench_decode.png]
        [--json results.json] [--work /tmp/mixtrt-bench] [--overhead-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402
from common import SHAPES, at_least, exit_on_sigterm, make_benchmark_checkpoint, positive  # noqa: E402

ENGINES = ("mixtrt fp32", "llama.cpp f32", "onnxruntime-genai fp32")
TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_local_experts=8,
            num_experts_per_tok=2, sliding_window=512, max_position_embeddings=8192)
# the attention of each overhead model (module docstring): the decode issue's "hidden 32", and the benchmark's shape
TINY_ATTENTION = {"hidden 32": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=16),
                  "attention 8x64": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=64)}


def prompt(length: int, vocab: int = 32000) -> list[int]:
    rng = np.random.default_rng(1)
    return [1, *rng.integers(3, vocab, size=length - 1).tolist()]


def child_mixtrt(ns: argparse.Namespace) -> dict:
    from mixtrt.runtime.benchmark import bench

    r = bench(ns.artifact, prompt_tokens=ns.prompt_len, new_tokens=ns.new_tokens, batch=ns.batch,
              threads=ns.threads, verify=False)
    return {"prefill_tok_s": r.prefill_tokens_per_s, "decode_tok_s": r.decode_tokens_per_s,
            "peak_rss_mib": r.peak_rss_mib, "step_ms": r.decode_step_ms}


def run_child(**kw) -> dict:
    cmd = [sys.executable, __file__, "--child"] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(kw["threads"])})
    if out.returncode:
        raise SystemExit(f"mixtrt child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_checkpoint(root: Path, attention: str = "hidden 32") -> Path:
    """The Mixtral-shaped topology with negligible weights, attention TINY_ATTENTION[attention], and a 256-piece
    sentencepiece tokenizer (made here)."""
    import io

    import sentencepiece as spm
    import torch
    import transformers

    heads = TINY_ATTENTION[attention]
    path = root / (f"mixtral-topology-tiny-{heads['num_attention_heads']}x{heads['head_dim']}")
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**TINY, **heads, router_jitter_noise=0.0, initializer_range=0.5)
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)
    model = io.BytesIO()
    text = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(2000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=256, model_type="bpe",
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    return path


def artifact_for(checkpoint: Path, work: Path) -> Path:
    from mixtrt.export.onnx_export import export_onnx, is_current

    art = work / f"{checkpoint.name}-fp32"
    if not is_current(art, checkpoint):
        export_onnx(checkpoint, art, overwrite=True, progress=None)
    return art


def chart(results: dict, path: Path, title: str, prompt_len: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(ENGINES)
    for ax, key, label in ((axes[0], "decode_tok_s", "decode tok/s (batch 1; bars: min-max over passes)"),
                           (axes[1], "prefill_tok_s", f"prefill tok/s ({prompt_len}-token prompt)")):
        for j, engine in enumerate(ENGINES):
            xs, ys, lo, hi = [], [], [], []
            for i, model in enumerate(models):
                runs = results[model]["engines"].get(engine, {}).get("runs")
                if not runs:
                    ax.text(i + (j - (len(ENGINES) - 1) / 2) * width, 0, f" no {model}", rotation=90, fontsize=7,
                            ha="center", va="bottom")
                    continue
                vals = [r[key] for r in runs]
                med = statistics.median(vals)
                xs.append(i + (j - (len(ENGINES) - 1) / 2) * width)
                ys.append(med)
                lo.append(med - min(vals))
                hi.append(max(vals) - med)
            bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=engine)
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        ax.set_xticks(range(len(models)), [f"{m}-shaped" for m in models])
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixtral", "mistral"], choices=sorted(SHAPES))
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--passes", type=positive, default=3)
    ap.add_argument("--prompt-len", type=positive, default=128)
    ap.add_argument("--new-tokens", type=at_least(3), default=256)
    ap.add_argument("--chart", type=Path, default=None,
                    help="the chart's file (default: WORK/bench_decode.png; the README's is docs/bench_decode.png)")
    ap.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mixtrt-bench"))
    ap.add_argument("--overhead-only", action="store_true", help="measure only the per-step overhead (tiny model)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--artifact", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=positive, default=1, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.chart is None:  # not the checkout's own chart unless asked: a run elsewhere would replace it
        ns.chart = ns.work / "bench_decode.png"
    for out in (ns.json, ns.chart):  # their folders made now, so writing them cannot fail after the whole run
        if out is not None:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                ap.error(f"{out}: cannot make its folder ({e.strerror})")
    if ns.child:
        print(json.dumps(child_mixtrt(ns)))
        return

    if not ns.overhead_only:
        try:  # checked before the minutes of measuring, not after
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("bench_decode.py: the chart needs matplotlib: pip install '.[bench]'")

    from mixtrt.runtime.args import ModelArgs
    from mixtrt.runtime.benchmark import read_bandwidth_gb_s, weight_bytes_per_token

    load = os.getloadavg()
    bw = [read_bandwidth_gb_s(ns.threads)]
    print(f"threads {ns.threads}, prompt {ns.prompt_len}, new tokens {ns.new_tokens}, greedy, batch 1, "
          f"{ns.passes} passes; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"read bandwidth {bw[0]:.1f} GB/s",
          flush=True)

    # the overhead: Mixtral-shaped topology, negligible weights; the benchmark's context, then a short one
    overhead: dict = {}
    for attention, heads in TINY_ATTENTION.items():
        tiny = artifact_for(tiny_checkpoint(ns.work, attention), ns.work)
        overhead[attention] = {"context": {}, "short": {}}
        for ctx, (plen, new) in (("context", (ns.prompt_len, ns.new_tokens)), ("short", (8, 32))):
            for batch in (1, 8):
                steps = [run_child(artifact=tiny, threads=ns.threads, prompt_len=plen, new_tokens=new,
                                   batch=batch)["step_ms"]["median"] for _ in range(ns.passes)]
                # what the attention reads at the context's end: K and V of every cached position, fp32
                kv_mb = (TINY["num_hidden_layers"] * batch * 2 * heads["num_key_value_heads"] * heads["head_dim"] * 4
                         * min(plen + new, TINY["sliding_window"]) / 1e6)
                overhead[attention][ctx][batch] = {"median": statistics.median(steps), "min": min(steps),
                                                   "max": max(steps), "kv_cache_mb_read": kv_mb}
                print(f"overhead (Mixtral-shaped topology, {attention}, vocab 256): batch {batch}, {plen}-token "
                      f"prompts, {new} new tokens: decode step {overhead[attention][ctx][batch]['median']:.3f} ms "
                      f"(passes {min(steps):.3f}-{max(steps):.3f}; its attention reads {kv_mb:.1f} MB of cache at "
                      "the end)", flush=True)
    if ns.overhead_only:
        return

    results: dict = {}
    for name in ns.models:
        ckpt = make_benchmark_checkpoint(name, ns.work)
        engines: dict = {"mixtrt fp32": {"artifact": str(artifact_for(ckpt, ns.work))},
                         "llama.cpp f32": {"gguf": str(peers.gguf_from_checkpoint(ckpt, ns.work / "gguf", "f32"))}}
        genai, why = peers.genai_model_from_checkpoint(ckpt, ns.work / f"genai-{name}-fp32", "fp32")
        engines["onnxruntime-genai fp32"] = {"model": str(genai)} if genai else {"refused": why}
        for e in engines.values():
            e["runs"] = []
        results[name] = {"engines": engines,
                         "weight_bytes_per_token": weight_bytes_per_token(
                             ModelArgs.from_checkpoint_dir(ckpt), 4)}
    ids = prompt(ns.prompt_len)
    for p in range(ns.passes):
        for name in ns.models:
            for engine, e in results[name]["engines"].items():
                if "refused" in e:
                    continue
                if engine == "mixtrt fp32":
                    r = run_child(artifact=e["artifact"], threads=ns.threads, prompt_len=ns.prompt_len,
                                  new_tokens=ns.new_tokens, batch=1)
                elif engine == "llama.cpp f32":
                    r = peers.llama_generate(e["gguf"], ids, ns.new_tokens, ns.threads)
                else:
                    r = peers.genai_generate(e["model"], ids, ns.new_tokens, ns.threads)
                e["runs"].append({k: r[k] for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mib")})
                print(f"pass {p + 1}: {name} {engine}: decode {r['decode_tok_s']:.1f} tok/s, "
                      f"prefill {r['prefill_tok_s']:.1f} tok/s", flush=True)
    bw.append(read_bandwidth_gb_s(ns.threads))
    best = max(bw)
    load_end = os.getloadavg()

    print(f"\nread bandwidth {bw[0]:.1f} GB/s before, {bw[1]:.1f} after (limit uses the best, {best:.1f}); "
          f"load average at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    for attention in TINY_ATTENTION:
        for ctx, what in (("context", f"{ns.prompt_len}-token prompts, {ns.new_tokens} new tokens"),
                          ("short", "8-token prompts, 32 new tokens")):
            o = overhead[attention][ctx]
            print(f"overhead per decode step (same topology, negligible weights, {attention}; {what}): "
                  f"batch 1 {o[1]['median']:.3f} ms, batch 8 {o[8]['median']:.3f} ms")
    print("\n| model | engine | decode tok/s (min-max) | prefill tok/s | peak RSS MiB | % of bandwidth limit |")
    print("|---|---|---|---|---|---|")
    for name in ns.models:
        limit = best * 1e9 / results[name]["weight_bytes_per_token"]
        results[name]["bandwidth_limit_tok_s"] = limit
        for engine, e in results[name]["engines"].items():
            if "refused" in e:
                print(f"| {name}-shaped | {engine} | - | - | - | ({e['refused']}) |")
                continue
            dec = [r["decode_tok_s"] for r in e["runs"]]
            e["decode_median"] = statistics.median(dec)
            e["prefill_median"] = statistics.median(r["prefill_tok_s"] for r in e["runs"])
            print(f"| {name}-shaped | {engine} | {e['decode_median']:.1f} ({min(dec):.1f}-{max(dec):.1f}) | "
                  f"{e['prefill_median']:.0f} | {max(r['peak_rss_mib'] for r in e['runs']):.0f} | "
                  f"{e['decode_median'] / limit:.0%} |")
    print()
    for name in ns.models:
        eng = results[name]["engines"]
        ours = eng["mixtrt fp32"]
        for peer in ENGINES[1:]:
            if "decode_median" in eng[peer]:
                ratio = ours["decode_median"] / eng[peer]["decode_median"]
                print(f"{name}-shaped: mixtrt / {peer}: decode {ratio:.2f}x, "
                      f"prefill {ours['prefill_median'] / eng[peer]['prefill_median']:.2f}x")
    title = (f"{ns.prompt_len}-token prompt, {ns.new_tokens} greedy tokens, batch 1, {ns.threads} threads, "
             f"{ns.passes} passes; read bandwidth {best:.0f} GB/s; load average {load[0]:.1f} -> {load_end[0]:.1f}")
    if ns.json:
        ns.json.write_text(json.dumps({"bandwidth_gb_s": bw, "load_start": load, "load_end": load_end,
                                       "overhead_step_ms": overhead, "models": results}, indent=1))
    chart(results, ns.chart, title, ns.prompt_len)
    print(f"chart: {ns.chart}")


if __name__ == "__main__":
    main()
