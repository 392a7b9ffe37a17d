"""The GPU measurement, one prepared script for a lent GPU machine (torch + Triton, no TensorRT, no network).

    python benchmarks/bench_gpu.py --out $OUT/bench_gpu.json          # on the GPU machine (a few minutes)
    python benchmarks/bench_gpu.py --dry-run                          # the same code on the CPU, in seconds

1. Kernel checks, natively: each op's Triton kernels against its eager torch reference (plugins/<op>/torch_op.py) on
   the device, fp16 (and fp32) over decode and prefill shapes, the ring wrapped; max error relative to max|ref|.
2. The triton backend (torch dense layers + our kernels) against torch eager (the same model with the reference
   ops) on the same random weights made on the device: the Mixtral-shaped benchmark model (benchmarks/common.py)
   and a Mixtral-8x7B-shaped model with 4 layers (hidden 4096, intermediate 14336, 8 experts top-2, 32/8 heads of
   128, no window); batch 1 and 8; a prompt prefilled, then timed decode steps. Reported: decode tok/s, and the
   fraction of the HBM roofline: bytes a decode step must read (weights of the dense layers and lm_head, the
   experts the step's tokens touch (counted from the routing), the KV cache it attends) / step time / peak HBM
   bandwidth of the device (a table; --hbm-tbps overrides).

3. With `--precision fp16,int4` (or `int4`), the same models with every linear but the router and every expert in
   symmetric INT4 (blocks of 128 along the input dimension, scale max|w| / 7, quantized on the device from the
   same random weights): the triton backend keeps them packed (the dense INT4 kernel, plugins/int4_triton.py, and
   the MoE kernels' INT4 form), torch eager runs the dequantized fp16 weights; bytes per step count what each
   reads (packed weights + scales, or fp16).

Everything printed is also written as one JSON object (--out). With --dry-run: tiny shapes, the CPU, the Triton
interpreter; numbers are meaningless, the code path is the GPU run's (tests/benchmarks/test_bench_gpu.py runs it).
The script imports only the GPU path of mixtrt (torch, triton, numpy): where the CPU runtime's dependencies
(onnxruntime, sentencepiece, jinja2) are missing it imports the modules it needs without the package's __init__.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mixtrt.cli.options import at_least  # noqa: E402  (argparse types only: no runtime import)

HBM_TBPS = {"H200": 4.8, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35, "A100": 2.0, "L40S": 0.864}  # name part


def _import_gpu_path(bare: bool = False) -> None:
    """Make `mixtrt.runtime.*` submodules importable even where the runtime's own dependencies are absent (or,
    with `bare`, always without the package's __init__)."""
    sys.path.insert(0, str(ROOT))
    try:
        if bare:
            raise ImportError("--bare-import")
        import mixtrt.runtime  # noqa: F401
    except ImportError as e:
        print(json.dumps({"note": f"the CPU runtime does not import here ({e}); importing the GPU path alone"}),
              flush=True)
        for name in [m for m in sys.modules if m == "mixtrt.runtime" or m.startswith("mixtrt.runtime.")]:
            del sys.modules[name]
        bare = types.ModuleType("mixtrt.runtime")
        bare.__path__ = [str(ROOT / "runtime")]  # type: ignore[attr-defined]
        sys.modules["mixtrt.runtime"] = bare


def model_shapes(dry: bool) -> dict[str, dict[str, Any]]:
    if dry:
        tiny = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                    max_position_embeddings=64)
        return {"tiny-mixtral": tiny}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import SHAPES

    shaped = {k: v for k, v in SHAPES["mixtral"].items() if k != "family"}
    return {"mixtral-shaped": shaped,
            "mixtral-8x7b-4layers": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
                                         num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
                                         max_position_embeddings=32768)}


