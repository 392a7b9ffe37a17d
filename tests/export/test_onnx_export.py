"""Export to an artifact directory and run it on onnxruntime: logits vs the reference model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mixtrt.export import export_onnx, load_model
from mixtrt.export.model import KVCache as TorchCache
from mixtrt.runtime.backends.onnxruntime import OrtBackend
from mixtrt.runtime.errors import ArtifactError, ConfigError
from mixtrt.runtime.manifest import Manifest
from tests.checkpoints import EXPORT_CASES as CASES
from tests.checkpoints import EXPORT_W as W
from tests.checkpoints import make_checkpoint


def _steps(prompt_len: int, window: int) -> list[int]:
    """Prefill longer than the window, 3W single-token decodes, then a multi-token step."""
    return [prompt_len] + [1] * (3 * window) + [4]


def _ort_vs_reference(ck: Path, art: Path, steps: list[int], seed: int = 5) -> float:
    """Run the same token steps through onnxruntime and the reference (each with its own cache) from
    empty; the largest |logit difference| over all steps relative to the largest |reference logit| (the
    tolerance the project states: fp32 summation order differs between the kernels, so an absolute bound
    would depend on the logits' scale and on the CPU's vector width). Checks the cache lengths advanced."""
    backend, model = OrtBackend.load(art, threads=2), load_model(ck)
    ids = torch.randint(3, 32000, (1, sum(steps)), generator=torch.Generator().manual_seed(seed))
    cache, tcache = backend.new_cache(1), TorchCache(model.args, 1, capacity=backend.capacity)
    worst, scale, pos = 0.0, 0.0, 0
    for s in steps:
        got = backend.step(cache, ids[:, pos:pos + s].numpy())
        with torch.no_grad():
            want = model(ids[:, pos:pos + s], cache=tcache).numpy()
        worst, pos = max(worst, float(np.abs(got - want).max())), pos + s
        scale = max(scale, float(np.abs(want).max()))
    assert cache.lengths.tolist() == [pos]
    return worst / scale


@pytest.mark.parametrize("name", list(CASES))
def test_ort_matches_reference_prefill_decode_multitoken(exported, name):
    worst = _ort_vs_reference(*exported[name], _steps(12, W), seed=0)
    assert worst <= 1e-4, f"{name}: max |onnxruntime - reference| / max |reference| = {worst}"




def test_fp16_export_within_tolerance(tmp_path):
    """fp16 graph vs the fp32 reference: documented tolerance 2e-2 relative to the logit range."""
    ck = make_checkpoint(tmp_path / "ck", "mixtral", sliding_window=W, max_position_embeddings=64,
                         initializer_range=0.1)
    art = export_onnx(ck, tmp_path / "art", precision="fp16", progress=None)
    manifest = Manifest.load(art)
    assert manifest.precision == "fp16" and manifest.cache.dtype == "float16"
    backend = OrtBackend.load(art, threads=2)
    model = load_model(ck)
    n = 12 + 3 * W  # prefill past the window, then 3W decodes
    ids = torch.randint(3, 32000, (1, n), generator=torch.Generator().manual_seed(2))
    cache = backend.new_cache(1)
    got = np.concatenate([backend.step(cache, ids[:, :12].numpy())]
                         + [backend.step(cache, ids[:, t:t + 1].numpy()) for t in range(12, n)], axis=1)
    with torch.no_grad():
        want = model(ids).numpy()
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 2e-2, rel










def test_manifest_and_graph(exported):
    ck, art = exported["mixtral-window"]
    m = Manifest.load(art)
    assert m.args.moe is not None and m.args.sliding_window == W
    assert m.cache.layout == "windowed" and m.cache.capacity == W + 16
    assert set(m.files) == {"model.onnx", "model.onnx.data", "weights.json", "tokenizer.model"}
    assert m.weight_index == "weights.json" and "weight-index" in m.features
    assert m.versions["onnxruntime"] and m.versions["torch"]
    model = onnx.load(str(art / "model.onnx"))
    onnx.checker.check_model(model)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops.count(("mixtrt", "SlidingWindowAttention")) == 2 and ops.count(("mixtrt", "MoE")) == 2
    assert {f.name for f in model.functions} == {"SlidingWindowAttention", "MoE"}
    assert ("mixtrt", 2) in {(o.domain, o.version) for o in model.opset_import}
    moe = next(n for n in model.graph.node if n.op_type == "MoE")  # one initializer per expert matrix
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    E, H, I = m.args.moe.num_experts, m.args.hidden_size, m.args.intermediate_size  # noqa: E741
    assert [inits.get(name) for name in moe.input[2:]] == [(2 * I, H)] * E + [(H, I)] * E
    names = [n.name for n in model.graph.node]
    assert "/model/layers.1/attention/SlidingWindowAttention_0" in names
    assert "/model/layers.0/feed_forward/MoE_0" in names
    assert len(set(names)) == len(names)
    swa = next(n for n in model.graph.node if n.op_type == "SlidingWindowAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in swa.attribute}
    assert attrs["window"] == W and attrs["windowed_cache"] == 1
    assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"mixtrt"
    assert [i.name for i in model.graph.input][:5] == ["input_ids", "total_lengths", "logit_positions",
                                                      "past_key_values.0.key", "past_key_values.0.value"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert dims[1:] == [m.args.num_key_value_heads, W + 16, m.args.head_dim]


def test_rms_norms_fuse_in_onnxruntime(exported, tmp_path):
    """Every RMSNorm (2 per layer + the final one) is exported as a division by Sqrt, which onnxruntime's
    optimizer turns into one SimplifiedLayerNormalization node (its optimized model shows it)."""
    import onnxruntime as ort

    _, art = exported["mixtral-window"]
    model = onnx.load(str(art / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    layers = Manifest.load(art).args.num_hidden_layers
    assert "Reciprocal" not in ops and ops.count("Sqrt") == 2 * layers + 1
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(art / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    assert fused.count("SimplifiedLayerNormalization") == 2 * layers + 1 and "Sqrt" not in fused


def test_no_window_model_gets_linear_cache(exported):
    m = Manifest.load(exported["mistral-nowindow"][1])
    assert m.cache.layout == "linear" and m.cache.capacity == m.max_context == 128


def test_export_sharded_checkpoint(tmp_path):
    ck = make_checkpoint(tmp_path / "ck", "mixtral", sliding_window=W, max_shard_size="2MB",
                         max_position_embeddings=64)
    assert (ck / "model.safetensors.index.json").is_file()
    art = export_onnx(ck, tmp_path / "art", progress=None)
    backend = OrtBackend.load(art, threads=2)
    ids = np.arange(3, 15)[None]
    got = backend.step(backend.new_cache(1), ids)
    with torch.no_grad():
        want = load_model(ck)(torch.from_numpy(ids)).numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_unwritable_out_dir_is_a_clear_error(tmp_path, exported):
    ck, _ = exported["mistral-window"]
    blocker = tmp_path / "blocker"  # a file where a parent directory should be: unwritable even for root
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match="blocker is a file, not a folder"):  # said before any weight is read
        export_onnx(ck, blocker / "sub" / "art", progress=None)


def test_read_only_out_dir_is_a_clear_error(tmp_path, exported):
    ck, _ = exported["mistral-window"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root, who can write into a read-only directory; "
                        "test_artifact_writes' test_a_staging_folder_that_cannot_be_made_is_one_line covers the "
                        "error path")
        with pytest.raises(ArtifactError, match="cannot write"):
            export_onnx(ck, locked / "art", progress=None)
    finally:
        locked.chmod(0o700)


def test_out_dir_that_is_a_file_or_non_empty(tmp_path, exported):
    ck, art = exported["mistral-window"]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        export_onnx(ck, f, progress=None)
    with pytest.raises(ArtifactError, match="already exists"):
        export_onnx(ck, art, progress=None)


def test_interrupted_export_leaves_no_half_artifact(tmp_path, exported, monkeypatch):
    ck, _ = exported["mistral-window"]
    import mixtrt.export.onnx_export as ox

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ox, "file_entries", boom)  # after model.onnx was written, before the manifest
    target = tmp_path / "art"
    with pytest.raises(KeyboardInterrupt):
        export_onnx(ck, target, progress=None)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_failed_overwrite_keeps_the_old_artifact(tmp_path, exported, monkeypatch):
    ck, art = exported["mistral-window"]
    import shutil

    import mixtrt.export.onnx_export as ox

    target = tmp_path / "art"
    shutil.copytree(art, target)
    before = (target / "manifest.json").read_text()
    monkeypatch.setattr(ox, "file_entries", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(ck, target, progress=None, overwrite=True)
    assert (target / "manifest.json").read_text() == before
    Manifest.load(target)  # still whole






def test_bad_options(exported, tmp_path):
    ck, _ = exported["mistral-window"]
    with pytest.raises(ConfigError, match="--precision"):
        export_onnx(ck, tmp_path / "a", precision="int3", progress=None)
    with pytest.raises(ConfigError, match="--max-context"):
        export_onnx(ck, tmp_path / "a", max_context=10**9, progress=None)
    assert not (tmp_path / "a").exists()


def test_polygraphy_onnxrt_runner_runs_the_exported_graph(exported):
    """The graph a TensorRT build consumes runs through Polygraphy's ONNX Runtime runner."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    _, art = exported["mixtral-window"]
    m = Manifest.load(art)
    a = m.args
    feed = {"input_ids": np.array([[1, 500, 600, 700]], np.int64), "total_lengths": np.array([4], np.int32),
            "logit_positions": np.array([[0, 1, 2, 3]], np.int64)}
    for spec in m.inputs[3:]:
        feed[spec.name] = np.zeros((1, a.num_key_value_heads, m.cache.capacity, a.head_dim), np.float32)
    with OnnxrtRunner(SessionFromOnnx(str(art / "model.onnx"), providers=["cpu"])) as runner:
        out = runner.infer(feed)
    backend = OrtBackend.load(art)
    want = backend.step(backend.new_cache(1), feed["input_ids"])
    assert np.abs(out["logits"] - want).max() <= 1e-5




