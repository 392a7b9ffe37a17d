"""plugins/int4.py: the INT4 packing (numpy only; the kernels' use of it is in test_moe_triton.py)."""

from __future__ import annotations

import numpy as np
import pytest

from mixtrt.plugins.int4 import int4_values, pack_int4, unpack_int4


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
