"""plugins/int4.py: the INT4 packing (numpy only; the kernels' use of it is in test_moe_triton.py)."""

from __future__ import annotations

import numpy as np
import pytest

from mixtrt.plugins.int4 import dequantize_linear_layout, int4_values, pack_int4, unpack_int4


def test_worked_example():
    """The docstring's example, byte for byte."""
    q, s = pack_int4(np.array([[1.75, -0.875, 0.25, 0.0]], np.float32), 4)
    assert q.dtype == np.uint8 and q.tolist() == [[0xC7, 0x01]]
    assert s.dtype == np.float32 and s.tolist() == [[0.25]]
    assert unpack_int4(q, s).tolist() == [[1.75, -1.0, 0.25, 0.0]]


def test_nibble_order_and_sign():
    """Element 2j is the low nibble, 2j+1 the high one, both two's complement."""
    w = np.array([[-8, 7, 1, -1]], np.float32)  # block 4: scale 8/7, q = [-7, 6, 1, -1] after rounding
    q, s = pack_int4(w, 4)
    vals = int4_values(q)
    assert vals.tolist() == [[-7, 6, 1, -1]]
    assert q[0, 0] == ((-7) & 0xF) | ((6 & 0xF) << 4) and q[0, 1] == 0x01 | (0xF << 4)
    q, _ = pack_int4(np.array([[-4.0, 4.0, 3.5, -3.5]], np.float32), 4)
    assert int4_values(q).tolist() == [[-7, 7, 6, -6]]  # the block's max maps to +-7: pack_int4 never emits -8


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("block", [2, 6, 32])
def test_round_trip_and_block_axis(dtype, block):
    """|W - unpack(pack(W))| <= scale/2 per element; scales are per row and per block of K (an outlier moves
    only its own block's scale); stacked leading dims are kept."""
    rng = np.random.default_rng(block)
    w = rng.standard_normal((3, 5, 96)).astype(dtype)
    q, s = pack_int4(w, block)
    assert q.shape == (3, 5, 48) and s.shape == (3, 5, 96 // block) and s.dtype == dtype
    err = np.abs(unpack_int4(q, s).astype(np.float32) - w.astype(np.float32))
    bound = np.repeat(s.astype(np.float32), block, axis=-1) / 2
    assert (err <= bound * 1.01 + 1e-3 * (dtype == np.float16)).all()
    w2 = w.copy()
    w2[1, 2, block] = 100.0  # first element of row (1, 2)'s second block
    _, s2 = pack_int4(w2, block)
    changed = np.argwhere(s2 != s)
    assert changed.tolist() == [[1, 2, 1]]


def test_zero_block_and_rejections():
    q, s = pack_int4(np.zeros((2, 8), np.float32), 4)
    assert not q.any() and not s.any() and not unpack_int4(q, s).any()
    with pytest.raises(ValueError, match="even and divide"):
        pack_int4(np.zeros((2, 12), np.float32), 8)
    with pytest.raises(ValueError, match="even and divide"):
        pack_int4(np.zeros((2, 9), np.float32), 3)
    with pytest.raises(ValueError, match="float"):
        pack_int4(np.zeros((2, 8), np.int32), 4)
    with pytest.raises(ValueError, match="scales"):
        unpack_int4(np.zeros((2, 4), np.uint8), np.zeros((3, 2), np.float32))


# ---- the onnxruntime layouts of the same bytes, each run by onnxruntime vs numpy on the dequantized weights ----

def _ort(nodes, inits, k: int, n: int, accuracy_level: int = 0) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _linear_case(block: int):
    rng = np.random.default_rng(block)
    w = rng.standard_normal((48, 128)).astype(np.float32)  # [N, K]
    x = rng.standard_normal((5, 128)).astype(np.float32)
    q, s = pack_int4(w, block)
    return x, q, s, x @ unpack_int4(q, s).T


@pytest.mark.parametrize("block", [16, 32, 64])
def test_dequantize_linear_layout_on_onnxruntime(block):
    """DequantizeLinear(INT4 [K, N], axis 0, block) -> MatMul, as the exporter writes dense layers: onnxruntime
    (which fuses it into MatMulNBits) equals x @ unpack_int4(q, s)^T; the scales' transpose is the block axis."""
    from onnx import TensorProto, helper, numpy_helper

    from mixtrt.plugins.int4 import dequantize_linear_layout

    x, q, s, ref = _linear_case(block)
    raw, dims, st = dequantize_linear_layout(q, s)
    assert dims == (128, 48) and st.shape == (128 // block, 48)
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    inits = [helper.make_tensor("w", TensorProto.INT4, list(dims), raw, raw=True), numpy_helper.from_array(st, "s")]
    y = _ort(nodes, inits, 128, 48).run(None, {"x": x})[0]
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    y4 = _ort(nodes, inits, 128, 48, accuracy_level=4).run(None, {"x": x})[0]  # int8 activations
    assert np.abs(y4 - ref).max() <= 2e-2 * np.abs(ref).max()


@pytest.mark.parametrize("block", [16, 32])
def test_matmulnbits_layout_and_traps(block):
    """MatMulNBits on matmulnbits_layout equals the numpy reference; swapped nibbles or scales of the wrong
    block axis are caught (errors far above the tolerance)."""
    from onnx import helper, numpy_helper

    from mixtrt.plugins.int4 import matmulnbits_layout

    x, q, s, ref = _linear_case(block)

    def run(packed, scales):
        node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=128, N=48, bits=4,
                                block_size=block, accuracy_level=0)
        inits = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s")]
        y = _ort([node], inits, 128, 48).run(None, {"x": x})[0]
        return np.abs(y - ref).max() / np.abs(ref).max()

    packed = matmulnbits_layout(q, block)
    assert packed.shape == (48, 128 // block, block // 2)
    assert run(packed, s) <= 1e-5
    swapped = ((packed & 0x0F) << 4) | (packed >> 4)
    assert run(swapped, s) > 0.1  # nibble order
    assert run(packed, np.ascontiguousarray(s[::-1])) > 0.1  # scales of another row / block


def test_signed_scales_use_all_sixteen_levels():
    """signed_scales: the block's largest-magnitude weight maps to -8 exactly (either sign), every weight rounds
    within |scale| / 2 (within |scale| where it clips to 7), and pack_int4 with them round-trips W = q * scale."""
    from mixtrt.plugins.int4 import signed_scales

    w = np.array([[2.0, -1.0, 0.5, 0.25, -4.0, 1.0, 3.0, 0.0]], np.float32)  # blocks of 4: extremes +2, -4
    s = signed_scales(w, 4)
    assert s.tolist() == [[-0.25, 0.5]]
    q, s2 = pack_int4(w, 4, s)
    assert int4_values(q).tolist() == [[-8, 4, -2, -1, -8, 2, 6, 0]]
    assert np.array_equal(unpack_int4(q, s2), w)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    s = signed_scales(w, 32)
    q, _ = pack_int4(w, 32, s)
    err, step = np.abs(unpack_int4(q, s) - w), np.repeat(np.abs(s), 32, axis=-1)
    clipped = int4_values(q) == 7  # an opposite-sign weight near the extreme lands on 7 (+8 does not exist)
    assert (err[~clipped] <= step[~clipped] / 2 + 1e-6).all() and (err <= step + 1e-6).all()
    assert (int4_values(q) == -8).sum() >= 12  # every block's extreme
    with pytest.raises(ValueError, match="scales"):
        pack_int4(w, 32, s[:, :1])
    # a block whose extremes have the same magnitude (+a and -a): the one first in the block sets the scale, as
    # llama.cpp's q4_0 picks it (its loop keeps the first largest |w|); a reference by argmax over |w|
    w = rng.integers(-3, 4, (40, 96)).astype(np.float32)
    w[0, :32], w[1, 32:64] = 0, np.tile([3.0, -3.0], 16)
    w[2, 64:96] = np.tile([-3.0, 3.0], 16)
    blocks = w.reshape(40, 3, 32)
    first = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    assert np.array_equal(signed_scales(w, 32), first / -8)
    s = signed_scales(w, 32)
    assert s[1, 1] == -0.375 and s[2, 2] == 0.375 and s[0, 0] == 0
    # a zero block's scale keeps its first element's sign (-0.0 / -8 = +0.0), as the argmax rule gave it: the artifact's
    # bytes, not only its numbers, do not depend on which zero numpy's max returns; tiny fp16-rounded weights make them
    for z in (np.array([[0.0, -0.0] * 16, [-0.0, 0.0] * 16], np.float32),
              (rng.standard_normal((8, 64)) * 1e-9).astype(np.float16).astype(np.float32)):
        zb = z.reshape(z.shape[0], -1, 32)
        first = np.take_along_axis(zb, np.abs(zb).argmax(-1)[..., None], -1)[..., 0]
        assert np.array_equal(signed_scales(z, 32).view(np.uint32), (first / -8).astype(np.float32).view(np.uint32))
    q, _ = pack_int4(w, 32, s)
    assert (int4_values(q)[0, :32] == 0).all()  # the zero block: q 0 (its scale 0)


def test_int8_layouts_on_onnxruntime():
    """The 8-bit vocabulary tables: DequantizeLinear(INT8 [K, N], axis 0, block) -> MatMul (fused by onnxruntime
    into an 8-bit MatMulNBits) and GatherBlockQuantized(bits=8) on q + 128 equal numpy on the dequantized weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mixtrt.plugins.int4 import pack_int8

    x, _, _, _ = _linear_case(32)
    w = np.random.default_rng(7).standard_normal((48, 128)).astype(np.float32)
    q, s = pack_int8(w, 32)
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and s.shape == (48, 4)
    deq = (q.reshape(48, 4, 32) * s[..., None]).reshape(48, 128)
    assert np.abs(deq - w).max() <= np.repeat(s, 32, axis=-1).max() / 2 + 1e-6
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=0, block_size=32),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    inits = [numpy_helper.from_array(np.ascontiguousarray(q.T), "w"),
             numpy_helper.from_array(np.ascontiguousarray(s.T), "s")]
    y = _ort(nodes, inits, 128, 48).run(None, {"x": x})[0]
    ref = x @ deq.T
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    g = helper.make_graph([helper.make_node("GatherBlockQuantized", ["t", "ids", "s"], ["y"], domain="com.microsoft",
                                            gather_axis=0, quantize_axis=1, block_size=32, bits=8)], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 128])],
                          [numpy_helper.from_array(q.view(np.uint8) ^ 0x80, "t"), numpy_helper.from_array(s, "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([3, 0, 47])
    assert np.array_equal(sess.run(None, {"ids": ids})[0], deq[ids])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rtn_straight_to_the_dequantize_linear_layout_is_the_same_bytes(dtype):
    """rtn_dequantize_linear (what `--method rtn` writes for a dense linear, from MatMul's B [K, N] with no
    transpose) equals signed_scales + pack_int4 on W = B^T and then dequantize_linear_layout: ties between +a and -a,
    zero blocks, odd N, every block size."""
    from mixtrt.plugins.int4 import rtn_dequantize_linear, signed_scales

    rng = np.random.default_rng(7)
    for K, N, block in ((64, 7, 32), (128, 33, 16), (96, 1, 32), (256, 40, 128), (64, 5, 2)):
        for B in (rng.standard_normal((K, N)), rng.integers(-3, 4, (K, N)).astype(float)):
            B = B.astype(dtype)
            B[:block, 0] = 0
            w = np.ascontiguousarray(B.T).astype(np.float32)
            want = dequantize_linear_layout(*pack_int4(w, block, signed_scales(w, block)))
            raw, dims, scales = rtn_dequantize_linear(B, block)
            assert raw == want[0] and dims == tuple(want[1]) and np.array_equal(scales, want[2])
            assert scales.dtype == np.float32 and scales.shape == (K // block, N)
    with pytest.raises(ValueError, match="divide K=64"):
        rtn_dequantize_linear(np.zeros((64, 3), np.float32), 48)
