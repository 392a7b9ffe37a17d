"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 without a GPU: PTX (ISA 8.0) and a cubin,
no global or profile scratch, the hidden-argument layout TensorRT's AOT launch must follow, and the shared
memory of the kernels TensorRT plugins embed within the 48 KB a launch gets without opting in.

The compiler runs in a subprocess without TRITON_INTERPRET (the interpreter tests set it for this process, and
it is read when the kernels are decorated), with a fresh TRITON_CACHE_DIR. By default one spec per kernel
and weight form is compiled; `pytest -m slow` compiles every spec of AOT_SPECS and JIT_SPECS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install triton; the test extra lists it)")

SCRIPT = r"""
import json, os, subprocess, sys, tempfile
from mixtrt.plugins import int4_triton as dense
from mixtrt.plugins.moe import triton_kernels as moe
from mixtrt.plugins.swa import triton_kernels as swa
from mixtrt.plugins.triton_aot import compile_spec

every, archs, ptxas = sys.argv[1] == "all", [int(a) for a in sys.argv[2].split(",")], sys.argv[3]
specs = [("aot", s) for s in swa.AOT_SPECS + moe.AOT_SPECS + dense.AOT_SPECS] + [
    ("jit", s) for s in swa.JIT_SPECS + moe.JIT_SPECS + dense.JIT_SPECS]
print(json.dumps({"specs": len(specs)}), flush=True)
if not every:  # one spec per kernel and weight form (INT4 or not), the smallest (head dim, experts) first
    seen, first = set(), []
    for kind, spec in sorted(specs, key=lambda ks: (ks[1][2].get("HEAD_DIM", 0), ks[1][2].get("E_P2", 0))):
        key = (spec[0].__name__, bool(spec[2].get("INT4")), spec[2].get("GEMV"))
        if key not in seen:
            seen.add(key)
            first.append((kind, spec))
    specs = first
for arch in archs:
    for kind, spec in specs:
        kernel, sig, meta, opts = spec
        k = compile_spec(spec, arch)
        ptx = k.asm["ptx"]
        entry = ptx[ptx.index(".entry"):ptx.index(")", ptx.index(".entry"))]
        row = {"arch": arch, "kind": kind, "kernel": kernel.__name__, "name": k.metadata.name, "gemv": meta.get("GEMV"),
               "ptx_version": next(l for l in ptx.splitlines() if l.startswith(".version")),
               "target": next(l for l in ptx.splitlines() if l.startswith(".target")),
               "params": entry.count(".param"), "args": sum(t != "constexpr" for t in sig.values()),
               "cubin": len(k.asm.get("cubin", b"")), "shared": k.metadata.shared,
               "num_warps": k.metadata.num_warps, "scratch": [k.metadata.global_scratch_size,
                                                               k.metadata.profile_scratch_size]}
        if ptxas:  # the machine's own ptxas assembles the PTX too (what a driver of that CUDA release accepts)
            with tempfile.TemporaryDirectory() as d:
                src = os.path.join(d, "k.ptx")
                open(src, "w").write(ptx)
                gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
                r = subprocess.run([ptxas, f"-arch={gpu}", src, "-o", os.path.join(d, "k.cubin")], capture_output=True,
                                   text=True)
                row["system_ptxas"] = r.returncode == 0 or r.stderr[-300:]
        print(json.dumps(row), flush=True)
"""

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # per block, opted in
TRT_SHARED = 48 * 1024  # without cudaFuncAttributeMaxDynamicSharedMemorySize


def _compile(tmp_path, every: bool, archs=(80, 90)) -> list[dict]:
    """The rows of every spec compiled for each arch: one compiler process per arch, run side by side (each
    compiles on one core), its output in a file (no pipe to fill while the other is waited on)."""
    ptxas = shutil.which("ptxas") or ""
    procs = []
    try:
        for arch in archs:
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env["TRITON_CACHE_DIR"] = str(tmp_path / f"triton-cache-{arch}")
            env["TRITON_DEFAULT_FP_FUSION"] = "1"
            out, err = open(tmp_path / f"out-{arch}", "w+"), open(tmp_path / f"err-{arch}", "w+")
            procs.append((subprocess.Popen([sys.executable, "-c", SCRIPT, "all" if every else "one", str(arch), ptxas],
                                           stdout=out, stderr=err, text=True, env=env), out, err))
        rows: list[dict] = []
        for n, (proc, out, err) in enumerate(procs):
            proc.wait(timeout=1500)
            out.seek(0)
            err.seek(0)
            assert proc.returncode == 0, err.read()[-3000:]
            lines = [json.loads(line) for line in out.read().splitlines() if line.startswith("{")]
            rows += lines if n == 0 else lines[1:]  # the spec count once
        return rows
    finally:
        for proc, out, err in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
            err.close()


def _split(rows: list[dict]) -> tuple[int, list[dict]]:
    assert "specs" in rows[0]
    return rows[0]["specs"], rows[1:]


def _check(rows: list[dict]) -> None:
    for r in rows:
        where = f"{r['kernel']} sm_{r['arch']}"
        assert r["ptx_version"] == ".version 8.0", where
        assert r["target"].startswith(f".target sm_{r['arch']}"), where
        assert r["name"] == r["kernel"] and r["cubin"] > 0, where
        assert r["scratch"] == [0, 0], where
        assert r["params"] == r["args"] + 2, where  # + the two hidden scratch pointers
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], where
        if r["kind"] == "aot":
            assert r["shared"] <= TRT_SHARED, (where, r["shared"])
        assert r.get("system_ptxas", True) is True, (where, r.get("system_ptxas"))


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    _, rows = _split(_compile(tmp_path, every=False))
    kernels = {r["kernel"] for r in rows}
    assert {(r["kernel"], r["gemv"]) for r in rows if r["kernel"] == "int4_linear_kernel"} == {
        ("int4_linear_kernel", True), ("int4_linear_kernel", False)}  # the dense INT4 linear's two forms
    assert kernels == {"swa_attention_kernel", "swa_cache_write_kernel", "swa_combine_kernel", "moe_decode_kernel",
                       "moe_decode_aliased_kernel", "moe_tiled_kernel", "moe_tiled_aliased_kernel", "moe_align_kernel",
                       "moe_fc1_kernel", "moe_fc2_kernel", "moe_sum_kernel", "int4_linear_kernel"}
    assert {r["arch"] for r in rows} == {80, 90}
    _check(rows)


@pytest.mark.slow
def test_all_aot_and_jit_specs_compile(tmp_path):
    total, rows = _split(_compile(tmp_path, every=True))
    assert len(rows) == 2 * total
    _check(rows)
