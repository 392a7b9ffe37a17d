"""The built-in model's held-out perplexity as an int4 artifact of each calibrated method (the defaults otherwise),
against the value recorded in models/tiny-mixtral/eval-int4.json (a ~1 min export + ~40 s of scoring: slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixtrt.export import export_onnx
from mixtrt.export.quantize import Int4Options
from mixtrt.runtime.generation import Generator
from mixtrt.runtime.perplexity import evaluate

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-mixtral"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_builtin_int4_heldout_perplexity_matches_the_record(tmp_path, method):
    record = json.loads((MODEL / "eval-int4.json").read_text())
    art = export_onnx(MODEL, tmp_path / "int4", precision="int4", int4=Int4Options(method=method), progress=None)
    gen = Generator.load(art, threads=2)
    ids = gen.tokenizer.encode((MODEL / "heldout.txt").read_bytes().decode("utf-8"))
    got = evaluate(gen.backend, ids, 256)
    assert got["scored_tokens"] == record["scored_tokens"]
    recorded = record["int4"][method]["perplexity"]
    assert abs(got["perplexity"] - recorded) / recorded <= 0.01
    # a calibrated method beats round to nearest, and stays within 1% of fp32 (the target)
    assert got["perplexity"] < record["int4"]["rtn"]["perplexity"]
    assert got["perplexity"] / record["fp32_onnxruntime"] - 1 <= 0.01
