"""Every valid attention shape exports to a graph that runs: head dims onnxruntime's GroupQueryAttention
refuses get another body (plugins/swa/SPEC.md, "onnxruntime bodies"), and each exported model generates
the same greedy tokens as transformers through a prompt longer than its window.

The default suite runs one case per body that is not plain GQA; `-m slow` sweeps head_dim over
{8, 12, 24, 40, 64, 80, 96, 128} with two GQA ratios each (odd head counts, ratios 1..8, no window,
a window longer than the context).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixtrt.export import export_onnx
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.generation import GenerationConfig, Generator
from mixtrt.runtime.manifest import Manifest
from tests.checkpoints import hf_greedy, make_checkpoint

W = 5
PROMPT = np.random.default_rng(7).integers(3, 32000, 13).tolist()  # longer than W
NEW = 3 * W
BODY = {8: "gqa_rope", 12: "standard", 24: "gqa_rope", 40: "gqa_rope", 64: "gqa", 80: "gqa", 96: "gqa",
        128: "gqa"}

# name -> (family, head_dim, query heads, kv heads, window); a window of 999 outlives the 64-position context
SWEEP = {
    "d8-r8": ("mistral", 8, 8, 1, W), "d8-r1-nowindow": ("mixtral", 8, 3, 3, None),
    "d12-r3": ("mixtral", 12, 6, 2, W), "d12-r1-nowindow": ("mistral", 12, 5, 5, None),
    "d24-r4": ("mistral", 24, 8, 2, W), "d24-r2-longwindow": ("mixtral", 24, 6, 3, 999),
    "d40-r1": ("mixtral", 40, 5, 5, W), "d40-r3": ("mistral", 40, 3, 1, W),
    "d64-r4": ("mistral", 64, 4, 1, W), "d64-r7-nowindow": ("mixtral", 64, 7, 1, None),
    "d80-r3": ("mixtral", 80, 3, 1, W), "d80-r2": ("mistral", 80, 4, 2, W),
    "d96-r1": ("mistral", 96, 2, 2, W), "d96-r2": ("mixtral", 96, 2, 1, W),
    "d128-r2": ("mixtral", 128, 2, 1, W), "d128-r5": ("mistral", 128, 5, 1, W),
}
DEFAULT = ("d12-r3", "d24-r4")


def _case(name: str):
    return pytest.param(name, marks=() if name in DEFAULT else pytest.mark.slow)


@pytest.mark.parametrize("name", [_case(name) for name in SWEEP])
def test_greedy_generation_equals_transformers(tmp_path, name):
    family, D, heads, kv_heads, window = SWEEP[name]
    ck = make_checkpoint(tmp_path / "ck", family, head_dim=D, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, sliding_window=window, max_position_embeddings=64)
    art = export_onnx(ck, tmp_path / "art", progress=None)
    m = Manifest.load(art)
    assert m.summary["attention_body"] == BODY[D]
    assert m.cache.layout == ("windowed" if window == W else "linear")
    [out] = Generator.load(art, threads=2).generate([PROMPT], GenerationConfig(max_new_tokens=NEW, eos_token_id=()))
    assert out.token_ids == hf_greedy(ck, PROMPT, NEW)


def test_export_refuses_a_head_dim_no_body_serves(tmp_path):
    """An odd head dim has no rotate_half halves: refused before anything is written, naming the limit."""
    ck = make_checkpoint(tmp_path / "ck", "mistral", sliding_window=W, max_position_embeddings=64)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["head_dim"] = 13
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="head_dim=13 must be even"):
        export_onnx(ck, tmp_path / "art", progress=None)
    assert not (tmp_path / "art").exists()


def test_an_epsilon_of_one_and_a_theta_below_one_match_transformers(tmp_path):
    """Any positive rms_norm_eps and rope_theta is taken, as transformers computes with them (1.0 and 0.5 were
    refused): greedy tokens through 3W equal transformers', so both values reach the graph as they are."""
    ck = make_checkpoint(tmp_path / "ck", "mistral", rms_norm_eps=1.0, rope_theta=0.5, sliding_window=W,
                         max_position_embeddings=64)
    assert json.loads((ck / "config.json").read_text())["rope_parameters"]["rope_theta"] == 0.5
    art = export_onnx(ck, tmp_path / "art", progress=None)
    [out] = Generator.load(art, threads=2).generate([PROMPT], GenerationConfig(max_new_tokens=NEW, eos_token_id=()))
    assert out.token_ids == hf_greedy(ck, PROMPT, NEW)
