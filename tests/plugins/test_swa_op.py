"""mixtrt::SlidingWindowAttention alone: the ONNX node + its function body on onnxruntime CPU, run in place
(past and present bound to one buffer with IOBinding), vs torch.ops.mixtrt.sliding_window_attention.

The caches themselves are backend-private (onnxruntime compacts, the reference keeps a ring), so every
step compares the attention output; each side carries its own cache through the whole call sequence.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import mixtrt.plugins.swa.torch_op  # noqa: F401  (registers torch.ops.mixtrt.sliding_window_attention)
from mixtrt.plugins.swa import OP_TYPE
from mixtrt.plugins.swa import onnx_op as swa_onnx_op
from mixtrt.plugins.swa.torch_op import rope_tables
from tests.plugins.harness import InplaceRunner, make_session, single_op_model

N, KV, D = 4, 2, 16
W = 8
P = 96  # rope table rows (> every position used)
FULL_C = 64  # full-causal capacity (>= longest sequence: 20 + 3W + 5 = 49)
FP32_TOL = 1e-4  # max|diff| of the outputs (magnitude ~1: values are softmax-weighted v ~ N(0, 1))
FP16_TOL = 1e-2  # onnxruntime fp16 vs reference fp16 (rotated keys are cached in fp16 on both sides)
TRAP_MIN = 5e-2

_SESSIONS: dict = {}


def _model(dtype, window: int, scale: float = 0.0, head_dim: int = D, path: str | None = None) -> onnx.ModelProto:
    """The single-node model; its body is the one attach_functions picks for `head_dim`, or `path`."""
    qkv = [("q", dtype, ["B", "S", N * head_dim]), ("k", dtype, ["B", "S", KV * head_dim]),
           ("v", dtype, ["B", "S", KV * head_dim])]
    cache = [("past_key", dtype, ["B", KV, "C", head_dim]), ("past_value", dtype, ["B", KV, "C", head_dim])]
    rest = [("total_lengths", np.int32, ["B"]), ("cos_cache", dtype, ["P", head_dim // 2]),
            ("sin_cache", dtype, ["P", head_dim // 2])]
    outs = [("output", dtype, ["B", "S", N * head_dim]), ("present_key", dtype, ["B", KV, "C", head_dim]),
            ("present_value", dtype, ["B", KV, "C", head_dim])]
    attrs = swa_onnx_op.node_attributes(N, KV, window, scale)
    model = single_op_model(OP_TYPE, qkv + cache + rest, outs, attrs)
    if path is not None:
        (f,) = model.functions
        f.CopyFrom(swa_onnx_op.function_proto(opset=model.opset_import[0].version, path=path))
    return model


def _runner(dtype, window: int, scale: float = 0.0, head_dim: int = D, path: str | None = None) -> InplaceRunner:
    key = (np.dtype(dtype).name, window, scale, head_dim, path)
    if key not in _SESSIONS:
        _SESSIONS[key] = make_session(_model(dtype, window, scale, head_dim, path))
    return InplaceRunner(_SESSIONS[key], {"present_key": "past_key", "present_value": "past_value"})


class Pair:
    """onnxruntime (in place, model window ``ort_window``) and the reference (``window``) stepping together.
    ``paths``: the onnxruntime bodies run side by side on the same inputs, each with its own cache (default:
    the one chosen for ``head_dim``); ``kcache``, ``vcache`` and ``runner`` are the first one's."""

    def __init__(self, dtype, B: int, C: int, window: int, ort_window: int | None = None, scale: float = 0.0,
                 head_dim: int = D, path: str | None = None, paths: tuple[str, ...] | None = None):
        self.dtype, self.window, self.scale, self.D = dtype, window, scale, head_dim
        self.tdtype = torch.float16 if dtype == np.float16 else torch.float32
        paths = paths or (path,)
        ort = window if ort_window is None else ort_window
        self.runners = {p: _runner(dtype, ort, scale, head_dim, p) for p in paths}
        # onnxruntime's buffers per body, updated in place
        self.caches = {p: (np.zeros((B, KV, C, head_dim), dtype), np.zeros((B, KV, C, head_dim), dtype))
                       for p in paths}
        self.runner = self.runners[paths[0]]
        self.kcache, self.vcache = self.caches[paths[0]]
        self.ref_k = torch.zeros(B, KV, C, head_dim, dtype=self.tdtype)
        self.ref_v = torch.zeros(B, KV, C, head_dim, dtype=self.tdtype)
        self.lengths = np.zeros(B, np.int32)
        cos, sin = rope_tables(head_dim, 10000.0, P)
        self.cos, self.sin = cos.to(self.tdtype), sin.to(self.tdtype)
        self.gen = torch.Generator().manual_seed(B * 1000 + C)
        self.diffs: dict[str | None, float] = {}

    def step(self, S: int, rows: slice | None = None) -> float:
        """S new tokens for ``rows`` (default all); returns max|ort - ref| of the output over the bodies
        (each body's in ``diffs``)."""
        rows = rows if rows is not None else slice(0, self.kcache.shape[0])
        B = len(range(*rows.indices(self.kcache.shape[0])))
        q, k, v = (torch.randn(B, S, h * self.D, generator=self.gen).to(self.tdtype) for h in (N, KV, KV))
        self.lengths[rows] += S
        total = self.lengths[rows].copy()
        ref, self.ref_k[rows], self.ref_v[rows] = torch.ops.mixtrt.sliding_window_attention(
            q, k, v, self.ref_k[rows], self.ref_v[rows], torch.from_numpy(total), self.cos, self.sin,
            N, KV, self.window, self.scale,
        )
        for path, runner in self.runners.items():
            kbuf, vbuf = self.caches[path][0][rows], self.caches[path][1][rows]  # row slices: views
            assert kbuf.flags.c_contiguous and np.shares_memory(kbuf, self.caches[path][0])
            feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "past_key": kbuf, "past_value": vbuf,
                     "total_lengths": total, "cos_cache": self.cos.numpy(), "sin_cache": self.sin.numpy()}
            res = runner.run(feeds, {"output": ((B, S, N * self.D), self.dtype)})
            assert res["present_key"] is kbuf
            self.diffs[path] = float(np.abs(res["output"].astype(np.float32) - ref.float().numpy()).max())
        return max(self.diffs.values())


