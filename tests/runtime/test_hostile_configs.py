"""Hostile config.json / params.json: every bad one is one ConfigError naming the file and the field, read
before anything is allocated, and the checkpoint directory is left as it was."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixtrt.runtime.args import LIMITS, ModelArgs
from mixtrt.runtime.errors import ConfigError
from tests.hostile import one_line, tree

MISTRAL: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "sliding_window": 8,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": None, "tie_word_embeddings": False, "hidden_act": "silu",
}
MIXTRAL = {**MISTRAL, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 4,
           "num_experts_per_tok": 2}
PARAMS: dict[str, Any] = {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 2,
                          "norm_eps": 1e-5, "vocab_size": 32000, "rope_theta": 10000.0, "sliding_window": 8}
DROP = object()  # remove the field


def edited(base: dict[str, Any], **edits: Any) -> dict[str, Any]:
    cfg = json.loads(json.dumps(base))
    for key, value in edits.items():
        if value is DROP:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


# (config.json contents, the field the error must name); each is refused
HF_CASES = [
    (edited(MISTRAL, hidden_size="abc"), "hidden_size"),
    (edited(MISTRAL, hidden_size=None), "hidden_size"),
    (edited(MISTRAL, hidden_size=64.0), "hidden_size"),
    (edited(MISTRAL, hidden_size=True), "hidden_size"),
    (edited(MISTRAL, hidden_size=-64), "hidden_size"),
    (edited(MISTRAL, hidden_size=DROP), "hidden_size"),
    (edited(MISTRAL, intermediate_size=[96]), "intermediate_size"),
    (edited(MISTRAL, sliding_window=64.5), "sliding_window"),
    (edited(MISTRAL, sliding_window=0), "sliding_window"),
    (edited(MISTRAL, sliding_window="4096"), "sliding_window"),
    (edited(MISTRAL, rope_parameters={"rope_type": "default", "rope_theta": 0}), "rope_theta"),
    (edited(MISTRAL, rope_parameters={"rope_type": "default", "rope_theta": -10000.0}), "rope_theta"),
    (edited(MISTRAL, rope_parameters={"rope_type": "default", "rope_theta": "1e4"}), "rope_theta"),
    (edited(MISTRAL, rope_parameters=DROP, rope_theta=-0.5), "rope_theta"),
    (edited(MISTRAL, rope_parameters=DROP, rope_theta=1e-300), "rope_theta=1e-300 makes the rotary angles"),
    (edited(MISTRAL, rope_parameters="default"), "rope_parameters"),
    (edited(MISTRAL, rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
    # transformers applies a legacy rope_scaling beside rope_parameters: refused, not read as unscaled
    (edited(MISTRAL, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling: rope type 'linear'"),
    (edited(MISTRAL, max_position_embeddings=1), "max_position_embeddings=1: a model needs at least 2 positions"),
    (edited(MISTRAL, rms_norm_eps=-1e-5), "rms_norm_eps"),
    (edited(MISTRAL, rms_norm_eps=0), "rms_norm_eps"),
    (edited(MISTRAL, rms_norm_eps=-2.0), "rms_norm_eps"),
    (edited(MISTRAL, rms_norm_eps="1e-5"), "rms_norm_eps"),
    (edited(MISTRAL, max_position_embeddings=1e9), "max_position_embeddings"),
    (edited(MISTRAL, max_position_embeddings=2**31), "max_position_embeddings"),
    (edited(MISTRAL, num_hidden_layers=2_000_000), "num_hidden_layers"),
    (edited(MISTRAL, vocab_size=10**12), "vocab_size"),
    (edited(MISTRAL, num_attention_heads=4096), "num_attention_heads"),
    (edited(MISTRAL, num_key_value_heads=0), "num_key_value_heads"),
    (edited(MISTRAL, num_key_value_heads=3), "num_key_value_heads=3"),
    (edited(MISTRAL, head_dim=15), "head_dim"),
    (edited(MISTRAL, head_dim=DROP, hidden_size=66), "num_attention_heads"),
    (edited(MISTRAL, eos_token_id=32000), "eos_token_id"),
    (edited(MISTRAL, eos_token_id=[2, -1]), "eos_token_id"),
    (edited(MISTRAL, eos_token_id="2"), "eos_token_id"),
    (edited(MISTRAL, bos_token_id=99999), "bos_token_id"),
    (edited(MISTRAL, bos_token_id=1.0), "bos_token_id"),
    (edited(MISTRAL, tie_word_embeddings="yes"), "tie_word_embeddings"),
    (edited(MISTRAL, architectures="MistralForCausalLM"), "architectures"),
    (edited(MISTRAL, architectures=[1]), "architectures"),
    (edited(MISTRAL, architectures=[], model_type="llama"), "architecture"),
    (edited(MISTRAL, architectures=["LlamaForCausalLM"]), "LlamaForCausalLM"),
    (edited(MISTRAL, layer_types="sliding_attention"), "layer_types"),
    (edited(MISTRAL, layer_types=[1, 2]), "layer_types"),
    (edited(MISTRAL, layer_types=["sliding_attention"]), "layer_types"),
    (edited(MISTRAL, hidden_act="gelu"), "hidden_act"),
    (edited(MISTRAL, id2label=["a"]), "id2label"),
    (edited(MIXTRAL, num_local_experts=0), "num_local_experts"),
    (edited(MIXTRAL, num_local_experts=DROP), "num_local_experts"),
    (edited(MIXTRAL, num_experts_per_tok=5), "num_experts_per_tok"),
    (edited(MIXTRAL, num_experts_per_tok=1.5), "num_experts_per_tok"),
    (edited(MIXTRAL, num_local_experts=100_000), "num_local_experts"),
]


@pytest.mark.parametrize("cfg, field", HF_CASES, ids=[f"hf{i}-{f}" for i, (_, f) in enumerate(HF_CASES)])
def test_bad_config_json_is_one_line_naming_file_and_field(tmp_path, cfg, field):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    before = tree(tmp_path)
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_checkpoint_dir(tmp_path)
    one_line(e.value, str(tmp_path / "config.json"), field)
    assert tree(tmp_path) == before


PARAMS_CASES = [
    (edited(PARAMS, moe={"num_experts": 8}), "moe.num_experts_per_tok"),
    (edited(PARAMS, moe="yes"), "moe"),
    (edited(PARAMS, moe={"num_experts": "8", "num_experts_per_tok": 2}), "moe.num_experts"),
    (edited(PARAMS, dim="4096"), "dim"),
    (edited(PARAMS, dim=DROP), "dim"),
    (edited(PARAMS, norm_eps=0), "rms_norm_eps"),
    # required, as mistral-inference requires them (n_kv_heads was read as n_heads, norm_eps as 1e-5)
    (edited(PARAMS, n_kv_heads=DROP), "missing required field 'n_kv_heads'"),
    (edited(PARAMS, norm_eps=DROP), "missing required field 'norm_eps'"),
    (edited(PARAMS, rope_theta=-1.0), "rope_theta"),
    (edited(PARAMS, sliding_window=2.5), "sliding_window"),
    (edited(PARAMS, n_layers=10**7), "n_layers"),
    (edited(PARAMS, max_seq_len="32k"), "max_seq_len"),
]


@pytest.mark.parametrize("params, field", PARAMS_CASES, ids=[f"raw{i}-{f}" for i, (_, f) in enumerate(PARAMS_CASES)])
def test_bad_params_json_is_one_line_naming_file_and_field(tmp_path, params, field):
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_checkpoint_dir(tmp_path)
    one_line(e.value, str(tmp_path / "params.json"), field)


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)  # no disk space used


# (what config.json is, what the error must say)
FILE_CASES = [
    ("list", lambda p: p.write_text("[1, 2]"), "expected a JSON object, got list"),
    ("null", lambda p: p.write_text("null"), "expected a JSON object, got NoneType"),
    ("string", lambda p: p.write_text('"MistralForCausalLM"'), "expected a JSON object, got str"),
    ("empty", lambda p: p.write_text(""), "not valid JSON"),
    ("truncated", lambda p: p.write_text(json.dumps(MISTRAL)[:40]), "not valid JSON"),
    ("latin-1", lambda p: p.write_bytes(json.dumps({**MISTRAL, "name": "caf\u00e9"}, ensure_ascii=False)
                                        .encode("latin-1")), "not valid JSON"),
    ("nan-literal", lambda p: p.write_text(json.dumps(MISTRAL).replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN')),
     "NaN is not a JSON number"),
    ("infinity-literal", lambda p: p.write_text(json.dumps(MISTRAL).replace("10000.0", "Infinity")),
     "Infinity is not a JSON number"),
    ("huge-number", lambda p: p.write_text(json.dumps(MISTRAL).replace("10000.0", "1e400")), "rope_theta"),
    ("nested", lambda p: p.write_bytes(_nested(100_000)), "not valid JSON"),
    ("too-large", lambda p: _sparse(p, 65 << 20), "too large"),
    ("dangling-link", lambda p: p.symlink_to(p.parent / "gone.json"), "symbolic link to a file that does not exist"),
    ("directory", lambda p: p.mkdir(), "not a checkpoint directory"),
]


@pytest.mark.parametrize("name, make, message", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_unreadable_config_file_is_one_line(tmp_path, name, make, message):
    make(tmp_path / "config.json")
    before = tree(tmp_path)
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_checkpoint_dir(tmp_path)
    one_line(e.value, str(tmp_path), message)
    assert tree(tmp_path) == before


def test_no_directory_and_no_config(tmp_path):
    with pytest.raises(ConfigError, match="not a checkpoint directory") as e:
        ModelArgs.from_checkpoint_dir(tmp_path / "nope")
    one_line(e.value, "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"no config.json or params.json"):
        ModelArgs.from_checkpoint_dir(tmp_path)


def test_valid_configs_still_load():
    a = ModelArgs.from_hf_config(MIXTRAL)
    assert (a.moe and a.moe.num_experts, a.rope_theta, a.window(1), a.eos_token_ids) == (4, 10000.0, 8, (2,))
    b = ModelArgs.from_params_json(PARAMS)
    assert (b.hidden_size, b.head_dim, b.rms_norm_eps) == (64, 16, 1e-5)
    assert ModelArgs.from_dict(a.to_dict()) == a
    # integers where a float is expected are fine, and kept as floats (the manifest round-trips them)
    c = ModelArgs.from_hf_config(edited(MISTRAL, rope_parameters={"rope_theta": 1000000}))
    assert isinstance(c.rope_theta, float) and c.rope_theta == 1e6
    # any positive epsilon and theta, as transformers computes with them (1.0 itself was refused)
    d = ModelArgs.from_hf_config(edited(MISTRAL, rms_norm_eps=1.0, rope_parameters={"rope_theta": 1.0}))
    assert (d.rms_norm_eps, d.rope_theta) == (1.0, 1.0)
    e = ModelArgs.from_hf_config(edited(MISTRAL, rms_norm_eps=2.0, rope_parameters={"rope_theta": 0.5}))
    assert (e.rms_norm_eps, e.rope_theta) == (2.0, 0.5)


def test_nan_values_through_the_api_are_refused():
    for field in ("rms_norm_eps", "rope_theta"):
        with pytest.raises(ConfigError, match=field) as e:
            ModelArgs.from_hf_config(edited(MISTRAL, **{field: math.nan}, rope_parameters=DROP))
        one_line(e.value)


# ---- properties: any JSON value in any field gives a ModelArgs that makes sense, or one ConfigError ---------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
FIELDS = sorted(set(MIXTRAL) | {"rope_theta", "layer_types", "num_labels", "id2label", "rope_scaling"})


def _sane(a: ModelArgs) -> None:
    for name, limit in LIMITS.items():
        if hasattr(a, name):
            assert 1 <= getattr(a, name) <= limit
    assert 0 < a.rms_norm_eps < math.inf and 0 < a.rope_theta < math.inf
    assert a.sliding_window is None or (isinstance(a.sliding_window, int) and a.sliding_window >= 1)
    assert all(0 <= i < a.vocab_size for i in a.eos_token_ids)
    assert ModelArgs.from_dict(json.loads(json.dumps(a.to_dict()))) == a


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from([MISTRAL, MIXTRAL]), field=st.sampled_from(FIELDS), value=JSON)
def test_any_value_in_any_field(base, field, value):
    cfg = edited(base, **{field: value})
    try:
        a = ModelArgs.from_hf_config(cfg, source="c/config.json")
    except ConfigError as e:
        one_line(e, "c/config.json: ")
        return
    _sane(a)


@settings(max_examples=150, deadline=None)
@given(value=JSON)
def test_any_json_document(value):
    for build in (ModelArgs.from_hf_config, ModelArgs.from_params_json):
        try:
            _sane(build(value, source="c/x.json"))
        except ConfigError as e:
            one_line(e, "c/x.json: ")


def test_file_tree_helper_sees_hidden_files_and_links(tmp_path: Path):
    """The snapshot the tables compare would notice a deletion, a hidden leftover or a changed link."""
    (tmp_path / "a").write_text("1")
    before = tree(tmp_path)
    (tmp_path / ".hidden").mkdir()
    assert tree(tmp_path) != before
    (tmp_path / ".hidden").rmdir()
    (tmp_path / "l").symlink_to("a")
    assert tree(tmp_path) != before
