"""`mixtrt build` on int4 artifacts, without TensorRT: the graph TensorRT parses (export/tensorrt_build.py
`tensorrt_graph` / `int4_forms`) and the artifact update.

- The forms: the int4 MoE node becomes `MoEInt4` with the plugin's fixed inputs (its INT32 words are the triton
  backend's packed experts byte for byte), the embedding's GatherBlockQuantized a DequantizeLinear + Gather, the
  dense INT4 DequantizeLinear -> MatMul kept (RTN's negative scales too), INT8 scales positive, no com.microsoft op.
- The numbers: the TensorRT graph run by onnxruntime with each plugin node replaced by what it computes
  (tests/export/trt_reference.py) gives the artifact's own logits (accuracy level 0: fp32 matmuls on both sides,
  within 1e-4 of max|logit|), for Mixtral and for a Mistral graph holding every other quantized form the rewrite
  reads (MatMulNBits bits 4 and 8, a 4-bit GatherBlockQuantized, an all-zero INT8 block, a negative INT8 scale).
- `build_engine` with a fake builder: the engine is added, the quantization record names the TensorRT graph's
  source, engine.json lists the rewrites.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixtrt.export import export_onnx
from mixtrt.export.quantize import Int4Options
from mixtrt.export.tensorrt_build import MOE_INT4, STATE_ACC, STATE_COUNT, build_engine, tensorrt_graph
from mixtrt.runtime.backends import load_backend
from mixtrt.runtime.backends.graph_weights import read_graph_weights
from mixtrt.runtime.manifest import ENGINE_CONFIG, ENGINE_FILE, TENSORRT_FEATURE, Manifest
from tests.checkpoints import EXPORT_W
from tests.export import trt_reference
from tests.int4_forms import int4_table

FAMILIES = ["mistral-window", "mixtral-window"]
LOGIT_TOL = 1e-4  # relative to max|logit|: fp32 on both sides


@pytest.fixture(scope="module")
def int4_artifacts(exported, tmp_path_factory):
    """name -> int4 artifact (RTN: signed scales, block 64, INT8 vocabulary tables, accuracy level 0)."""
    root = tmp_path_factory.mktemp("trt-int4")
    return {name: export_onnx(exported[name][0], root / name, precision="int4", progress=None,
                              int4=Int4Options(block_size=64, accuracy_level=0)) for name in FAMILIES}


def _ids(seed: int, n: int) -> np.ndarray:
    return np.array([[1, *np.random.default_rng(seed).integers(3, 32000, n - 1).tolist()]])


def _logits_equal(artifact, graph, trt_path, tmp_path) -> None:
    """The TensorRT graph at `trt_path` (run by onnxruntime through trt_reference) gives the logits of the graph at
    path `graph` (None: the artifact's model.onnx through its onnxruntime backend) on one prefill longer than the
    window."""
    ids = _ids(3, 2 * EXPORT_W + 3)
    ref = trt_reference.session(trt_reference.onnxruntime_model(trt_path), tmp_path)
    got = ref.run(["logits"], trt_reference.prefill_feeds(ref, ids))[0]
    if graph is None:
        ort = load_backend("onnxruntime", artifact, threads=1)
        want = ort.step(ort.new_cache(1), ids)
    else:
        want_sess = trt_reference.session(graph)
        want = want_sess.run(["logits"], trt_reference.prefill_feeds(want_sess, ids))[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= LOGIT_TOL * np.abs(want).max()


def test_int4_mixtral_graph_forms(int4_artifacts, tmp_path):
    art = int4_artifacts["mixtral-window"]
    args = Manifest.load(art).args
    facts = tensorrt_graph(art / "model.onnx", tmp_path / "t.onnx", max_tokens=16)
    m = onnx.load(str(tmp_path / "t.onnx"))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    assert not [n for n in g.node if n.domain == "com.microsoft"] and not [f for f in m.functions]
    moe = [n for n in g.node if n.op_type == MOE_INT4]
    assert len(moe) == args.num_hidden_layers and facts["moe_layers"] == len(moe)
    assert facts["int4"] == {"moe": len(moe), "gather": 1}
    assert facts["moe_state"][STATE_ACC] == [16, args.hidden_size]
    from mixtrt.plugins.trt_plugins import MOE_INT4_INPUTS, MOE_OUTPUTS

    packed = read_graph_weights(art / "model.onnx", args).tensors  # what the triton backend's kernels take
    for i, node in enumerate(moe):
        assert len(node.input) == len(MOE_INT4_INPUTS) and len(node.output) == len(MOE_OUTPUTS)
        assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {
            "k": 2, "plugin_version": b"1", "plugin_namespace": b"mixtrt"}
        fc1, s1, fc2, s2 = (numpy_helper.to_array(inits[n]) for n in node.input[2:6])
        assert inits[node.input[2]].data_type == TensorProto.INT32
        assert np.array_equal(fc1.view(np.uint8), packed[f"layers.{i}.fc1"])
        assert np.array_equal(fc2.view(np.uint8), packed[f"layers.{i}.fc2"])
        assert np.array_equal(s1, packed[f"layers.{i}.fc1_scales"])
        assert np.array_equal(s2, packed[f"layers.{i}.fc2_scales"])
    assert list(moe[0].input[6:]) == [STATE_ACC, STATE_COUNT] and list(moe[1].input[6:]) == list(moe[0].output[1:])
    dqs = {n.name: n for n in g.node if n.op_type == "DequantizeLinear"}
    kinds = {inits[n.input[0]].data_type for n in dqs.values()}
    assert kinds == {TensorProto.INT4, TensorProto.INT8}
    int4_scales = np.concatenate([numpy_helper.to_array(inits[n.input[1]]).ravel() for n in dqs.values()
                                  if inits[n.input[0]].data_type == TensorProto.INT4])
    assert (int4_scales < 0).any()  # RTN's signed scales reach TensorRT as they are
    assert all((numpy_helper.to_array(inits[n.input[1]]) > 0).all() for n in dqs.values()
               if inits[n.input[0]].data_type == TensorProto.INT8)
    gather = next(n for n in g.node if n.op_type == "Gather" and n.name.startswith("/model/embed_tokens"))
    table = next(n for n in dqs.values() if n.output[0] == gather.input[0])
    assert {a.name: a.i for a in table.attribute} == {"axis": 1, "block_size": 64}
    _logits_equal(art, None, tmp_path / "t.onnx", tmp_path)


def _other_forms(art) -> onnx.ModelProto:
    """The Mistral int4 graph with every other quantized form the rewrite reads: layer 0's wq and the lm_head as
    com.microsoft.MatMulNBits (bits 4, bits 8), the embedding as a 4-bit GatherBlockQuantized, an all-zero INT8
    block (scale 0) and a negative INT8 scale in layer 1's wq turned INT8 DequantizeLinear."""
    from mixtrt.plugins.int4 import matmulnbits_layout, pack_int8

    model = onnx.load(str(art / "model.onnx"))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    for node in list(g.node):
        dq = producers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        block = next(a.i for a in dq.attribute if a.name == "block_size")
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int8).T  # [N, K]
        scales = numpy_helper.to_array(inits[dq.input[1]]).T  # [N, K/block]
        N, K = q.shape
        if node.name.startswith("/model/layers.1/attention/wq"):  # INT8 DequantizeLinear, a zero and a negative scale
            w = q.astype(np.float32) * np.repeat(scales, block, axis=1)
            w[0, :block] = 0
            q8, s8 = pack_int8(w, block)
            q8[1, :block], s8[1, 0] = -q8[1, :block], -s8[1, 0]
            assert s8[0, 0] == 0 and s8[1, 0] < 0
            inits[dq.input[0]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(q8.T), dq.input[0]))
            inits[dq.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(s8.T), dq.input[1]))
            continue
        if not (node.name.startswith("/model/layers.0/attention/wq") or node.name.startswith("/lm_head")):
            continue
        if inits[dq.input[0]].data_type == TensorProto.INT4:
            nib = q.view(np.uint8) & 0x0F
            bits, packed = 4, matmulnbits_layout((nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8), block)
        else:
            bits, packed = 8, (q.view(np.uint8) ^ 0x80).reshape(N, K // block, block)
        g.initializer.extend([numpy_helper.from_array(packed, f"{node.name}.B"),
                              numpy_helper.from_array(np.ascontiguousarray(scales).reshape(-1), f"{node.name}.S")])
        node.CopyFrom(helper.make_node("MatMulNBits", [node.input[0], f"{node.name}.B", f"{node.name}.S"],
                                       list(node.output), name=node.name, domain="com.microsoft", K=K, N=N,
                                       bits=bits, block_size=block))
    gather = next(n for n in g.node if n.op_type == "GatherBlockQuantized")
    int4_table(g, gather, numpy_helper.to_array(inits[gather.input[0]]).shape)
    return model


def test_int4_other_forms_give_the_same_logits(int4_artifacts, tmp_path):
    art = int4_artifacts["mistral-window"]
    model = _other_forms(art)
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(model, str(src / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    facts = tensorrt_graph(src / "model.onnx", tmp_path / "t.onnx", max_tokens=16)
    assert facts["int4"] == {"matmulnbits": 2, "gather": 1, "int8_scales": 1} and facts["moe_layers"] == 0
    g = onnx.load(str(tmp_path / "t.onnx")).graph
    assert not [n for n in g.node if n.domain == "com.microsoft"]
    inits = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "DequantizeLinear" and inits[n.input[0]].data_type == TensorProto.INT8:
            assert (numpy_helper.to_array(inits[n.input[1]]) > 0).all(), n.name
    _logits_equal(art, src / "model.onnx", tmp_path / "t.onnx", tmp_path)


def test_build_engine_on_an_int4_artifact(int4_artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(int4_artifacts["mixtral-window"], art)
    seen = {}

    def builder(onnx_path, profile, opt_level, timing_cache, plan):
        seen["ops"] = {n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}
        plan.write_bytes(b"plan")
        return {"tensorrt": "11.4.0-fake", "polygraphy": "0.53.6-fake"}

    build_engine(art, builder=builder, progress=None)
    assert MOE_INT4 in seen["ops"] and "GatherBlockQuantized" not in seen["ops"] and "MoE" not in seen["ops"]
    m = Manifest.load(art)
    assert TENSORRT_FEATURE in m.features and "tensorrt" in m.backends and (art / ENGINE_FILE).is_file()
    assert m.quantization is not None and m.quantization.graphs["tensorrt"] == "model.onnx"
    config = json.loads((art / ENGINE_CONFIG).read_text())
    assert config["int4"] == {"moe": 2, "gather": 1} and config["moe_layers"] == 2
