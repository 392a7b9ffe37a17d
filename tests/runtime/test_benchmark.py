"""`mixtrt.runtime.benchmark` and `mixtrt bench` on small exported artifacts."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.benchmark import bench, weight_bytes_per_token
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.manifest import Manifest
from tests.checkpoints import make_hf_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_weight_bytes_count_the_parameters_a_step_reads(family):
    """All parameters but the embedding (dense), minus the E - k experts a token skips (MoE)."""
    model = make_hf_model(family, num_local_experts=4, num_experts_per_tok=2) if family == "mixtral" \
        else make_hf_model(family)
    cfg = model.config
    args = ModelArgs.from_hf_config(cfg.to_dict())
    params = sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.hidden_size  # embedding
    if family == "mixtral":
        params -= cfg.num_hidden_layers * 2 * 3 * cfg.hidden_size * cfg.intermediate_size  # 2 skipped experts
    assert weight_bytes_per_token(args, 4) == 4 * params
    assert weight_bytes_per_token(args, 0.5) == params // 2


def test_bench_rates_and_fraction(exported):
    _, art = exported["mixtral-window"]
    r = bench(art, prompt_tokens=12, new_tokens=6, batch=2, threads=1)
    assert (r.batch, r.prompt_tokens, r.new_tokens, r.threads) == (2, 12, 6, 1)
    for v in (r.prefill_tokens_per_s, r.decode_tokens_per_s, r.read_bandwidth_gb_s, r.peak_rss_mib, r.load_s):
        assert math.isfinite(v) and v > 0
    assert r.rss_after_load_mib is not None and 0 < r.rss_after_load_mib <= r.peak_rss_mib
    assert 0 <= r.huge_pages_mib <= r.rss_after_load_mib and r.huge_pages_mib % 2 == 0  # whole 2 MiB pages
    step = r.decode_step_ms
    assert 0 < step["min"] <= step["median"] <= step["max"]
    # batch rows per step: the step rate is decode tok/s / batch; the fraction uses a batch-1 step's bytes
    assert r.bandwidth_fraction == pytest.approx(r.decode_tokens_per_s / 2 * r.weight_bytes_per_token
                                                 / (r.read_bandwidth_gb_s * 1e9))
    # the limit is a token rate: 2 rows a step, each step reading the weights once
    assert r.bandwidth_limit_tokens_per_s == pytest.approx(2 * r.read_bandwidth_gb_s * 1e9 / r.weight_bytes_per_token)
    assert r.decode_tokens_per_s / r.bandwidth_limit_tokens_per_s == pytest.approx(r.bandwidth_fraction)
    assert json.loads(json.dumps(r.to_dict()))["decode_step_ms"]["median"] == step["median"]
    # the bytes are the manifest's count from the graph (what `inspect` prints), which for fp32 is the parameters a
    # step reads (as the estimate from the shapes has them), one row of each RoPE table and the graph's small
    # constants; not the whole RoPE tables (128 positions here: 16 KiB)
    manifest = Manifest.read(art)
    assert r.weight_bytes_per_token == manifest.summary["bytes_per_token"]
    assert 0 <= r.weight_bytes_per_token - weight_bytes_per_token(manifest.args, 4) <= 1024


def test_bench_refuses_what_it_cannot_measure(exported):
    _, art = exported["mixtral-window"]  # max context 128
    with pytest.raises(ConfigError, match="new_tokens=2 must be an integer >= 3"):
        bench(art, new_tokens=2)
    with pytest.raises(ConfigError, match=r"\(--prompt-tokens \+ --new-tokens\) = 130 is more than the 128 positions"):
        bench(art, prompt_tokens=126, new_tokens=4)
    with pytest.raises(ConfigError, match="batch"):
        bench(art, batch=0)
    with pytest.raises(ConfigError, match="repetitions=0 must be an integer >= 1"):
        bench(art, repetitions=0)


def test_bench_command_json_and_text(exported):
    _, art = exported["mistral-window"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mixtrt", "bench", str(art), "--prompt-tokens", "8",
                               "--new-tokens", "4", "--threads", "1", *extra], capture_output=True, text=True,
                              timeout=120, cwd=ROOT, env=env)

    r = cli("--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["new_tokens"] == 4 and d["decode_tokens_per_s"] > 0 and 0 < d["bandwidth_fraction"]
    assert d["repetitions"] == 1 and d["decode_tokens_per_s_stddev"] == 0 and len(d["decode_samples"]) == 1
    # -r as llama-bench's: the rates are the repetitions' means, with their standard deviations and each one
    r = cli("-r", "3", "--json")
    d = json.loads(r.stdout)
    assert d["repetitions"] == 3 and len(d["decode_samples"]) == len(d["prefill_samples"]) == 3
    assert d["decode_tokens_per_s"] == pytest.approx(sum(d["decode_samples"]) / 3)
    assert d["decode_tokens_per_s_stddev"] == pytest.approx(statistics.stdev(d["decode_samples"]))
    assert d["load_s"] > 0 and 0 < d["rss_after_load_mib"] <= d["peak_rss_mib"]
    text = cli("--repetitions", "2").stdout
    assert " ± " in text and "(mean of 2 repetitions)" in text
    assert re.search(r"\npeak RSS      \d+ MiB \(\d+ MiB right after loading\)\nload          [\d.]+ s \(with the "
                     r"sha256 check; --no-verify skips it\)(; \d+ MiB of weights on huge pages)?\n", text), text
    bad = cli("--batch", "0")
    assert bad.returncode == 2 and "--batch: 0 is less than 1" in bad.stderr and len(bad.stderr.splitlines()) == 1


@pytest.mark.parametrize("fraction", [0.8, 1.3])
def test_bench_text_explains_a_fraction_above_one(monkeypatch, capsys, fraction):
    """A model small enough to stay in the CPU's caches decodes above the memory-bandwidth limit: the text says
    why, and only then."""
    import argparse

    from mixtrt.cli.commands import bench as command
    from mixtrt.runtime import benchmark

    result = benchmark.BenchResult(
        artifact="a", batch=1, threads=1, prompt_tokens=8, new_tokens=4, prefill_tokens_per_s=100.0,
        decode_tokens_per_s=50.0, decode_step_ms={"median": 20.0, "min": 19.0, "max": 21.0}, peak_rss_mib=100.0,
        weight_bytes_per_token=2**20, read_bandwidth_gb_s=10.0, bandwidth_limit_tokens_per_s=50 / fraction,
        bandwidth_fraction=fraction)
    monkeypatch.setattr(benchmark, "bench", lambda *a, **k: result)
    ns = argparse.Namespace(artifact="a", prompt_tokens=8, new_tokens=4, batch=1, threads=1, no_verify=True,
                            json=False, repetitions=1)
    assert command.run(ns) == 0
    out = capsys.readouterr().out
    assert f"decode at {fraction:.0%} of it" in out
    assert ("above 100%: the 1.0 MiB a step reads stay in the CPU's caches" in out) == (fraction > 1)
