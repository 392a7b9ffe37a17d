"""The launch-parameter sweep of the decode kernels on a GPU: which tile sizes, warps and pipeline stages read the
weights fastest, and where the decode forms stop paying against the tiled / grouped ones.

    python benchmarks/tune_gpu.py --out $OUT/tune_gpu.json     # on the GPU machine (a few minutes)
    python benchmarks/tune_gpu.py --dry-run                    # tiny shapes on the CPU (Triton interpreter)

Parts (each row printed as JSON as it is measured, the report rewritten after each part), run in the order
crossover, int4_gemv, moe_decode:
1. ``int4_gemv``: the dense INT4 kernel's GEMV form (plugins/int4_triton.py) at Mixtral-8x7B shapes, batch 1,
   over BLOCK_N x BLOCK_K x num_warps x num_stages; GB/s of the packed weights + scales it reads.
2. ``moe_decode``: the MoE decode kernel (plugins/moe/triton_kernels.py), fp16 and INT4 experts, T = 1 and 8,
   over BLOCK_I x BLOCK_K x num_warps x num_stages; GB/s of the experts the tokens route to.
3. ``crossover``: for T / M = 1 ... 64 rows, the decode / GEMV forms against the grouped / dot forms at the current
   defaults (the thresholds DECODE_MAX_TOKENS and GEMV_MAX_ROWS).
Every configuration's output is checked against the reference (the default configuration's output, and the
dequantized weights for INT4); a configuration that fails to compile or differs is reported, never ranked.
The module constants are set for a measurement and restored after it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _bench(call: Any, cuda: bool) -> float:
    """Median milliseconds of call() (triton's do_bench on a GPU; one timed call on the CPU)."""
    if cuda:
        from triton.testing import do_bench

        return float(do_bench(call, warmup=5, rep=25))
    t = time.perf_counter()
    call()
    return (time.perf_counter() - t) * 1e3


class Patched:
    """Set module attributes for a block, restore them after."""

    def __init__(self, module: Any, **values: Any) -> None:
        self.module, self.values, self.saved = module, values, {}

    def __enter__(self) -> None:
        for k, v in self.values.items():
            self.saved[k] = getattr(self.module, k)
            setattr(self.module, k, v)

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            setattr(self.module, k, v)


def _opts(warps: int, stages: int) -> Any:
    return lambda dtype, *form: {"num_warps": warps, "num_stages": stages}


def sweep_int4_gemv(device: str, dry: bool, emit: Any) -> None:
    import torch
    from bench_gpu import outcome, pack_int4, rel_err

    from mixtrt.plugins import int4_triton as dk

    cuda = device == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(70, 64, 32)] if dry else [(14336, 4096, 128), (4096, 14336, 128), (6144, 4096, 128)]
    grid = ([(16, 32, 4, 1), (32, 64, 4, 2)] if dry else
            list(itertools.product((8, 16, 32, 64), (128, 256, 512), (4, 8), (2, 4))))
    data = []
    for N, K, block in shapes:
        x = torch.randn(1, K, generator=g, device=device).half()
        packed, scales = pack_int4(torch.randn(N, K, generator=g, device=device).half(), block)
        want = dk.int4_linear(x, packed, scales, path="gemv").float()
        data.append((N, K, x, packed, scales, want, packed.numel() + scales.numel() * 2))

    def measure(bn: int, bk: int, warps: int, stages: int, x: Any, packed: Any, scales: Any, want: Any,
                nbytes: int) -> dict[str, Any]:
        with Patched(dk, GEMV_BLOCK_N=bn, GEMV_BLOCK_K=bk, launch_options=_opts(warps, stages)):
            err = rel_err(dk.int4_linear(x, packed, scales, path="gemv"), want)
            ms = _bench(lambda: dk.int4_linear(x, packed, scales, path="gemv"), cuda)
        return {"ok": err <= 2e-3, "rel_err": err, "ms": ms, "gb_s": nbytes / ms / 1e6}

    for bn, bk, warps, stages in grid:
        for N, K, x, packed, scales, want, nbytes in data:
            emit({"part": "int4_gemv", "N": N, "K": K, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps,
                  "num_stages": stages, **outcome(measure, bn, bk, warps, stages, x, packed, scales, want, nbytes)})