def _tol(dtype) -> float:
    return FP32_TOL if dtype == np.float32 else FP16_TOL


MODES = {  # name -> (window, capacity)
    "window_C=W+16": (W, W + 16),
    "window_C=W": (W, W),
    "full_causal": (-1, FULL_C),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", list(MODES))
def test_prefill_decode_multitoken(mode, dtype):
    """B=1: a 20-token prompt (> W), 3W single-token steps, then a 5-token step, output by output; every
    onnxruntime body (D=16 is served by all three) on the same inputs."""
    window, C = MODES[mode]
    pair = Pair(dtype, 1, C, window, paths=tuple(swa_onnx_op.PATHS))
    for S in [20] + [1] * (3 * W) + [5]:
        diff = pair.step(S)
        assert diff <= _tol(dtype), (pair.lengths, pair.diffs)
    assert pair.lengths[0] == 20 + 3 * W + 5


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", list(MODES))
def test_ragged_batch_decode(mode, dtype):
    """Rows prefilled one by one into their row of the buffer (B=1 runs on row views), then batched S=1 decode
    with different per-row lengths (some rows short of the window, some past the capacity); every body."""
    window, C = MODES[mode]
    prompts = [3, 11, 20]
    pair = Pair(dtype, len(prompts), C, window, paths=tuple(swa_onnx_op.PATHS))
    for b, S in enumerate(prompts):
        assert pair.step(S, rows=slice(b, b + 1)) <= _tol(dtype), pair.diffs
    for _ in range(2 * W):
        assert pair.step(1) <= _tol(dtype), (pair.lengths, pair.diffs)
    for B in (1, 2):  # a batch of the first rows only is a view too
        assert pair.step(1, rows=slice(0, B)) <= _tol(dtype), pair.diffs


def test_custom_scale():
    pair = Pair(np.float32, 1, W + 16, W, scale=0.37, paths=tuple(swa_onnx_op.PATHS))
    for S in [12, 1, 1, 3]:
        assert pair.step(S) <= FP32_TOL, pair.diffs


@pytest.mark.parametrize("mode", ["window_C=W+16", "window_C=W"])
def test_chunk_overwriting_keys_its_first_queries_still_need(mode):
    """After the cache wrapped, a chunk of C+3 tokens: its last tokens take the slots of keys its first
    queries still see (the standard body must read them before it writes); every body."""
    window, C = MODES[mode]
    pair = Pair(np.float32, 1, C, window, paths=tuple(swa_onnx_op.PATHS))
    for S in [C + 2, 1, C + 3, 1]:
        assert pair.step(S) <= FP32_TOL, (S, pair.lengths, pair.diffs)


@pytest.mark.parametrize("head_dim", [6, 8, 12, 24])
def test_head_dims_groupqueryattention_refuses_run_on_their_body(head_dim):
    """The body attach_functions picks for D serves it: prefill past the window, decode, a chunk, ragged rows;
    windowed and full causal."""
    assert swa_onnx_op.path_for(head_dim) != "gqa"
    for window, C in (MODES["window_C=W+16"], MODES["full_causal"]):
        pair = Pair(np.float32, 2, C, window, head_dim=head_dim)
        for b, S in enumerate((20, 5)):
            assert pair.step(S, rows=slice(b, b + 1)) <= FP32_TOL
        for S in [1] * (2 * W):
            assert pair.step(S) <= FP32_TOL
        assert pair.step(7, rows=slice(0, 1)) <= FP32_TOL
    pair = Pair(np.float16, 1, W + 16, W, head_dim=head_dim)
    assert max(pair.step(S) for S in [20, 1, 1, 5]) <= FP16_TOL


@pytest.mark.parametrize(("head_dim", "path", "message"), [
    (24, "gqa", "head_size shall be a multiple of 16"),
    (12, "gqa_rope", "head_size must be a multiple of 8"),
])
def test_groupqueryattention_refuses_what_path_for_routes_elsewhere(head_dim, path, message):
    """The limits SPEC.md names (onnxruntime 1.32.0): if a newer onnxruntime lifts them, this test says so."""
    assert swa_onnx_op.path_for(head_dim) != path
    pair = Pair(np.float32, 1, W + 16, W, head_dim=head_dim, path=path)
    with pytest.raises(Exception, match=message):
        pair.step(3)


def test_standard_body_keeps_a_ring():
    """The standard body's cache is the reference's ring, slot = position mod C (W=8, C=24, 25 tokens:
    slot 0 holds position 24, slots 1..23 positions 1..23)."""
    pair = Pair(np.float32, 1, W + 16, W, path="standard")
    for S in (20, 1, 1, 1, 1, 1):
        pair.step(S)
    np.testing.assert_allclose(pair.kcache, pair.ref_k.numpy(), atol=1e-5)
    np.testing.assert_allclose(pair.vcache, pair.ref_v.numpy(), atol=0)


def test_cache_is_updated_in_place_with_rotated_keys():
    """After a prompt shorter than C, rows [0, T) of onnxruntime's buffer hold the post-RoPE keys of positions
    0..T-1 in order, exactly where the reference ring put them (no wrap yet); every body."""
    pair = Pair(np.float32, 1, W + 16, W, paths=tuple(swa_onnx_op.PATHS))
    pair.step(13)
    for kcache, vcache in pair.caches.values():
        np.testing.assert_allclose(kcache[:, :, :13], pair.ref_k[:, :, :13].numpy(), atol=1e-5)
        np.testing.assert_allclose(vcache[:, :, :13], pair.ref_v[:, :, :13].numpy(), atol=0)


def test_windowed_layout_compacts_as_documented():
    """W=8, C=24 (G=17): after 25 tokens L = 25 - 17 = 8, rows 0..7 = positions 17..24 (SPEC.md example)."""
    pair = Pair(np.float32, 1, W + 16, W)
    for S in (20, 1, 1, 1, 1, 1):
        pair.step(S)
    slots = torch.arange(17, 25) % (W + 16)  # where the reference ring keeps positions 17..24
    np.testing.assert_allclose(pair.kcache[:, :, :8], pair.ref_k[:, :, slots].numpy(), atol=1e-5)
    np.testing.assert_allclose(pair.vcache[:, :, :8], pair.ref_v[:, :, slots].numpy(), atol=0)


@pytest.mark.parametrize("ort_window", [W - 1, W + 1, -1])
def test_trap_window_off_by_one(ort_window):
    """A graph exported with the window off by one (or without it) must visibly disagree once T > W; every body."""
    pair = Pair(np.float32, 1, W + 16 if ort_window > 0 else FULL_C, W, ort_window=ort_window,
                paths=tuple(swa_onnx_op.PATHS))
    worst = dict.fromkeys(swa_onnx_op.PATHS, 0.0)
    for S in [20] + [1] * W:
        pair.step(S)
        worst = {path: max(worst[path], pair.diffs[path]) for path in worst}
    assert min(worst.values()) > TRAP_MIN, worst


def test_windowed_capacity_below_window_is_rejected():
    pair = Pair(np.float32, 1, W - 1, W)
    with pytest.raises(Exception, match="at least local_window_size"):
        pair.step(3)


def test_linear_cache_overflow_is_rejected():
    """windowed_cache=0 (full causal): row j = position j, so C must cover the total length; onnxruntime then
    computes a present of length total > C, which cannot be bound onto the C-row buffer."""
    pair = Pair(np.float32, 1, 8, -1)
    pair.step(8)
    with pytest.raises(Exception, match="present_key"):
        pair.runner.run(
            {"q": np.zeros((1, 1, N * D), np.float32), "k": np.zeros((1, 1, KV * D), np.float32),
             "v": np.zeros((1, 1, KV * D), np.float32), "past_key": pair.kcache, "past_value": pair.vcache,
             "total_lengths": np.array([9], np.int32), "cos_cache": pair.cos.numpy(), "sin_cache": pair.sin.numpy()},
            {"output": ((1, 1, N * D), np.float32)},
        )


def test_node_attributes_and_function():
    assert swa_onnx_op.node_attributes(4, 2, 0, 0.0)["window"] == -1
    assert swa_onnx_op.node_attributes(4, 2, -5, 0.0)["windowed_cache"] == 0
    assert swa_onnx_op.node_attributes(4, 2, 7, 0.5) == {
        "num_heads": 4, "kv_heads": 2, "window": 7, "windowed_cache": 1, "scale": 0.5}
    model = _model(np.float32, W)
    onnx.checker.check_model(model)
    (node,) = model.graph.node
    assert (node.domain, node.op_type) == ("mixtrt", "SlidingWindowAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"mixtrt"
    (f,) = model.functions
    gqa = f.node[-1]
    assert (gqa.domain, gqa.op_type) == ("com.microsoft", "GroupQueryAttention")
    refs = {a.name: a.ref_attr_name for a in gqa.attribute if a.ref_attr_name}
    assert refs == {"num_heads": "num_heads", "kv_num_heads": "kv_heads", "local_window_size": "window",
                    "sliding_window_cache": "windowed_cache", "scale": "scale"}
    swa_onnx_op.register_schema()  # idempotent
    assert onnx.defs.has("SlidingWindowAttention", "mixtrt")


def test_torch_onnx_export_uses_translation():
    from mixtrt.plugins.onnx_common import attach_functions, custom_translation_table

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, pk, pv, total, cos, sin):
            return torch.ops.mixtrt.sliding_window_attention(q, k, v, pk, pv, total, cos, sin, N, KV, W, 0.0)

    cos, sin = rope_tables(D, 10000.0, P)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 5, N * D, generator=g), torch.randn(1, 5, KV * D, generator=g),
            torch.randn(1, 5, KV * D, generator=g), torch.zeros(1, KV, W + 16, D), torch.zeros(1, KV, W + 16, D),
            torch.tensor([5], dtype=torch.int32), cos, sin)
    program = torch.onnx.export(Attn().eval(), args, dynamo=True, optimize=False, verbose=False,
                                custom_translation_table=custom_translation_table())
    model = program.model_proto
    (node,) = [n for n in model.graph.node if n.domain == "mixtrt"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"num_heads": N, "kv_heads": KV, "window": W, "windowed_cache": 1, "scale": 0.0,
                     "plugin_version": b"1", "plugin_namespace": b"mixtrt"}
    attach_functions(model)
    outs = make_session(model).run(None, {i.name: a.numpy() for i, a in zip(model.graph.input, args, strict=True)})
    ref = Attn()(*args)
    assert np.abs(outs[0] - ref[0].numpy()).max() <= FP32_TOL


def test_reference_rejects_overflow():
    """The reference refuses what no backend can do: a linear cache past its capacity, a ring too small."""
    cos, sin = rope_tables(D, 10000.0, P)
    q, k, v = torch.zeros(1, 1, N * D), torch.zeros(1, 1, KV * D), torch.zeros(1, 1, KV * D)
    cache = torch.zeros(1, KV, 8, D)
    op = torch.ops.mixtrt.sliding_window_attention
    op(q, k, v, cache, cache, torch.tensor([8], dtype=torch.int32), cos, sin, N, KV, -1, 0.0)  # fits
    with pytest.raises(ValueError, match="do not fit"):
        op(q, k, v, cache, cache, torch.tensor([9], dtype=torch.int32), cos, sin, N, KV, -1, 0.0)
    op(q, k, v, cache, cache, torch.tensor([30], dtype=torch.int32), cos, sin, N, KV, 9, 0.0)  # C = W - 1: ok
    with pytest.raises(ValueError, match="lost keys"):
        op(q, k, v, cache, cache, torch.tensor([30], dtype=torch.int32), cos, sin, N, KV, 10, 0.0)
