"""mixtrt::MoE alone: the ONNX node + its function body on onnxruntime CPU vs the reference (plugins/moe/torch_op.py:
the contract's stacked form, and torch.ops.mixtrt.moe, the per-expert form the exporter traces)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import mixtrt.plugins.moe.torch_op  # noqa: F401  (registers torch.ops.mixtrt.moe)
from mixtrt.plugins.moe import OP_TYPE, VERSION
from mixtrt.plugins.moe import onnx_op as moe_onnx_op
from mixtrt.plugins.moe.torch_op import reference
from tests.plugins.harness import make_session, single_op_model

H, I = 32, 48
FP32_RTOL = 1e-4  # max|diff| <= FP32_RTOL * max(1, max|ref|)
FP16_RTOL = 5e-3  # onnxruntime fp16 vs the fp32 reference on the same fp16 inputs (measured <= ~1e-3)
TRAP_MIN = 5e-2  # each trap must move the output by more than this (relative), far above any tolerance


def _model(dtype, k: int, E: int) -> onnx.ModelProto:
    io = [("hidden", dtype, ["T", H]), ("router_logits", dtype, ["T", E])]
    io += [(f"fc1_{e}", dtype, [2 * I, H]) for e in range(E)] + [(f"fc2_{e}", dtype, [H, I]) for e in range(E)]
    return single_op_model(OP_TYPE, io, [("output", dtype, ["T", H])], {"k": k})


_SESSIONS: dict = {}


def _session(dtype, k: int, E: int, model: onnx.ModelProto | None = None):
    if model is not None:
        return make_session(model)
    key = (np.dtype(dtype).name, k, E)
    if key not in _SESSIONS:
        _SESSIONS[key] = make_session(_model(dtype, k, E))
    return _SESSIONS[key]


def _inputs(T: int, E: int, seed: int):
    """Routing with clear margins (no near-ties at the top-k boundary, also after fp16 rounding)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    spaced = torch.linspace(-2.0, 2.0, E)
    logits = torch.stack([spaced[torch.randperm(E, generator=g)] for _ in range(T)])
    logits = logits + 0.05 * torch.randn(T, E, generator=g)
    fc1 = [0.3 * torch.randn(2 * I, H, generator=g) for _ in range(E)]  # [gate; up]
    fc2 = [0.3 * torch.randn(H, I, generator=g) for _ in range(E)]
    return hidden, logits, fc1, fc2


def _feeds(hidden, logits, fc1, fc2) -> dict[str, torch.Tensor]:
    return {"hidden": hidden, "router_logits": logits, **{f"fc1_{e}": w for e, w in enumerate(fc1)},
            **{f"fc2_{e}": w for e, w in enumerate(fc2)}}


def _run(sess, hidden, logits, fc1, fc2, dtype):
    return sess.run(None, {n: t.numpy().astype(dtype) for n, t in _feeds(hidden, logits, fc1, fc2).items()})[0]


def _half(ts):
    return [t.half().float() for t in ts]


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
        hidden, logits, fc1, fc2 = hidden.half().float(), logits.half().float(), _half(fc1), _half(fc2)
    ref = reference(hidden, logits, torch.stack(fc1), torch.stack(fc2), k)  # the contract: [E, 2I, H], [E, H, I]
    out = _run(_session(dtype, k, E), hidden, logits, fc1, fc2, dtype)  # the graph: one input per expert matrix
    assert out.shape == (T, H) and out.dtype == dtype
    _, rel = _rel(out, ref)
    assert rel <= (FP32_RTOL if dtype == np.float32 else FP16_RTOL), rel


def test_reference_forms_agree():
    """The contract's stacked form and the exporter's per-expert op are one computation (bit-equal)."""
    hidden, logits, fc1, fc2 = _inputs(11, 4, seed=3)
    stacked = reference(hidden, logits, torch.stack(fc1), torch.stack(fc2), 2)
    assert torch.equal(stacked, torch.ops.mixtrt.moe(hidden, logits, fc1, fc2, 2))