def test_weights_always_external_and_hashed_as_written(exported):
    """Every weight lives in model.onnx.data (the graph keeps only small constants), whatever the model's
    size; the hash the exporter computed while writing is the file's, and a flipped byte is caught."""
    _, art = exported["mixtral-window"]
    m = Manifest.load(art)
    data = art / "model.onnx.data"
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    inline = [t.name for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) < 1024 for t in graph.initializer if t.name in inline)
    assert (art / "model.onnx").stat().st_size < 1 << 20 < data.stat().st_size
    from mixtrt.runtime.manifest import sha256_file

    assert m.files["model.onnx.data"] == {"sha256": sha256_file(data), "bytes": data.stat().st_size}


def test_a_flipped_weight_byte_is_refused(tmp_path, exported):
    _, art = exported["mixtral-window"]
    ext = tmp_path / "art"
    shutil.copytree(art, ext)
    raw = bytearray((ext / "model.onnx.data").read_bytes())
    raw[100] ^= 0xFF
    (ext / "model.onnx.data").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data: sha256"):
        OrtBackend.load(ext)


def _swa_attrs(art: Path) -> list[dict]:
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            for n in graph.node if n.op_type == "SlidingWindowAttention"]


def test_window_not_shorter_than_max_context_exports_full_causal(tmp_path):
    """W=8 exported with --max-context 6: the window never bites, so the graph is full causal, linear cache."""
    ck = make_checkpoint(tmp_path / "ck", "mistral", sliding_window=8, max_position_embeddings=64)
    art = export_onnx(ck, tmp_path / "art", max_context=6, progress=None)
    m = Manifest.load(art)
    assert m.cache.layout == "linear" and m.cache.capacity == 6
    assert all(a["window"] == -1 and a["windowed_cache"] == 0 for a in _swa_attrs(art))
    # the rope tables hold the positions the artifact serves, not max_position_embeddings' (a 1024000-position
    # config wrote 124 MiB of rows never read); every one of them is used below (4 + 1 + 1 positions)
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    rope = {t.name: list(t.dims) for t in model.graph.initializer if "rope_" in t.name}
    assert len(rope) == 2 and all(dims[0] == 6 for dims in rope.values()), rope
    assert _ort_vs_reference(ck, art, [4, 1, 1]) <= 1e-4