def model_args(shape: dict[str, Any]) -> Any:
    from mixtrt.runtime.args import ModelArgs, MoeArgs

    s = shape
    return ModelArgs("MixtralForCausalLM", s["vocab_size"], s["hidden_size"], s["intermediate_size"],
                     s["num_hidden_layers"], s["num_attention_heads"], s["num_key_value_heads"],
                     s["hidden_size"] // s["num_attention_heads"], sliding_window=s["sliding_window"],
                     max_position_embeddings=s["max_position_embeddings"],
                     moe=MoeArgs(s["num_local_experts"], s["num_experts_per_tok"]))


def random_weights(args: Any, device: str, dtype: Any, seed: int = 0) -> dict[str, Any]:
    """Random weights made on the device (std 0.02, norms 1; the router a bit larger so routing is not uniform)."""
    import torch

    from mixtrt.runtime.backends.graph_weights import expected_shapes

    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(args, 1).items():
        if name.startswith("rope"):
            continue
        if name.endswith("norm"):
            out[name] = torch.ones(shape, device=device, dtype=dtype)
        else:
            std = 0.2 if name.endswith(".gate") else 0.02
            out[name] = (torch.randn(shape, device=device, dtype=torch.float32, generator=g) * std).to(dtype)
    return out


DENSE = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "lm_head")


def pack_int4(w: Any, block: int) -> tuple[Any, Any]:
    """plugins/int4.py's pack_int4 in torch, on the device: W [..., N, K] -> (uint8 [..., N, K/2], scales [..., N,
    K/block] in W's dtype); symmetric, scale max|w| / 7, element 2j in the low nibble."""
    import torch

    blocks = w.float().reshape(*w.shape[:-1], w.shape[-1] // block, block)
    s = blocks.abs().amax(-1) / 7
    q = torch.where(s[..., None] > 0, blocks / s[..., None].clamp_min(1e-30), torch.zeros_like(blocks))
    nib = q.round().clamp(-8, 7).to(torch.int8).reshape(w.shape).view(torch.uint8) & 0x0F
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).contiguous(), s.to(w.dtype)


def quantize_int4(weights: dict[str, Any], block: int) -> dict[str, Any]:
    """Every dense linear (DENSE) and expert matrix packed INT4 (name + name_scales); router, norms, embedding kept."""
    out = {}
    for name, w in weights.items():
        if name.rsplit(".", 1)[-1] in DENSE or name.endswith((".fc1", ".fc2")):
            out[name], out[f"{name}_scales"] = pack_int4(w, block)
        else:
            out[name] = w
    return out