@pytest.mark.parametrize("case", ["fc1 not stacked", "fc2 transposed", "3 experts for 4 logits"])
def test_reference_refuses_misfit_weights(case):
    hidden, logits, fc1, fc2 = _inputs(5, 4, seed=4)
    w1, w2 = torch.stack(fc1), torch.stack(fc2)
    w1, w2, msg = {"fc1 not stacked": (fc1[0], w2, "fc1 must be"),
                   "fc2 transposed": (w1, w2.transpose(1, 2), "does not fit fc1"),
                   "3 experts for 4 logits": (w1[:3], w2[:3], "3 fc1 and 3 fc2 experts for 4 router logits")}[case]
    with pytest.raises(ValueError, match=msg):
        reference(hidden, logits, w1, w2, 2)


def test_reference_fp16_matches_fp32():
    hidden, logits, fc1, fc2 = _inputs(9, 4, seed=1)
    hidden, logits, fc1, fc2 = hidden.half(), logits.half(), [w.half() for w in fc1], [w.half() for w in fc2]
    ref16 = torch.ops.mixtrt.moe(hidden, logits, fc1, fc2, 2)
    ref32 = torch.ops.mixtrt.moe(hidden.float(), logits.float(), [w.float() for w in fc1], [w.float() for w in fc2], 2)
    assert ref16.dtype == torch.float16
    assert _rel(ref16.float().numpy(), ref32)[1] <= FP16_RTOL


# --- traps: each known mistake runs fine and must give a large difference --------------------------------


def _trap_inputs():
    return _inputs(24, 8, seed=7)


def test_trap_probabilities_instead_of_logits():
    hidden, logits, fc1, fc2 = _trap_inputs()
    ref = torch.ops.mixtrt.moe(hidden, logits, fc1, fc2, 2)
    out = _run(_session(np.float32, 2, 8), hidden, logits.softmax(-1), fc1, fc2, np.float32)
    assert _rel(out, ref)[1] > TRAP_MIN


def test_trap_no_renormalisation():
    """The body without its Div (top-k probabilities used as they are) must be caught."""
    model = _model(np.float32, 2, 8)
    (f,) = model.functions
    (div,) = [n for n in f.node if n.op_type == "Div" and list(n.output) == ["top_w"]]  # the renormalisation
    div.op_type = "Identity"
    del div.input[1:]
    hidden, logits, fc1, fc2 = _trap_inputs()
    ref = torch.ops.mixtrt.moe(hidden, logits, fc1, fc2, 2)
    out = _run(_session(np.float32, 2, 8, model), hidden, logits, fc1, fc2, np.float32)
    assert _rel(out, ref)[1] > TRAP_MIN


def test_trap_interleaved_gate_up():
    """Rows g0, u0, g1, u1, ... (onnxruntime's com.microsoft.MoE layout) instead of [gate; up]."""
    hidden, logits, fc1, fc2 = _trap_inputs()
    ref = torch.ops.mixtrt.moe(hidden, logits, fc1, fc2, 2)
    interleaved = [torch.stack(w.chunk(2, dim=0), dim=1).reshape(2 * I, H) for w in fc1]
    assert torch.equal(interleaved[0][0::2], fc1[0][:I]) and torch.equal(interleaved[0][1::2], fc1[0][I:])
    out = _run(_session(np.float32, 2, 8), hidden, logits, interleaved, fc2, np.float32)
    assert _rel(out, ref)[1] > TRAP_MIN


def test_trap_experts_out_of_order():
    """The fc1/fc2 inputs must follow the router's expert order."""
    hidden, logits, fc1, fc2 = _trap_inputs()
    ref = torch.ops.mixtrt.moe(hidden, logits, fc1, fc2, 2)
    out = _run(_session(np.float32, 2, 8), hidden, logits, fc1[::-1], fc2[::-1], np.float32)
    assert _rel(out, ref)[1] > TRAP_MIN


# --- graph plumbing ---------------------------------------------------------------------------------------


