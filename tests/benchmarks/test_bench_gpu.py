"""benchmarks/bench_gpu.py --dry-run: the GPU script's whole code path on the CPU (tiny shapes, the Triton
interpreter), importing the GPU path without mixtrt.runtime's __init__ as it does where the CPU runtime's
dependencies are missing. Its numbers mean nothing; its report's structure, the kernel checks and the byte counts
are checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'mixtrt[gpu]'; the test extra lists it)")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # about 40 s on 2 cores: the benchmark script's own check, not the product's
def test_dry_run(tmp_path):
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--dry-run", "--bare-import",
                        "--precision", "fp16,int4", "--out", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "importing the GPU path alone" in r.stdout
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["device"] == "cpu (dry run)" and report["hbm_tbps"] is None
    kernels = report["kernels"]
    assert {(k["op"], k["dtype"]) for k in kernels} == {(op, dt) for op in ("swa", "moe", "int4_linear")
                                                         for dt in ("float16", "float32")}
    assert all(k["ok"] for k in kernels) and all(k["cache_rel_err"] == 0.0 for k in kernels if k["op"] == "swa")
    rows = report["models"]
    assert {(r["precision"], r["ops"], r["batch"]) for r in rows} == {
        (p, o, b) for p in ("fp16", "int4") for o in ("triton", "torch") for b in (1, 2)}
    fp16_bytes = 2 * (512 * 64 + 2 * (2 * 64 * 64 + 2 * 32 * 64 + 2 * 3 * 64 * 96))  # lm_head, q/k/v/o, 2 experts
    for row in rows:
        assert row["tok_s"] > 0 and row["decode_ms"] > 0 and row["hbm_fraction"] is None
        # tiny model: lm_head 512x64 + 2 layers of attention/router/norms + >= 2 experts of 3x64x96, fp16, + KV
        if row["precision"] == "fp16" or row["ops"] == "torch":  # eager runs the int4 weights dequantized to fp16
            assert fp16_bytes <= row["bytes_per_step"]
        else:  # packed: half a byte a weight plus an fp16 scale per 32 (0.5625 B), against 2 B
            assert row["bytes_per_step"] < 0.5 * fp16_bytes
    assert set(report["speedup_vs_torch_eager"]) == {f"tiny-mixtral{p} batch {b}" for p in ("", " int4")
                                                     for b in (1, 2)}


@pytest.mark.slow  # about a minute on 2 cores
def test_tune_dry_run(tmp_path):
    """benchmarks/tune_gpu.py --dry-run: every part runs, every configuration is checked against the reference and
    passes, the best per case is one of the measured rows, and the module constants it sets are restored."""
    out = tmp_path / "tune.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_gpu.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {x["part"] for x in rows} == {"int4_gemv", "moe_decode", "crossover"}
    swept = [x for x in rows if x["part"] != "crossover"]
    assert swept and all(x["ok"] and x["rel_err"] <= 1e-3 for x in swept)  # other tiles: fp16 partials rounded apart
    assert {(x["T"], x["weights"]) for x in rows if x["part"] == "moe_decode"} == {(1, "fp16"), (1, "int4"),
                                                                                   (8, "fp16"), (8, "int4")}
    for x in rows:
        if x["part"] == "crossover":
            keys = ("decode_ms", "tiled_ms", "grouped_ms") if x["op"] == "moe" else ("gemv_ms", "dot_ms")
            assert all(x[k] > 0 for k in keys), x
    assert len(report["best"]["moe_decode"]) == 4 and all(b in rows for b in report["best"]["moe_decode"])
    assert len(report["best"]["int4_gemv"]) == 1


def test_tune_patched_restores(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tune_gpu import Patched

    from mixtrt.plugins import int4_triton

    before = (int4_triton.GEMV_BLOCK_N, int4_triton.launch_options)
    with pytest.raises(RuntimeError), Patched(int4_triton, GEMV_BLOCK_N=4, launch_options=None):
        assert int4_triton.GEMV_BLOCK_N == 4 and int4_triton.launch_options is None
        raise RuntimeError("a configuration that fails")
    assert (int4_triton.GEMV_BLOCK_N, int4_triton.launch_options) == before


@pytest.mark.parametrize("script, args, says", [
    ("bench_gpu.py", ["--hbm-tbps", "0"], "--hbm-tbps: must be a finite number above 0"),
    ("bench_gpu.py", ["--hbm-tbps", "nan"], "--hbm-tbps: must be a finite number above 0"),
    ("bench_gpu.py", ["--precision", "fp16,fp16"], "--precision: fp16, int4 or fp16,int4"),
    ("bench_gpu.py", ["--out", "{tmp}"], "is a folder; name the report file"),
    ("bench_gpu.py", ["--out", "{tmp}/afile/r.json"], "afile is a file, not a folder"),
    ("tune_gpu.py", ["--parts", "int4_gemv,bogus"], "--parts: 'bogus' is not one of"),
    ("tune_gpu.py", ["--parts", "crossover,crossover"], "names a part twice"),
    ("tune_gpu.py", ["--out", "{tmp}/afile/t.json"], "afile is a file, not a folder"),
])
def test_arguments_are_checked_before_any_work(tmp_path, script, args, says):
    """A lent GPU machine's minutes are not spent before a bad argument is found: each is one usage line, exit 2,
    before anything is imported or measured, and nothing is written."""
    (tmp_path / "afile").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--dry-run",
                        *[a.format(tmp=tmp_path) for a in args]], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 2 and says in r.stderr and not r.stdout, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"{script}: error:")
    assert sorted(tmp_path.rglob("*")) == before


def test_gpu_check_refuses_a_bad_output_folder(tmp_path):
    (tmp_path / "afile").write_text("x")
    for argv, says in (([], "usage: bash scripts/gpu_check.sh OUTDIR"),
                       ([str(tmp_path / "afile" / "out")], "cannot make or write the output folder")):
        r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *argv], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and r.stderr.strip() == r.stderr.strip().splitlines()[0] and says in r.stderr


def test_a_failing_case_is_a_row_not_the_end_of_the_run():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_gpu import outcome

    def boom() -> dict:
        raise RuntimeError("out of resources: shared memory")

    assert outcome(lambda a: {"ok": True, "a": a}, 3) == {"ok": True, "a": 3}
    assert outcome(boom) == {"ok": False, "error": "RuntimeError: out of resources: shared memory"}