def outcome(fn: Any, *args: Any) -> dict[str, Any]:
    """fn(*args), or {"ok": False, "error": ...}: one failing case (or configuration that does not compile) does not
    end a run on a lent machine."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded in the report, the run goes on
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}


def _guarded(rows: list[dict[str, Any]], base: dict[str, Any], fn: Any, *args: Any) -> None:
    """rows += base + outcome(fn, *args), printed as it is measured."""
    rows.append({**base, **outcome(fn, *args)})
    print(json.dumps(rows[-1]), flush=True)


def rel_err(got: Any, want: Any) -> float:
    """max |got - want| / max |want| (torch tensors), in float32."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def kernel_checks(device: str, dry: bool) -> list[dict[str, Any]]:
    """Our kernels vs the torch references on the device; returns one row per case."""
    import torch

    import mixtrt.plugins.moe.torch_op  # noqa: F401
    import mixtrt.plugins.swa.torch_op  # noqa: F401
    from mixtrt.plugins import int4_triton as dk
    from mixtrt.plugins.moe import triton_kernels as mk
    from mixtrt.plugins.swa import triton_kernels as sk
    from mixtrt.plugins.swa.torch_op import rope_tables

    rows: list[dict[str, Any]] = []
    g = torch.Generator(device=device).manual_seed(0)
    dtypes = [torch.float16, torch.float32]

    def timed(call: Any, nbytes: int, key: str = "") -> dict[str, float]:
        """On a GPU: the call's median time (triton's do_bench) and the bytes it must read over it."""
        if device != "cuda":
            return {}
        from triton.testing import do_bench

        ms = float(do_bench(call, warmup=5, rep=20))
        return {f"{key}ms": ms, f"{key}gb_s": nbytes / ms / 1e6}

    def swa(dt: Any, tol: float, N: int, K: int, D: int, C: int, W: int, B: int, past: int, S: int) -> dict:
        def rnd(*shape: int) -> Any:
            return torch.randn(*shape, generator=g, device=device).to(dt)
        q, k, v = rnd(B, S, N * D), rnd(B, S, K * D), rnd(B, S, K * D)
        kc, vc = rnd(B, K, C, D), rnd(B, K, C, D)
        total = torch.full((B,), past + S, dtype=torch.int32, device=device)
        cos, sin = rope_tables(D, 10000.0, past + S + 1)
        cos, sin = cos.to(dt).to(device), sin.to(dt).to(device)
        want, wk, wv = torch.ops.mixtrt.sliding_window_attention(q, k, v, kc, vc, total, cos, sin, N, K, W, 0.0)
        got = sk.swa_attention(q, k, v, kc, vc, total, cos, sin, N, K, W, 0.0)
        # the cache the kernel wrote vs the reference's: RoPE'd keys rounded in another order on a GPU, so within
        # the output's tolerance (bit-equal under the interpreter)
        cache_err = max(rel_err(kc, wk), rel_err(vc, wv))
        err, cache_ok = rel_err(got, want), cache_err <= tol
        keys = min(past + S, W if W > 0 else C, C)  # rewriting the same keys: the call is idempotent
        t = timed(lambda: sk.swa_attention(q, k, v, kc, vc, total, cos, sin, N, K, W, 0.0),
                  2 * B * K * keys * D * kc.element_size())
        return {"rel_err": err, "cache_rel_err": cache_err, "ok": err <= tol and cache_ok, **t}

    def moe(dt: Any, tol: float, path: str, T: int, H: int, I: int, E: int, topk: int) -> dict:  # noqa: E741
        x = torch.randn(T, H, generator=g, device=device).to(dt)
        logits = (torch.randn(T, E, generator=g, device=device) * 2).to(dt)
        fc1 = (torch.randn(E, 2 * I, H, generator=g, device=device) * H**-0.5).to(dt)
        fc2 = (torch.randn(E, H, I, generator=g, device=device) * I**-0.5).to(dt)
        want = torch.ops.mixtrt.moe(x, logits, list(fc1.unbind(0)), list(fc2.unbind(0)), topk)
        err = rel_err(mk.moe(x, logits, fc1, fc2, topk, path=path), want)
        used = int(logits.float().topk(topk, dim=-1).indices.unique().numel())
        t = timed(lambda: mk.moe(x, logits, fc1, fc2, topk, path=path), used * 3 * I * H * fc1.element_size())
        return {"rel_err": err, "ok": err <= tol, "experts_read": used, **t}

    def dense(dt: Any, tol: float, M: int, N: int, K: int, block: int) -> dict:
        x = torch.randn(M, K, generator=g, device=device).to(dt)
        packed, scales = pack_int4(torch.randn(N, K, generator=g, device=device).to(dt), block)
        lo, hi = (packed & 0x0F).to(torch.int16), (packed >> 4).to(torch.int16)
        q = torch.stack([lo, hi], -1).flatten(-2)
        w = (torch.where(q >= 8, q - 16, q).float() * scales.float().repeat_interleave(block, -1)).to(dt)
        err = rel_err(dk.int4_linear(x, packed, scales), x.float() @ w.float().T)
        t = timed(lambda: dk.int4_linear(x, packed, scales), packed.numel() + scales.numel() * scales.element_size())
        ref = timed(lambda: x @ w.T, w.numel() * w.element_size(), "torch_dense_")  # the dequantized weights
        return {"rel_err": err, "ok": err <= tol, **t, **ref}

    # (name, N, K, D, C, W, B, past, S)
    swa_cases = [("decode ring wrapped", 4, 2, 16, 12, 8, 2, 20, 1), ("prefill", 4, 2, 16, 40, -1, 1, 0, 24)] if dry \
        else [("decode 32/8x128 W4096 wrapped", 32, 8, 128, 4112, 4096, 8, 5000, 1),
              ("prefill 32/8x128 S512", 32, 8, 128, 4112, 4096, 1, 300, 512),
              ("decode full causal", 32, 8, 128, 2048, -1, 8, 1500, 1)]
    # (name, path, T, H, I, E, top-k): T=8 runs grouped as the op's default does (decode at T=1 only)
    moe_cases = [("decode T=2", "decode", 2, 64, 96, 4, 2), ("grouped T=24", "grouped", 24, 64, 96, 4, 2)] if dry \
        else [("decode T=1", "decode", 1, 4096, 14336, 8, 2),
              ("grouped T=8 (batch 8)", "grouped", 8, 4096, 14336, 8, 2),
              ("grouped T=256", "grouped", 256, 4096, 14336, 8, 2)]
    # (name, M, N, K, block): the dense INT4 linear vs torch's matmul on the dequantized weights
    dense_cases = [("gemv M=1", 1, 70, 64, 32), ("dot M=24", 24, 50, 96, 32)] if dry \
        else [("M=1 14336x4096 (gemv)", 1, 14336, 4096, 128), ("M=4 4096x14336 (dot)", 4, 4096, 14336, 128),
              ("M=256 4096x4096 (dot)", 256, 4096, 4096, 128)]
    for op, fn, cases, tols in (("swa", swa, swa_cases, (1e-2, 1e-4)), ("moe", moe, moe_cases, (5e-3, 1e-4)),
                                ("int4_linear", dense, dense_cases, (5e-3, 1e-4))):
        for dt, tol in zip(dtypes, tols, strict=True):
            for name, *shape in cases:
                _guarded(rows, {"op": op, "case": name, "dtype": str(dt).split(".")[-1]}, fn, dt, tol, *shape)
    return rows