def test_node_and_function_shape():
    model = _model(np.float32, 2, 3)
    onnx.checker.check_model(model)
    (node,) = model.graph.node
    assert (node.domain, node.op_type) == ("mixtrt", "MoE") and len(node.input) == 2 + 2 * 3
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"k": 2, "plugin_version": str(VERSION).encode(), "plugin_namespace": b"mixtrt"}
    (f,) = model.functions
    assert (f.domain, f.name) == ("mixtrt", "MoE")
    assert list(f.input) == moe_onnx_op.input_names(3)
    gemms = [n.input[1] for n in f.node if n.op_type == "Gemm"]  # one Gemm pair per expert, on the inputs
    assert gemms == ["fc1_0", "fc1_1", "fc1_2", "fc2_0", "fc2_1", "fc2_2"]
    # SwiGLU once over all pairs, not per expert
    assert [n.op_type for n in f.node].count("Sigmoid") == 1
    assert ("mixtrt", VERSION) in {(o.domain, o.version) for o in model.opset_import}
    moe_onnx_op.register_schema()  # idempotent
    assert onnx.defs.has("MoE", "mixtrt")


def test_function_needs_one_expert_count():
    model = _model(np.float32, 2, 3)
    extra = onnx.helper.make_node("MoE", ["hidden", "router_logits", "fc1_0", "fc1_1", "fc2_0", "fc2_1"], ["out2"],
                                  domain="mixtrt", k=1)
    with pytest.raises(ValueError, match=r"different expert counts \[2, 3\]"):
        moe_onnx_op.function_for([model.graph.node[0], extra], opset=20)
    odd = onnx.helper.make_node("MoE", ["hidden", "router_logits", "fc1_0"], ["out3"], domain="mixtrt", k=1)
    with pytest.raises(ValueError, match="has 3 inputs"):
        moe_onnx_op.num_experts(odd)


def test_empty_batch_and_unrouted_experts():
    """T = 0, and experts no token is routed to (E=8, k=1, one token), run and equal the reference."""
    sess = _session(np.float32, 1, 8)
    hidden, logits, fc1, fc2 = _inputs(1, 8, seed=11)
    out = _run(sess, hidden, logits, fc1, fc2, np.float32)
    assert _rel(out, torch.ops.mixtrt.moe(hidden, logits, fc1, fc2, 1))[1] <= FP32_RTOL
    out = _run(sess, hidden[:0], logits[:0], fc1, fc2, np.float32)
    assert out.shape == (0, H)


def test_polygraphy_onnxrt_runner():
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    hidden, logits, fc1, fc2 = _inputs(6, 4, seed=3)
    ref = torch.ops.mixtrt.moe(hidden, logits, fc1, fc2, 2)
    model = _model(np.float32, 2, 4)
    with OnnxrtRunner(SessionFromOnnx(model.SerializeToString(), providers=["cpu"])) as runner:
        out = runner.infer({n: t.numpy() for n, t in _feeds(hidden, logits, fc1, fc2).items()})["output"]
    assert _rel(np.asarray(out), ref)[1] <= FP32_RTOL


def test_torch_onnx_export_uses_translation():
    from mixtrt.plugins.onnx_common import attach_functions, custom_translation_table

    class Block(torch.nn.Module):
        def __init__(self, fc1, fc2):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.ParameterList(fc1), torch.nn.ParameterList(fc2)

        def forward(self, hidden, logits):
            return torch.ops.mixtrt.moe(hidden, logits, list(self.fc1), list(self.fc2), 2)

    hidden, logits, fc1, fc2 = _inputs(5, 4, seed=5)
    block = Block(fc1, fc2).eval()
    program = torch.onnx.export(block, (hidden, logits), dynamo=True, optimize=False, verbose=False,
                                custom_translation_table=custom_translation_table())
    model = program.model_proto
    nodes = [n for n in model.graph.node if n.domain == "mixtrt"]
    assert [n.op_type for n in nodes] == ["MoE"]
    initializers = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert [initializers[name] for name in nodes[0].input[2:]] == [(2 * I, H)] * 4 + [(H, I)] * 4
    attach_functions(model)
    sess = make_session(model)
    (out,) = sess.run(None, {i.name: t.numpy() for i, t in zip(model.graph.input, (hidden, logits), strict=True)})
    assert _rel(out, block(hidden, logits).detach())[1] <= FP32_RTOL
