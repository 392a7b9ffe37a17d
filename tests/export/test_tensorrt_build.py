"""`mixtrt build` without TensorRT: the one-line error, and the artifact update with a fake builder (the file
handling is all ours; the real builder needs TensorRT and a GPU): the engine and its config added and listed,
the manifest moved in last, and a failed, interrupted or refused build leaving the artifact byte for byte as it
was, with nothing left beside it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mixtrt.export.tensorrt_build import build_engine, profile_shapes
from mixtrt.runtime.errors import ArtifactError, ConfigError, Terminated
from mixtrt.runtime.manifest import ENGINE_CONFIG, ENGINE_FILE, MANIFEST, TENSORRT_FEATURE, Manifest, is_artifact

ROOT = Path(__file__).resolve().parents[2]


def _tree(directory: Path) -> dict[str, str]:
    """Every entry beside and inside the artifact: name -> sha256 (what 'left as it was' compares)."""
    out = {}
    for p in sorted(directory.parent.rglob("*")):
        rel = p.relative_to(directory.parent).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture()
def artifact(exported, tmp_path) -> Path:
    dst = tmp_path / "side" / "art"
    shutil.copytree(exported["mistral-window"][1], dst)
    return dst


def fake_builder(payload: bytes = b"plan-bytes", calls: list | None = None):
    def build(onnx_path, profile, opt_level, timing_cache, plan):
        assert onnx_path.name == "tensorrt.onnx" and onnx_path.is_file()
        if calls is not None:
            calls.append((profile, opt_level, timing_cache))
        plan.write_bytes(payload)
        return {"tensorrt": "11.4.0-fake", "polygraphy": "0.53.6-fake"}
    return build


def test_build_adds_engine_and_lists_it(artifact, tmp_path):
    calls: list = []
    plan = build_engine(artifact, max_batch=4, opt_level=1, timing_cache=tmp_path / "t.cache",
                        builder=fake_builder(calls=calls), progress=None)
    assert plan == artifact / ENGINE_FILE and plan.read_bytes() == b"plan-bytes"
    m = Manifest.load(artifact)  # sizes and hashes of every file, exactly the listed files
    assert TENSORRT_FEATURE in m.features and m.backends[-1] == "tensorrt" and m.versions["tensorrt"] == "11.4.0-fake"
    assert {ENGINE_FILE, ENGINE_CONFIG} <= set(m.files) and is_artifact(artifact)
    config = json.loads((artifact / ENGINE_CONFIG).read_text())
    assert config["max_batch"] == 4 and config["opt_level"] == 1 and config["strongly_typed"]
    (profile, prefill), level, cache = calls[0]  # decode, then prefill
    C = m.cache.capacity
    step = C - m.cache.window + 1  # the SWA plugin's fused ring write bounds a step's tokens
    assert profile["input_ids"] == ((1, 1), (4, 1), (4, step)) and level == 1 and cache == tmp_path / "t.cache"
    assert step >= 2 and prefill["input_ids"] == ((1, 2), (1, step), (4, step))
    assert prefill["logit_positions"] == ((1, 1), (1, 1), (4, step)) and prefill["total_lengths"] == ((1,), (1,), (4,))
    assert config["prefill_profile"]["input_ids"] == [[1, 2], [1, step], [4, step]]
    assert config["max_step_tokens"] == step and config["moe_layers"] == 0 and config["moe_state"] is None
    assert profile["past_key_values.0.key"][2] == (4, m.args.num_key_value_heads, C, m.args.head_dim)
    assert config["profile"]["total_lengths"] == [[1], [4], [4]]
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["art"]  # no staging left
    from mixtrt.runtime.generation import Generator

    assert Generator.load(artifact).generate([[1, 2, 3]], max_new_tokens=2)[0].token_ids  # onnxruntime still runs it


def test_rebuild_needs_force_and_replaces(artifact):
    build_engine(artifact, builder=fake_builder(b"one"), progress=None)
    before = _tree(artifact)
    with pytest.raises(ConfigError, match="already holds a TensorRT engine.*--force"):
        build_engine(artifact, builder=fake_builder(b"two"), progress=None)
    assert _tree(artifact) == before
    build_engine(artifact, builder=fake_builder(b"two"), force=True, progress=None)
    assert (artifact / ENGINE_FILE).read_bytes() == b"two"
    assert Manifest.load(artifact).files[ENGINE_FILE]["bytes"] == 3


def test_failed_build_leaves_artifact_as_it_was(artifact):
    before = _tree(artifact)

    def broken(onnx_path, profile, opt_level, timing_cache, plan):
        plan.write_bytes(b"half")
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="builder crashed"):
        build_engine(artifact, builder=broken, progress=None)
    assert _tree(artifact) == before


def test_sigterm_during_build_leaves_artifact_as_it_was(artifact):
    before = _tree(artifact)

    def killed(onnx_path, profile, opt_level, timing_cache, plan):
        plan.write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the build")

    with pytest.raises(Terminated):
        build_engine(artifact, builder=killed, progress=None)
    assert _tree(artifact) == before


def test_failed_move_rolls_back(artifact, monkeypatch):
    """The manifest's move (the last one) fails: the engine moved in before it is taken out again and the old
    engine of a --force rebuild is put back."""
    build_engine(artifact, builder=fake_builder(b"old"), progress=None)
    before = _tree(artifact)
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == MANIFEST and Path(src).parent.name.startswith(".art.tmp-"):
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ArtifactError, match="the artifact is as it was"):
        build_engine(artifact, builder=fake_builder(b"new"), force=True, progress=None)
    monkeypatch.setattr(os, "replace", real)
    assert _tree(artifact) == before and Manifest.load(artifact).files[ENGINE_FILE]["bytes"] == 3


def test_bad_options_refused_before_any_work(artifact, tmp_path):
    before = _tree(artifact)
    for kw, match in ((dict(max_batch=0), "--max-batch"), (dict(opt_level=6), "--opt-level"),
                      (dict(timing_cache=tmp_path), "--timing-cache"),
                      (dict(timing_cache=tmp_path / "no" / "c"), "--timing-cache")):
        with pytest.raises(ConfigError, match=match):
            build_engine(artifact, builder=fake_builder(), progress=None, **kw)
    assert _tree(artifact) == before


def test_engine_feature_and_files_go_together(artifact):
    build_engine(artifact, builder=fake_builder(), progress=None)
    d = json.loads((artifact / MANIFEST).read_text())
    d["features"] = []
    with pytest.raises(ArtifactError, match="go together"):
        Manifest.from_dict(d)


def test_profile_shapes_cover_every_input(exported):
    m = Manifest.load(exported["mixtral-window"][1])
    shapes = profile_shapes(m, 8)
    assert list(shapes) == [t.name for t in m.inputs]
    assert all(len(lo) == len(hi) == len(t.shape) for t in m.inputs for lo, _, hi in [shapes[t.name]])


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_cli_without_tensorrt_names_what_is_missing(exported):
    art = exported["mistral-window"][1]
    r = subprocess.run([sys.executable, "-m", "mixtrt", "build", str(art)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    [line] = r.stderr.strip().splitlines()
    assert "needs tensorrt" in line and "pip install 'mixtrt[tensorrt]'" in line and "GPU" in line


def test_tensorrt_graph_stacks_experts_and_threads_the_state(exported, tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from mixtrt.export.tensorrt_build import STATE_ACC, STATE_COUNT, tensorrt_graph
    from mixtrt.plugins import trt_plugins

    src = exported["mixtral-window"][1] / "model.onnx"
    facts = tensorrt_graph(src, tmp_path / "tensorrt.onnx", max_tokens=40)
    m, orig = onnx.load(str(tmp_path / "tensorrt.onnx")), onnx.load(str(src))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in orig.graph.initializer}
    moe = [n for n in m.graph.node if n.op_type == "MoE"]
    old_moe = [n for n in orig.graph.node if n.op_type == "MoE"]
    assert facts["moe_layers"] == len(moe) == 2 and facts["moe_state"][STATE_ACC] == [40, 64]
    assert all(len(n.input) == len(trt_plugins.MOE_INPUTS) and len(n.output) == len(trt_plugins.MOE_OUTPUTS)
               for n in moe)
    for n, o in zip(moe, old_moe, strict=True):
        E = (len(o.input) - 2) // 2
        assert np.array_equal(inits[n.input[2]], np.stack([old[i] for i in o.input[2:2 + E]]))
        assert np.array_equal(inits[n.input[3]], np.stack([old[i] for i in o.input[2 + E:]]))
        assert list(n.input[:2]) == list(o.input[:2]) and n.output[0] == o.output[0]
    assert list(moe[0].input[4:]) == [STATE_ACC, STATE_COUNT] and list(moe[1].input[4:]) == list(moe[0].output[1:])
    assert [i.name for i in m.graph.input][-2:] == [STATE_ACC, STATE_COUNT]
    assert all({a.name: a.s for a in n.attribute}["plugin_version"] == b"1" for n in m.graph.node
               if n.domain == "mixtrt")
    assert not [f for f in m.functions if f.domain == "mixtrt"]
    assert not any(k.startswith("lm.model.layers.0.feed_forward.fc1.") for k in inits)  # per-expert copies dropped