def _with_layer_types(ck: Path, layer_types: list[str]) -> Path:
    cfg = json.loads((ck / "config.json").read_text())
    cfg["layer_types"] = layer_types
    (ck / "config.json").write_text(json.dumps(cfg))
    return ck


def _ort_vs_transformers(ck: Path, art: Path, n: int) -> float:
    """One pass of n tokens through onnxruntime and through transformers (AutoModelForCausalLM, as it loads
    the checkpoint's config.json): max |logit difference| / max |transformers' logit|."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 32000, (1, n), generator=torch.Generator().manual_seed(7))
    backend = OrtBackend.load(art, threads=2)
    got = backend.step(backend.new_cache(1), ids.numpy())
    model = AutoModelForCausalLM.from_pretrained(ck, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(ids).logits.numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_mixed_layer_types_get_a_linear_cache_with_masked_windows(tmp_path):
    """A full-attention layer beside a windowed one (a Mistral config with layer_types, which transformers loads as
    Ministral): one linear cache; the windowed layer masks W keys; logits as transformers' and the reference's."""
    ck = _with_layer_types(make_checkpoint(tmp_path / "ck", "mistral", sliding_window=4, max_position_embeddings=64,
                                           initializer_range=0.5), ["sliding_attention", "full_attention"])
    art = export_onnx(ck, tmp_path / "art", progress=None)
    m = Manifest.load(art)
    assert m.cache.layout == "linear" and m.cache.capacity == 64
    assert [(a["window"], a["windowed_cache"]) for a in _swa_attrs(art)] == [(4, 0), (-1, 0)]
    assert _ort_vs_reference(ck, art, [10, 1, 1, 1, 1, 1, 1, 3]) <= 1e-4
    assert _ort_vs_transformers(ck, art, 19) <= 1e-4


def test_a_ministral_checkpoint_exports_as_the_mistral_model_it_is(tmp_path):
    """transformers' Ministral (what it saves a Mistral config with layer_types as) is Mistral with per-layer windows:
    it exports under its own name (it was refused as an unsupported architecture), with transformers' logits."""
    ck = make_checkpoint(tmp_path / "ck", "ministral", sliding_window=4, max_position_embeddings=64,
                         initializer_range=0.5, layer_types=["full_attention", "sliding_attention"])
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["architectures"] == ["MinistralForCausalLM"] and cfg["model_type"] == "ministral"
    art = export_onnx(ck, tmp_path / "art", progress=None)
    assert Manifest.load(art).args.architecture == "MinistralForCausalLM"
    assert [(a["window"], a["windowed_cache"]) for a in _swa_attrs(art)] == [(-1, 0), (4, 0)]
    assert _ort_vs_transformers(ck, art, 19) <= 1e-4
    del cfg["architectures"]  # told by model_type alone
    (ck / "config.json").write_text(json.dumps(cfg))
    assert _ort_vs_transformers(ck, export_onnx(ck, tmp_path / "art2", progress=None), 11) <= 1e-4


