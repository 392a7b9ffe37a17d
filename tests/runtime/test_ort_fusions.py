"""The onnxruntime backend's load-time graph rewrites (runtime/backends/ort_fusions.py): packed q/k/v and residual
norms give the unrewritten graph's logits, for every attention body, both families, float and quantized weights;
what they do not match is left as it was, with the reason."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

from mixtrt.export import export_onnx
from mixtrt.export.quantize import Int4Options
from mixtrt.plugins.swa.onnx_op import path_for
from mixtrt.runtime.backends.onnxruntime import OrtBackend
from mixtrt.runtime.backends.ort_fusions import fuse
from mixtrt.runtime.manifest import MODEL_FILE
from tests.checkpoints import EXPORT_W as W
from tests.checkpoints import make_checkpoint

# head dims 16 / 24 / 12 take the gqa / gqa_rope / standard attention bodies
CASES = {
    "mistral-d16": dict(family="mistral", sliding_window=W),
    "mixtral-d24": dict(family="mixtral", sliding_window=W, head_dim=24),
    "mistral-d12-nowindow": dict(family="mistral", sliding_window=None, head_dim=12, num_key_value_heads=1),
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusions")
    out = {}
    for name, kw in CASES.items():
        kw = dict(kw)
        ck = make_checkpoint(root / f"{name}-ck", kw.pop("family"), max_position_embeddings=64, **kw)
        out[name] = export_onnx(ck, root / name, progress=None)
    ck = make_checkpoint(root / "int4-ck", "mistral", sliding_window=W, max_position_embeddings=64)
    out["mistral-int4"] = export_onnx(ck, root / "mistral-int4", precision="int4", progress=None,
                                      int4=Int4Options(block_size=32, accuracy_level=0))
    return out


def _run(backend: OrtBackend, seed: int = 0) -> list[np.ndarray]:
    """Two rows prefilled apart (ragged), then decoded together past 3 windows."""
    rng = np.random.default_rng(seed)
    v = backend.args.vocab_size
    cache = backend.new_cache(2)
    out = [backend.step(cache, rng.integers(3, v, (1, 9)), 0), backend.step(cache, rng.integers(3, v, (1, 4)), 1)]
    for _ in range(3 * W):
        out.append(backend.step(cache, rng.integers(3, v, (2, 1))))
    return out


@pytest.mark.parametrize("name", [*CASES, "mistral-int4"])
def test_fused_graph_gives_the_written_graphs_logits(artifacts, name):
    art = artifacts[name]
    fused, plain = OrtBackend.load(art, threads=1), OrtBackend.load(art, threads=1, fuse=False)
    layers = fused.args.num_hidden_layers
    assert fused.fusions.residual_norms == 2 * layers  # after attention, and after the FFN / MoE
    assert fused.fusions.packed_qkv == layers and fused.fusions.skipped == []
    gqa = path_for(fused.args.head_dim) == "gqa"
    assert fused.fusions.packed_attention == (layers if gqa else 0)
    assert plain.fusions.packed_qkv == 0
    for got, want in zip(_run(fused), _run(plain), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_fusions_leave_the_artifact_untouched_and_fewer_nodes(artifacts, tmp_path):
    art = artifacts["mistral-d16"]
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in art.iterdir()}
    model = onnx.load(str(art / MODEL_FILE), load_external_data=False)
    n = len(model.graph.node)
    counts = fuse(model, art)
    # per layer: 3 projections -> a Concat of their weights (folded at load) and 1 MatMul; the attention node
    # -> GroupQueryAttention; each of two norms (6 nodes) and its residual Add -> 1 node; plus the shared
    # lengths (Sub, ReduceMax)
    layers = counts.packed_qkv
    assert len(model.graph.node) == n - layers * (1 + 2 * 6) + 2
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in art.iterdir()} == before


def test_unmatched_projections_are_left_with_a_reason(artifacts):
    """A q projection that is not a MatMul by an initializer: that layer keeps its three MatMuls."""
    art = artifacts["mistral-d16"]
    model = onnx.load(str(art / MODEL_FILE), load_external_data=False)
    swa = next(n for n in model.graph.node if n.op_type == "SlidingWindowAttention")
    q = next(n for n in model.graph.node if swa.input[0] in n.output)
    relu = onnx.helper.make_node("Relu", [q.output[0]], [f"{q.output[0]}_relu"])
    model.graph.node.insert(list(model.graph.node).index(swa), relu)
    swa.input[0] = relu.output[0]
    counts = fuse(model, art)
    assert counts.packed_qkv == counts.residual_norms // 2 - 1
    assert len(counts.skipped) == 1 and "not three MatMuls" in counts.skipped[0]


def test_mixed_quantized_projections_are_left(tmp_path):
    """A Mixtral int4 artifact keeps wk/wv INT8 by default and wq INT4: not packed (different types), said so,
    and the norms are still fused."""
    ck = make_checkpoint(tmp_path / "ck", "mixtral", sliding_window=W, max_position_embeddings=32)
    art = export_onnx(ck, tmp_path / "art", precision="int4", progress=None)
    backend = OrtBackend.load(art, threads=1)
    assert backend.fusions.packed_qkv == 0
    assert len(backend.fusions.skipped) == backend.args.num_hidden_layers
    assert all("differ in type" in s for s in backend.fusions.skipped)
    assert backend.fusions.residual_norms == 2 * backend.args.num_hidden_layers


def test_quantized_packing_is_bounded_by_the_bytes_held_in_the_graph(artifacts, monkeypatch):
    """Packed quantized q/k/v live in the graph proto (copied at session creation): past MAX_HELD_BYTES a layer keeps
    its three projections, says why, and the graph still gives the same logits."""
    from mixtrt.runtime.backends import ort_fusions

    art = artifacts["mistral-int4"]
    model = onnx.load(str(art / MODEL_FILE), load_external_data=False)
    per_layer = fuse(model, art).held_bytes // 2  # the 2 layers' packed bytes
    monkeypatch.setattr(ort_fusions, "MAX_HELD_BYTES", per_layer)
    backend, plain = OrtBackend.load(art, threads=1), OrtBackend.load(art, threads=1, fuse=False)
    assert backend.fusions.packed_qkv == 1 and backend.fusions.held_bytes == per_layer
    assert len(backend.fusions.skipped) == 1 and "MiB held in the graph" in backend.fusions.skipped[0]
    for got, want in zip(_run(backend), _run(plain), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_a_subclass_options_reach_the_rewritten_session(artifacts, tmp_path):
    """benchmarks/profile_int4.py profiles the graph the backend runs: its subclass's options (the profiler) reach
    the session made from the rewritten graph, whose profile then shows the fused nodes."""
    import json

    class Profiled(OrtBackend):
        def session_options(self, threads):
            opts = super().session_options(threads)
            opts.enable_profiling, opts.profile_file_prefix = True, str(tmp_path / "prof")
            return opts

    be = Profiled.load(artifacts["mistral-int4"], threads=1)
    cache = be.new_cache(1)
    be.step(cache, np.asarray([[3, 4, 5]]))
    ops = {e["args"]["op_name"] for e in json.loads(open(be.session.end_profiling()).read())
           if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    assert {"SkipSimplifiedLayerNormalization", "GroupQueryAttention", "MatMulNBits"} <= ops
    assert "DequantizeLinear" not in ops and "Pow" not in ops


def test_rss_floor_script_saves_the_graph_the_backend_runs(artifacts, tmp_path):
    """benchmarks/rss_floor_int4.py measures onnxruntime alone on the model the backend runs: its saved optimized
    model (pre-packed weights beside the unpacked ones, loaded with optimizations off) gives the backend's logits,
    and its index's packed bytes are read."""
    import importlib.util
    from pathlib import Path

    import onnxruntime as ort

    script_path = Path(__file__).resolve().parents[2] / "benchmarks" / "rss_floor_int4.py"
    spec = importlib.util.spec_from_file_location("rss_floor_int4", script_path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    art = artifacts["mistral-int4"]
    sizes = script.child_save(art, tmp_path, 1)
    assert sizes["packed_bytes"] >= sizes["unpacked_bytes"] > 0  # equal at accuracy level 0; 1.5x INT4 at level 4
    lean = script.child_lean(tmp_path / script.SAVED, 1)
    assert lean["after_load_mib"] >= lean["floor_mib"] > 0 and lean["peak_mib"] >= lean["after_load_mib"]
    backend, saved = OrtBackend.load(art, threads=1), OrtBackend.load(art, threads=1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    saved.session = ort.InferenceSession(str(tmp_path / script.SAVED), opts, providers=["CPUExecutionProvider"])
    for got, want in zip(_run(saved), _run(backend), strict=True):
        np.testing.assert_array_equal(got, want)