def sweep_moe_decode(device: str, dry: bool, emit: Any) -> None:
    import torch
    from bench_gpu import outcome, pack_int4, rel_err

    from mixtrt.plugins.moe import triton_kernels as mk

    cuda = device == "cuda"
    g = torch.Generator(device=device).manual_seed(1)
    H, I, E, k = (64, 96, 4, 2) if dry else (4096, 14336, 8, 2)
    block = 32 if dry else 128
    fc1 = (torch.randn(E, 2 * I, H, generator=g, device=device) * H**-0.5).half()
    fc2 = (torch.randn(E, H, I, generator=g, device=device) * I**-0.5).half()
    (p1, s1), (p2, s2) = pack_int4(fc1, block), pack_int4(fc2, block)
    grid = ([(16, 32, 4, 1), (32, 64, 4, 2)] if dry else
            list(itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (2, 3))))
    cases = []
    for T in (1, 8):
        x = torch.randn(T, H, generator=g, device=device).half()
        logits = (torch.randn(T, E, generator=g, device=device) * 2).half()
        used = int(logits.float().topk(k, dim=-1).indices.unique().numel())
        for form, w1, w2, sc in (("fp16", fc1, fc2, {}), ("int4", p1, p2, {"fc1_scales": s1, "fc2_scales": s2})):
            want = mk.moe(x, logits, w1, w2, k, path="decode", **sc).float()
            per_expert = w1[0].numel() * w1.element_size() + w2[0].numel() * w2.element_size() + sum(
                t[0].numel() * t.element_size() for t in sc.values())
            cases.append((T, form, x, logits, w1, w2, sc, want, used * per_expert))

    def measure(bi: int, bk: int, warps: int, stages: int, x: Any, logits: Any, w1: Any, w2: Any, sc: dict,
                want: Any, nbytes: int) -> dict[str, Any]:
        with Patched(mk, DECODE_BLOCK_I=bi, DECODE_BLOCK_K=bk, launch_options=_opts(warps, stages)):
            err = rel_err(mk.moe(x, logits, w1, w2, k, path="decode", **sc), want)
            ms = _bench(lambda: mk.moe(x, logits, w1, w2, k, path="decode", **sc), cuda)
        return {"ok": err <= 5e-3, "rel_err": err, "ms": ms, "gb_s": nbytes / ms / 1e6}

    for bi, bk, warps, stages in grid:
        for T, form, x, logits, w1, w2, sc, want, nbytes in cases:
            emit({"part": "moe_decode", "T": T, "weights": form, "BLOCK_I": bi, "BLOCK_K": bk, "num_warps": warps,
                  "num_stages": stages, **outcome(measure, bi, bk, warps, stages, x, logits, w1, w2, sc, want, nbytes)})


def crossover(device: str, dry: bool, emit: Any) -> None:
    import torch
    from bench_gpu import pack_int4

    from mixtrt.plugins import int4_triton as dk
    from mixtrt.plugins.moe import triton_kernels as mk

    cuda = device == "cuda"
    g = torch.Generator(device=device).manual_seed(2)
    H, I, E, k, block = (64, 96, 4, 2, 32) if dry else (4096, 14336, 8, 2, 128)
    fc1 = (torch.randn(E, 2 * I, H, generator=g, device=device) * H**-0.5).half()
    fc2 = (torch.randn(E, H, I, generator=g, device=device) * I**-0.5).half()
    (p1, s1), (p2, s2) = pack_int4(fc1, block), pack_int4(fc2, block)
    wq, ws = pack_int4(torch.randn(I, H, generator=g, device=device).half(), block)
    for T in ((1, 4) if dry else (1, 2, 4, 8, 16, 32, 64)):
        x = torch.randn(T, H, generator=g, device=device).half()
        logits = (torch.randn(T, E, generator=g, device=device) * 2).half()
        for form, w1, w2, sc in (("fp16", fc1, fc2, {}), ("int4", p1, p2, {"fc1_scales": s1, "fc2_scales": s2})):
            row: dict[str, Any] = {"part": "crossover", "op": "moe", "T": T, "weights": form}
            for path in ("decode", "tiled", "grouped"):
                try:
                    row[f"{path}_ms"] = _bench(lambda: mk.moe(x, logits, w1, w2, k, path=path, **sc), cuda)  # noqa: B023
                except Exception as e:  # noqa: BLE001
                    row[f"{path}_error"] = f"{type(e).__name__}: {e}"[:300]
            emit(row)
        row = {"part": "crossover", "op": "int4_linear", "M": T, "N": I, "K": H}
        for path in ("gemv", "dot"):
            try:
                row[f"{path}_ms"] = _bench(lambda: dk.int4_linear(x, wq, ws, path=path), cuda)  # noqa: B023
            except Exception as e:  # noqa: BLE001
                row[f"{path}_error"] = f"{type(e).__name__}: {e}"[:300]
        emit(row)


def best(rows: list[dict[str, Any]], part: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per case (keys), the fastest configuration that passed."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r.get("part") == part and r.get("ok"):
            case = tuple(r[k] for k in keys)
            if case not in out or r["ms"] < out[case]["ms"]:
                out[case] = r
    return list(out.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    ap.add_argument("--parts", default="crossover,int4_gemv,moe_decode", help="comma-separated parts to run")
    ns = ap.parse_args(argv)
    parts = {"int4_gemv": sweep_int4_gemv, "moe_decode": sweep_moe_decode, "crossover": crossover}
    names = ns.parts.split(",")
    for name in names:
        if name not in parts:
            ap.error(f"--parts: {name!r} is not one of {sorted(parts)}")
    if len(set(names)) < len(names):
        ap.error(f"--parts: {ns.parts!r} names a part twice")
    from bench_gpu import check_out, save_report

    check_out(ap, ns.out)
    if ns.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    from bench_gpu import _import_gpu_path

    _import_gpu_path()
    import torch
    import triton

    device = "cpu" if ns.dry_run else "cuda"
    if not ns.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
                              "torch": torch.__version__, "triton": triton.__version__, "rows": []}

    def emit(row: dict[str, Any]) -> None:
        report["rows"].append(row)
        print(json.dumps(row), flush=True)

    def save() -> None:
        save_report(ns.out, report, "tune_gpu.py")

    for name in names:
        parts[name](device, ns.dry_run, emit)
        save()
    report["best"] = {"int4_gemv": best(report["rows"], "int4_gemv", ("N", "K")),
                      "moe_decode": best(report["rows"], "moe_decode", ("T", "weights"))}
    for r in [*report["best"]["int4_gemv"], *report["best"]["moe_decode"]]:
        print(json.dumps({"best": r}), flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