def test_a_mixtral_configs_layer_types_are_ignored_as_transformers_ignores_them(tmp_path):
    """transformers' Mixtral reads no layer_types: every layer keeps sliding_window. The export warns, windows
    every layer, and its logits are transformers' (honouring the field was off by O(1))."""
    ck = _with_layer_types(make_checkpoint(tmp_path / "ck", "mixtral", sliding_window=4, max_position_embeddings=64,
                                           initializer_range=0.5), ["sliding_attention", "full_attention"])
    with pytest.warns(UserWarning, match=r"config.json: layer_types is ignored, as transformers' Mixtral ignores it"):
        art = export_onnx(ck, tmp_path / "art", progress=None)
    assert Manifest.load(art).args.layer_types is None
    assert [a["window"] for a in _swa_attrs(art)] == [4, 4]
    assert _ort_vs_transformers(ck, art, 19) <= 1e-4


def test_sliding_layer_types_without_a_window_are_refused(tmp_path):
    ck = _with_layer_types(make_checkpoint(tmp_path / "ck", "mistral", sliding_window=None),
                           ["sliding_attention", "full_attention"])
    with pytest.raises(ConfigError, match=r"config.json: layer_types makes layer\(s\) \[0\] sliding_attention but "
                                          "sliding_window is null"):
        export_onnx(ck, tmp_path / "art", progress=None)
    assert not (tmp_path / "art").exists()


def test_force_never_replaces_a_directory_that_is_not_an_artifact(tmp_path, exported):
    ck, _ = exported["mistral-window"]
    precious = tmp_path / "work"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a mixtrt artifact"):
        export_onnx(ck, precious, overwrite=True, progress=None)
    assert (precious / "notes.txt").read_text() == "keep me"
