"""mixtrt::MoE alone: the ONNX node + its function body on onnxruntime CPU vs torch.ops.mixtrt.moe."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import mixtrt.plugins.moe.torch_op  # noqa: F401  (registers torch.ops.mixtrt.moe)
from mixtrt.plugins.moe import OP_TYPE
from mixtrt.plugins.moe import onnx_op as moe_onnx_op
from mixtrt.plugins.onnx_functions import make_session, single_op_model

H, I = 32, 48
FP32_RTOL = 1e-4  # max|diff| <= FP32_RTOL * max(1, max|ref|)
FP16_RTOL = 5e-3  # onnxruntime fp16 vs the fp32 reference on the same fp16 inputs (measured <= ~1e-3)
TRAP_MIN = 5e-2  # each trap must move the output by more than this (relative), far above any tolerance


def _model(dtype, k: int) -> onnx.ModelProto:
    io = [("hidden", dtype, ["T", H]), ("router_logits", dtype, ["T", "E"]),
          ("fc1", dtype, ["E", 2 * I, H]), ("fc2", dtype, ["E", H, I])]
    return single_op_model(OP_TYPE, io, [("output", dtype, ["T", H])], {"k": k})


_SESSIONS: dict = {}


def _session(dtype, k: int, model: onnx.ModelProto | None = None):
    if model is not None:
        return make_session(model)
    key = (np.dtype(dtype).name, k)
    if key not in _SESSIONS:
        _SESSIONS[key] = make_session(_model(dtype, k))
    return _SESSIONS[key]


def _inputs(T: int, E: int, seed: int):
    """Routing with clear margins (no near-ties at the top-k boundary, also after fp16 rounding)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    spaced = torch.linspace(-2.0, 2.0, E)
    logits = torch.stack([spaced[torch.randperm(E, generator=g)] for _ in range(T)])
    logits = logits + 0.05 * torch.randn(T, E, generator=g)
    fc1 = 0.3 * torch.randn(E, 2 * I, H, generator=g)
    fc2 = 0.3 * torch.randn(E, H, I, generator=g)
    return hidden, logits, fc1, fc2


def _run(sess, hidden, logits, fc1, fc2, dtype):
    feeds = {"hidden": hidden, "router_logits": logits, "fc1": fc1, "fc2": fc2}
    return sess.run(None, {n: t.numpy().astype(dtype) for n, t in feeds.items()})[0]


def _rel(a: np.ndarray, ref: torch.Tensor) -> tuple[float, float]:
    ref = ref.float().numpy()
    diff = float(np.abs(a.astype(np.float32) - ref).max())
    return diff, diff / max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("E", [2, 3, 8])
@pytest.mark.parametrize("T", [1, 5, 17, 40])
def test_moe_matches_reference(T, E, k, dtype):
    hidden, logits, fc1, fc2 = _inputs(T, E, seed=T * 100 + E * 10 + k)
    if dtype == np.float16:  # both sides see the same fp16-rounded values; the reference runs in fp32
        hidden, logits, fc1, fc2 = (t.half().float() for t in (hidden, logits, fc1, fc2))
    ref = torch.ops.mixtrt.moe(hidden, logits, fc1, fc2, k)
    out = _run(_session(dtype, k), hidden, logits, fc1, fc2, dtype)
    assert out.shape == (T, H) and out.dtype == dtype
    _, rel = _rel(out, ref)
    assert rel <= (FP32_RTOL if dtype == np.float32 else FP16_RTOL), rel


def test_reference_fp16_matches_fp32():
    hidden, logits, fc1, fc2 = (t.half() for t in _inputs(9, 4, seed=1))
    ref16 = torch.ops.mixtrt.moe(hidden, logits, fc1, fc2, 2)
    ref32 = torch.ops.mixtrt.moe(hidden.float(), logits.float(), fc1.float(), fc2.float(), 2)
    assert ref16.dtype == torch.float16
    assert _rel(ref16.float().numpy(), ref32)[1] <= FP16_RTOL


# --- traps: each known mistake runs fine and must give a large difference --------------------------------


def _trap_inputs():
    return _inputs(24, 8, seed=7)


