"""What TensorRT itself can be shown to accept without a GPU: TensorRT-RTX (`tensorrt-rtx-cu12` on PyPI, a test
dependency) parses and builds strongly typed engines on the CPU. It has no Python plugins, so the graphs built here
are the plugin-free forms of ours:

- a Mistral graph with its custom-op nodes replaced by their ONNX function bodies (`onnx.inliner`, what
  onnxruntime runs) for a head dim whose attention body is standard ops only (D=12: the `standard` body; the
  `gqa` bodies use com.microsoft.GroupQueryAttention, which TensorRT does not know), fp16 and fp32: every standard
  layer of our graphs (Gather, RMSNorm as Pow/ReduceMean/Sqrt/Reciprocal, MatMul, the RoPE and masked-softmax
  attention with ScatterElements into the ring, GatherElements of logit_positions) in a strongly typed network;
- INT4 weight-only `DequantizeLinear` (block 32 along the input dim, symmetric, fp16 scales) feeding a MatMul, the
  form TensorRT takes INT4 weights in.

Measured fact kept out of the tests: the MoE op's body does not build in TensorRT-RTX 1.7 (NonZero needs a plugin
creator it does not ship); in TensorRT the MoE runs as our plugin anyway.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu12; the "
                                                 "test extra lists it)")


def _build(model: onnx.ModelProto, batch: int = 2) -> tuple[bool, list[str], dict[str, str]]:
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        return False, [str(parser.get_error(i)) for i in range(parser.num_errors)], {}
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    dtypes = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dtypes[t.name] = str(t.dtype)
        shape = list(t.shape)
        lo, hi = [1 if d < 0 else d for d in shape], [batch if d < 0 else d for d in shape]
        profile.set_shape(t.name, lo, hi, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    return plan is not None and plan.nbytes > 0, [], dtypes


def _moe_alone(m: onnx.ModelProto, node: onnx.NodeProto, H: int = 64, E: int = 4) -> onnx.ModelProto:
    """A model of the TensorRT graph `m`'s MoE (or MoEInt4) node alone, with its initializers and state inputs
    (the tiny checkpoints' hidden H and experts E)."""
    from mixtrt.export.tensorrt_build import STATE_ACC, STATE_COUNT

    inits = [t for t in m.graph.initializer if t.name in node.input]
    inputs = [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, ["T", H]),
              helper.make_tensor_value_info(node.input[1], TensorProto.FLOAT, ["T", E]),
              helper.make_tensor_value_info(STATE_ACC, TensorProto.FLOAT, [8, H]),
              helper.make_tensor_value_info(STATE_COUNT, TensorProto.INT32, [8])]
    outputs = [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, ["T", H])]
    return helper.make_model(helper.make_graph([node], node.op_type, inputs, outputs, inits),
                             opset_imports=m.opset_import)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_mistral_graph_with_standard_bodies_builds(precision, tmp_path):
    from onnx import inliner

    from mixtrt.export import export_onnx
    from tests.checkpoints import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "mistral", sliding_window=5, hidden_size=48, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    art = export_onnx(ck, tmp_path / "art", precision=precision, progress=None)
    model = inliner.inline_local_functions(onnx.load(str(art / "model.onnx")))
    assert {n.domain for n in model.graph.node} == {""}  # standard ops only
    built, errors, dtypes = _build(model)
    assert built, errors
    half = "DataType.HALF" if precision == "fp16" else "DataType.FLOAT"
    assert dtypes["past_key_values.0.key"] == half and dtypes["input_ids"] == "DataType.INT64"


