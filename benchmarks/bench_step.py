"""One forward step of the exported graph on onnxruntime vs the torch reference, same CPU, same weights.

Model: Mixtral-shaped (hidden 512, intermediate 1792, 8 layers, 8/2 heads, 8 experts top-2, vocab 32000,
window 512), random weights written by transformers. Measures a 128-token prefill and a 1-token decode
step (after the prefill, so attention sees 128 cached positions).

    .venv/bin/python benchmarks/bench_step.py [--threads 2] [--repeat 10] [--work /tmp/mixtrt-bench]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, make_benchmark_checkpoint, positive, timeit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--repeat", type=positive, default=10)
    ap.add_argument("--prefill", type=positive, default=128)
    ap.add_argument("--model", choices=sorted(SHAPES), default="mixtral")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mixtrt-bench"))
    ns = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(ns.threads)

    import torch

    from mixtrt.export import export_onnx, load_model
    from mixtrt.export.model import KVCache as TorchCache
    from mixtrt.export.onnx_export import is_current
    from mixtrt.runtime.backends.onnxruntime import OrtBackend

    torch.set_num_threads(ns.threads)
    ckpt = make_benchmark_checkpoint(ns.model, ns.work)
    art = ns.work / f"{ns.model}-fp32"
    if not is_current(art, ckpt):
        export_onnx(ckpt, art, overwrite=True, progress=None)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 32000, size=(1, ns.prefill))

    backend = OrtBackend.load(art, threads=ns.threads)

    def ort_prefill():
        cache = backend.new_cache(1)
        backend.step(cache, prompt)
        return cache

    cache = ort_prefill()
    base_len = int(cache.lengths[0])
    snap_k = [k.copy() for k in cache.keys]
    snap_v = [v.copy() for v in cache.values]

    def ort_decode():  # restore the post-prefill cache so every timed step sees the same state
        for dst, src in zip(cache.keys + cache.values, snap_k + snap_v, strict=True):
            dst[...] = src
        cache.lengths[0] = base_len
        backend.step(cache, prompt[:, -1:])

    t_ort_prefill = timeit(ort_prefill, ns.repeat)
    t_ort_decode = timeit(ort_decode, ns.repeat * 5)

    model = load_model(ckpt)
    ids = torch.from_numpy(prompt)
    capacity = backend.capacity

    def torch_prefill():
        c = TorchCache(model.args, batch_size=1, capacity=capacity)
        with torch.no_grad():
            model(ids, cache=c)
        return c

    tcache = torch_prefill()
    snapshot = list(tcache.layers)

    def torch_decode():  # the reference returns new cache tensors each step: restore the post-prefill ones
        tcache.layers = list(snapshot)
        tcache.lengths.fill_(base_len)
        with torch.no_grad():
            model(ids[:, -1:], cache=tcache)

    t_torch_prefill = timeit(torch_prefill, ns.repeat)
    t_torch_decode = timeit(torch_decode, ns.repeat * 5)

    print(f"model {ns.model} ({SHAPES[ns.model]['num_hidden_layers']} layers), threads {ns.threads}, "
          f"median of {ns.repeat} prefill / {ns.repeat * 5} decode runs")
    print(f"{'step':<22}{'onnxruntime ms':>16}{'torch ref ms':>14}{'speed-up':>10}")
    for name, a, b in ((f"prefill {ns.prefill} tokens", t_ort_prefill, t_torch_prefill),
                       ("decode 1 token", t_ort_decode, t_torch_decode)):
        print(f"{name:<22}{a * 1e3:>16.2f}{b * 1e3:>14.2f}{b / a:>9.2f}x")


if __name__ == "__main__":
    main()