def decode_bytes(backend: Any, batch: int, context: int, touched_experts: list[int]) -> int:
    """Bytes one decode step of `batch` rows at `context` positions must read from memory (at least)."""
    a, w = backend.args, backend.w

    def size(name: str, expert: bool = False) -> int:  # a weight's bytes (one expert's), its INT4 scales included
        ts = [t[0] if expert else t for t in (w[name], w.get(f"{name}_scales")) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    per = w["norm"].element_size()  # the KV cache's dtype (norms are never packed)
    total = size("lm_head") + size("norm")
    for i in range(a.num_hidden_layers):
        L = f"layers.{i}"
        dense = ("wq", "wk", "wv", "wo", "gate", "attention_norm", "ffn_norm")
        total += sum(size(f"{L}.{n}") for n in dense)
        total += touched_experts[i] * (size(f"{L}.fc1", True) + size(f"{L}.fc2", True))
        window = backend.windows[i]
        keys = min(context, window) if window > 0 else context
        total += 2 * batch * a.num_key_value_heads * keys * a.head_dim * per
    return total


def touched(backend: Any, hidden_rows: int) -> list[int]:
    """Experts a decode step of `hidden_rows` tokens reads per layer: counted from the router on random hidden
    states (random weights route about uniformly)."""
    import torch

    a, out = backend.args, []
    for i in range(a.num_hidden_layers):
        x = torch.randn(hidden_rows, a.hidden_size, device=backend.device, dtype=backend.dtype)
        logits = x @ backend.w[f"layers.{i}.gate"].T
        out.append(int(logits.float().topk(a.moe.num_experts_per_tok, dim=-1).indices.unique().numel()))
    return out


def run_model(name: str, shape: dict[str, Any], device: str, dry: bool, batches: list[int], steps: int,
              prompt: int, peak: float | None, precision: str = "fp16") -> list[dict[str, Any]]:
    import torch

    args = model_args(shape)
    dtype = torch.float16
    context = prompt + steps + 4
    t0 = time.perf_counter()
    weights = random_weights(args, device, dtype)
    if precision == "int4":
        weights = quantize_int4(weights, 32 if dry else 128)
    made = time.perf_counter() - t0
    measure = _measure_fn(args, weights, device, steps, prompt, context, peak, made)
    rows: list[dict[str, Any]] = []
    for ops, batch in [(o, b) for o in ("triton", "torch") for b in batches]:
        base = {"model": name, "precision": precision, "ops": ops, "batch": batch}
        _guarded(rows, base, measure, ops, batch)
    del weights, measure
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def _measure_fn(args: Any, weights: dict[str, Any], device: str, steps: int, prompt: int, context: int,
                peak: float | None, made: float) -> Any:
    """measure(ops, batch) -> one row's numbers: a prompt prefilled per row, 2 warm-up decode steps, `steps` timed."""
    import numpy as np
    import torch

    from mixtrt.runtime.backends.triton_backend import TritonBackend

    backends: dict[str, Any] = {}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def measure(ops: str, batch: int) -> dict[str, Any]:
        if ops not in backends:
            backends.clear()  # one backend's device copies at a time
            backends[ops] = TritonBackend.from_state_dict(args, weights, max_context=max(context, 16),
                                                          precision="fp16", device=device, ops=ops)
        be = backends[ops]
        rng = np.random.default_rng(0)
        warm = be.new_cache(batch)  # a prefill and decode steps first: kernels compile on first use, untimed
        be.step(warm, rng.integers(3, args.vocab_size, (1, prompt)), last_only=True)
        for _ in range(2):
            be.step(warm, rng.integers(3, args.vocab_size, (batch, 1)))
        del warm
        cache = be.new_cache(batch)
        sync()
        t = time.perf_counter()
        for r in range(batch):
            be.step(cache, rng.integers(3, args.vocab_size, (1, prompt)), start_row=r, last_only=True)
        sync()
        prefill = time.perf_counter() - t
        ids = rng.integers(3, args.vocab_size, (batch, 1))
        for _ in range(2):
            be.step(cache, ids)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            be.step(cache, ids)
        sync()
        dt = (time.perf_counter() - t) / steps
        nbytes = decode_bytes(be, batch, int(cache.lengths.max()), touched(be, batch))
        del cache
        return {"ok": True, "prompt": prompt, "steps": steps, "decode_ms": dt * 1e3, "tok_s": batch / dt,
                "prefill_tok_s": batch * prompt / prefill, "bytes_per_step": nbytes, "gb_s": nbytes / dt / 1e9,
                "hbm_fraction": nbytes / dt / (peak * 1e12) if peak else None, "weights_made_s": made}

    return measure


def _peak(text: str) -> float:
    """An argparse type: a finite bandwidth above 0 (TB/s)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of TB/s, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value


def check_out(ap: argparse.ArgumentParser, out: Path | None) -> None:
    """--out is checked before any work (a lent machine's minutes are not spent on a report that cannot be saved):
    not a folder, and the nearest existing folder on its path is a writable folder. Nothing is made here."""
    if out is None:
        return
    if out.is_dir():
        ap.error(f"--out {out}: is a folder; name the report file")
    if out.exists() and not os.access(out, os.W_OK):
        ap.error(f"--out {out}: is not writable")
    at = out.absolute().parent
    while not at.exists():
        at = at.parent
    if not at.is_dir():
        ap.error(f"--out {out}: {at} is a file, not a folder")
    if not os.access(at, os.W_OK | os.X_OK):
        ap.error(f"--out {out}: the folder {at} is not writable")


def save_report(out: Path | None, report: dict[str, Any], script: str) -> None:
    """The report as JSON at `out` (after each part, so a run stopped at its time limit keeps what it measured); a
    path that cannot be written ends the run in one line."""
    if out is None:
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    except OSError as e:
        raise SystemExit(f"{script}: --out {out}: cannot be written ({e.strerror or e})") from None


def _counts(text: str) -> list[int]:
    """An argparse type: a comma-separated list of integers >= 1."""
    return [at_least(1)(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    ap.add_argument("--steps", type=at_least(1), default=None, help="timed decode steps (default 32; dry run 2)")
    ap.add_argument("--prompt", type=at_least(1), default=None, help="prompt tokens per row (default 128; dry run 4)")
    ap.add_argument("--batches", type=_counts, default=None,
                    help="comma-separated batch sizes (default 1,8; dry run 1,2)")
    ap.add_argument("--hbm-tbps", type=_peak, default=None, help="peak HBM bandwidth in TB/s (default: by GPU name)")
    ap.add_argument("--precision", default="fp16",
                    help="weights of the model runs: fp16, int4 or both (fp16,int4); default fp16")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--bare-import", action="store_true",
                    help="import the GPU path without mixtrt.runtime's __init__ (what happens where sentencepiece, "
                         "jinja2 or onnxruntime are missing)")
    ns = ap.parse_args(argv)
    precisions = ns.precision.split(",")
    if not precisions or any(p not in ("fp16", "int4") for p in precisions) or len(set(precisions)) < len(precisions):
        ap.error(f"--precision: fp16, int4 or fp16,int4, got {ns.precision!r}")
    check_out(ap, ns.out)
    if ns.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    _import_gpu_path(ns.bare_import)
    import torch
    import triton

    device = "cpu" if ns.dry_run else "cuda"
    if not ns.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    peak = ns.hbm_tbps if ns.hbm_tbps is not None else next((v for k, v in HBM_TBPS.items() if k in gpu), None)
    report: dict[str, Any] = {"device": gpu, "hbm_tbps": peak, "torch": torch.__version__, "triton": triton.__version__,
                              "dry_run": ns.dry_run, "load": os.getloadavg()}
    if device == "cuda":
        report["capability"] = list(torch.cuda.get_device_capability())
    print(json.dumps(report), flush=True)
    t0 = time.perf_counter()

    def save() -> None:
        save_report(ns.out, report, "bench_gpu.py")

    if not ns.skip_kernels:
        report["kernels"] = kernel_checks(device, ns.dry_run)
        save()
    steps = ns.steps or (2 if ns.dry_run else 32)
    prompt = ns.prompt or (4 if ns.dry_run else 128)
    batches = ns.batches or ([1, 2] if ns.dry_run else [1, 8])
    report["models"] = []
    report["model_runs"] = []

    def one_model(name: str, shape: dict[str, Any], precision: str) -> dict[str, Any]:
        rows = run_model(name, shape, device, ns.dry_run, batches, steps, prompt, peak, precision)
        report["models"] += rows
        return {"ok": True, "rows": len(rows)}

    for name, shape in model_shapes(ns.dry_run).items():
        for precision in precisions:
            _guarded(report["model_runs"], {"model": name, "precision": precision}, one_model, name, shape, precision)
            save()
    speed = {}
    measured = [r for r in report["models"] if "error" not in r]
    for r in (r for r in measured if r["ops"] == "triton"):
        base = next((b for b in measured if b["ops"] == "torch" and b["model"] == r["model"]
                     and b["batch"] == r["batch"] and b["precision"] == r["precision"]), None)
        if base is not None:
            tag = "" if r["precision"] == "fp16" else f" {r['precision']}"
            speed[f"{r['model']}{tag} batch {r['batch']}"] = r["tok_s"] / base["tok_s"]
    report["speedup_vs_torch_eager"] = speed
    report["seconds"] = time.perf_counter() - t0
    failed = [r for r in [*report.get("kernels", []), *report["models"], *report["model_runs"]] if not r["ok"]]
    print(json.dumps({"speedup_vs_torch_eager": speed, "seconds": report["seconds"], "failed": len(failed)}),
          flush=True)
    save()
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