def test_int4_dequantize_linear_builds():
    K, N, block = 64, 32, 32
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (K, N)).astype(np.int8)
    weight = helper.make_tensor("w", TensorProto.INT4, [K, N], q.flatten().tolist())
    scale = helper.make_tensor("s", TensorProto.FLOAT16, [K // block, N],
                               (rng.random((K // block, N)) * 0.1 + 0.01).astype(np.float16).flatten().tolist())
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", N])], [weight, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    built, errors, _ = _build(model)
    assert built, errors


class _Recorder:
    """A plugin creator that records what the ONNX parser hands it (and makes no plugin, so parsing stops there)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def creator(self, name: str, fields: list[tuple[str, object]]):
        recorder = self

        class Creator(trt.IPluginCreatorV3One):
            def __init__(self) -> None:
                trt.IPluginCreatorV3One.__init__(self)
                self.name, self.plugin_namespace, self.plugin_version = name, "mixtrt", "1"
                self.field_names = trt.PluginFieldCollection([trt.PluginField(n, np.array([]), t) for n, t in fields])

            def create_plugin(self, node_name, fc, phase):
                recorder.calls.append((node_name, {f.name: (f.type, np.array(f.data).tolist()) for f in fc}))
                return None

        return Creator()


def test_parser_hands_our_nodes_to_plugins_with_their_attributes(exported, tmp_path):
    """TensorRT-RTX's ONNX parser (the onnx-tensorrt importer) on the graph `mixtrt build` gives TensorRT: every
    node but our two ops is imported; each of ours is looked up as plugin (op_type, "1", "mixtrt") and created
    with exactly the ONNX node's attributes, typed, and nothing else (plugin_version / plugin_namespace are the
    importer's, not fields)."""
    from mixtrt.export.tensorrt_build import tensorrt_graph
    from mixtrt.plugins import trt_plugins

    tensorrt_graph(exported["mixtral-window"][1] / "model.onnx", tmp_path / "t.onnx", max_tokens=8)
    I32, F32 = trt.PluginFieldType.INT32, trt.PluginFieldType.FLOAT32
    rec = _Recorder()
    swa = rec.creator("SlidingWindowAttention", [(n, F32 if n == "scale" else I32) for n in trt_plugins.SWA_ATTRIBUTES])
    moe = rec.creator("MoE", [("k", I32)])
    registry = trt.get_plugin_registry()
    assert registry.register_creator(swa, "mixtrt") and registry.register_creator(moe, "mixtrt")
    try:
        logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)  # kept alive: the parser does not own it
        parser = trt.OnnxParser(network, logger)
        assert not parser.parse_from_file(str(tmp_path / "t.onnx"))  # our recorder makes no plugin
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        assert len(errors) == 1 and "SlidingWindowAttention_0" in errors[0] and "Could not create" in errors[0]
        # the MoE node alone (the whole graph stops at the first attention node)
        m = onnx.load(str(tmp_path / "t.onnx"))
        node = next(n for n in m.graph.node if n.op_type == "MoE")
        one = _moe_alone(m, node)
        network2 = builder.create_network(flags)
        parser2 = trt.OnnxParser(network2, logger)
        assert not parser2.parse(one.SerializeToString())
    finally:
        registry.deregister_creator(swa)
        registry.deregister_creator(moe)
    (swa_node, swa_fields), (moe_node, moe_fields) = rec.calls
    assert swa_node.endswith("SlidingWindowAttention_0") and moe_node.endswith("MoE_0")
    assert list(swa_fields) == list(trt_plugins.SWA_ATTRIBUTES)
    assert swa_fields == {"num_heads": (I32, [4]), "kv_heads": (I32, [2]), "window": (I32, [5]),
                          "windowed_cache": (I32, [1]), "scale": (F32, [0.0])}
    assert moe_fields == {"k": (I32, [2])}


@pytest.fixture(scope="module")
def int4_mistral_d12(tmp_path_factory):
    """An int4 Mistral artifact (RTN, the defaults: block 32, INT8 vocabulary tables) whose head dim (12) takes the
    standard-op attention body."""
    from mixtrt.export import export_onnx
    from tests.checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("rtx-int4")
    ck = make_checkpoint(root / "ck", "mistral", sliding_window=5, hidden_size=48, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    return export_onnx(ck, root / "art", precision="int4", progress=None)


def test_int4_tensorrt_graph_standard_part_builds(int4_mistral_d12, tmp_path):
    """The int4 graph `mixtrt build` gives TensorRT, its attention nodes replaced by their standard-op bodies: INT4
    DequantizeLinear -> MatMul with RTN's negative scales, the INT8 lm_head, the embedding's DequantizeLinear ->
    Gather, all in one strongly typed fp32 network."""
    from onnx import inliner, numpy_helper

    from mixtrt.export.tensorrt_build import tensorrt_graph
    from mixtrt.plugins.onnx_common import attach_functions

    facts = tensorrt_graph(int4_mistral_d12 / "model.onnx", tmp_path / "t.onnx", max_tokens=8)
    assert facts["int4"] == {"gather": 1}
    model = onnx.load(str(tmp_path / "t.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    types = {inits[n.input[0]].data_type for n in dq}
    assert types == {TensorProto.INT4, TensorProto.INT8}
    assert any((numpy_helper.to_array(inits[n.input[1]]) < 0).any() for n in dq
               if inits[n.input[0]].data_type == TensorProto.INT4)
    attach_functions(model)
    model = inliner.inline_local_functions(model)
    assert {n.domain for n in model.graph.node} == {""}
    built, errors, dtypes = _build(model)
    assert built, errors
    assert dtypes["past_key_values.0.key"] == "DataType.FLOAT"


def test_parser_hands_the_int4_moe_node_to_its_plugin(exported, tmp_path):
    """The int4 Mixtral graph's MoEInt4 node is looked up as plugin ("MoEInt4", "1", "mixtrt") and created with
    exactly its attribute k; its inputs (INT32 words, fp32 scales, the state pair) are imported."""
    from mixtrt.export import export_onnx
    from mixtrt.export.tensorrt_build import MOE_INT4, tensorrt_graph

    art = export_onnx(exported["mixtral-window"][0], tmp_path / "art", precision="int4", progress=None)
    tensorrt_graph(art / "model.onnx", tmp_path / "t.onnx", max_tokens=8)
    m = onnx.load(str(tmp_path / "t.onnx"))
    node = next(n for n in m.graph.node if n.op_type == MOE_INT4)
    one = _moe_alone(m, node)
    assert sorted(t.data_type for t in one.graph.initializer) == [TensorProto.FLOAT, TensorProto.FLOAT,
                                                                 TensorProto.INT32, TensorProto.INT32]
    rec = _Recorder()
    creator = rec.creator(MOE_INT4, [("k", trt.PluginFieldType.INT32)])
    registry = trt.get_plugin_registry()
    assert registry.register_creator(creator, "mixtrt")
    try:
        logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        assert not parser.parse(one.SerializeToString())  # the recorder makes no plugin
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        assert len(errors) == 1 and "Could not create" in errors[0], errors
    finally:
        registry.deregister_creator(creator)
    [(name, fields)] = rec.calls
    assert name.endswith("MoE_0") and fields == {"k": (trt.PluginFieldType.INT32, [2])}