def test_trap_probabilities_instead_of_logits():
    hidden, logits, fc1, fc2 = _trap_inputs()
    ref = torch.ops.mixtrt.moe(hidden, logits, fc1, fc2, 2)
    out = _run(_session(np.float32, 2), hidden, logits.softmax(-1), fc1, fc2, np.float32)
    assert _rel(out, ref)[1] > TRAP_MIN


def test_trap_normalize_routing_weights_0():
    model = _model(np.float32, 2)
    (moe,) = [n for f in model.functions for n in f.node if n.op_type == "MoE"]
    (attr,) = [a for a in moe.attribute if a.name == "normalize_routing_weights"]
    attr.i = 0
    hidden, logits, fc1, fc2 = _trap_inputs()
    ref = torch.ops.mixtrt.moe(hidden, logits, fc1, fc2, 2)
    out = _run(_session(np.float32, 2, model), hidden, logits, fc1, fc2, np.float32)
    assert _rel(out, ref)[1] > TRAP_MIN


def test_trap_concatenated_gate_up():
    hidden, logits, fc1, fc2 = _trap_inputs()
    ref = torch.ops.mixtrt.moe(hidden, logits, fc1, fc2, 2)
    concat = torch.cat((fc1[:, 0::2], fc1[:, 1::2]), dim=1)  # [gate; up]
    out = _run(_session(np.float32, 2), hidden, logits, concat, fc2, np.float32)
    assert _rel(out, ref)[1] > TRAP_MIN


def test_interleave_gate_up_layout():
    from mixtrt.plugins.moe.torch_op import interleave_gate_up

    w1, w3 = torch.randn(3, I, H), torch.randn(3, I, H)
    fc1 = interleave_gate_up(w1, w3)
    assert torch.equal(fc1[:, 0::2], w1) and torch.equal(fc1[:, 1::2], w3)


# --- graph plumbing ---------------------------------------------------------------------------------------


def test_node_and_function_shape():
    model = _model(np.float32, 2)
    onnx.checker.check_model(model)
    (node,) = model.graph.node
    assert (node.domain, node.op_type) == ("mixtrt", "MoE")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"k": 2, "plugin_version": b"1", "plugin_namespace": b"mixtrt"}
    (f,) = model.functions
    assert (f.domain, f.name) == ("mixtrt", "MoE")
    assert {o.domain for o in f.opset_import} == {"", "com.microsoft"}
    assert {o.domain for o in model.opset_import} >= {"", "mixtrt", "com.microsoft"}
    moe_onnx_op.register_schema()  # idempotent
    assert onnx.defs.has("MoE", "mixtrt")


def test_polygraphy_onnxrt_runner():
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    hidden, logits, fc1, fc2 = _inputs(6, 4, seed=3)
    ref = torch.ops.mixtrt.moe(hidden, logits, fc1, fc2, 2)
    model = _model(np.float32, 2)
    with OnnxrtRunner(SessionFromOnnx(model.SerializeToString(), providers=["cpu"])) as runner:
        out = runner.infer({"hidden": hidden.numpy(), "router_logits": logits.numpy(),
                            "fc1": fc1.numpy(), "fc2": fc2.numpy()})["output"]
    assert _rel(np.asarray(out), ref)[1] <= FP32_RTOL


def test_torch_onnx_export_uses_translation():
    from mixtrt.plugins.onnx_functions import attach_functions, custom_translation_table

    class Block(torch.nn.Module):
        def __init__(self, fc1, fc2):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Parameter(fc1), torch.nn.Parameter(fc2)

        def forward(self, hidden, logits):
            return torch.ops.mixtrt.moe(hidden, logits, self.fc1, self.fc2, 2)

    hidden, logits, fc1, fc2 = _inputs(5, 4, seed=5)
    block = Block(fc1, fc2).eval()
    program = torch.onnx.export(block, (hidden, logits), dynamo=True, optimize=False, verbose=False,
                                custom_translation_table=custom_translation_table())
    model = program.model_proto
    nodes = [n for n in model.graph.node if n.domain == "mixtrt"]
    assert [n.op_type for n in nodes] == ["MoE"]
    attach_functions(model)
    sess = make_session(model)
    (out,) = sess.run(None, {i.name: t.numpy() for i, t in zip(model.graph.input, (hidden, logits), strict=True)})
    assert _rel(out, block(hidden, logits).detach())[1] <= FP32_RTOL
