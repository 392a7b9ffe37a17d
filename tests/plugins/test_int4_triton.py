"""The dense INT4 Triton linear (plugins/int4_triton.py) under the Triton interpreter against numpy on the
dequantized weights (plugins/int4.py `unpack_int4`): both forms (GEMV, tl.dot tiles), widths that are no multiple
of the tiles (N odd, K not a multiple of BLOCK_K, M between tiles), blocks 16 / 32 with RTN's signed scales, fp16;
the traps (nibbles swapped, scales read along the wrong axis) give other numbers, so the tests would catch them."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'mixtrt[gpu]'; the test extra lists it)")

from mixtrt.export.quantize import rtn  # noqa: E402
from mixtrt.plugins.int4 import unpack_int4  # noqa: E402
from mixtrt.plugins.int4_triton import int4_linear  # noqa: E402


def _case(M: int, N: int, K: int, block: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * rng.uniform(0.1, 3.0, (N, K // block)).repeat(block, 1)).astype(np.float32)
    q, s = rtn("w", w, block)  # signed scales: negative where a block's largest-magnitude weight is positive
    x = rng.standard_normal((M, K)).astype(np.float32)
    return x, q, s


@pytest.mark.parametrize("M,N,K,block,path", [(1, 33, 96, 32, "gemv"), (3, 7, 48, 16, "gemv"),
                                              (5, 70, 96, 32, "dot"), (19, 9, 32, 16, "dot")])
def test_int4_linear_matches_numpy(M, N, K, block, path):
    x, q, s = _case(M, N, K, block)
    assert (s < 0).any() and (s > 0).any()
    want = x @ unpack_int4(q, s).T
    got = int4_linear(torch.from_numpy(x), torch.from_numpy(q), torch.from_numpy(s), path=path).numpy()
    assert got.shape == (M, N)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    swapped = ((q & 0x0F) << 4) | (q >> 4)  # element 2j in the high nibble: the nibble-order trap
    assert np.abs(x @ unpack_int4(swapped, s).T - want).max() > 1e-2 * np.abs(want).max()
    if N > 1:  # the block-axis trap: each row read with another row's scales
        wrong = np.roll(s, 1, axis=0)
        assert np.abs(x @ unpack_int4(q, wrong).T - want).max() > 1e-2 * np.abs(want).max()


def test_int4_linear_fp16_batched_rows_and_refusals():
    x, q, s = _case(6, 20, 64, 32, seed=1)
    x3 = torch.from_numpy(x).reshape(2, 3, 64).half()
    got = int4_linear(x3, torch.from_numpy(q), torch.from_numpy(s).half())
    assert got.shape == (2, 3, 20) and got.dtype == torch.float16
    w16 = torch.from_numpy(unpack_int4(q, s)).half().float()  # dequantized, rounded to fp16 as at load
    want = (x3.float() @ w16.T).numpy()
    assert np.abs(got.float().numpy() - want).max() <= 5e-3 * np.abs(want).max()
    with pytest.raises(ValueError, match="activation dtype"):
        int4_linear(x3, torch.from_numpy(q), torch.from_numpy(s))
    with pytest.raises(ValueError, match=r"uint8 \[N, K/2\]"):
        int4_linear(torch.from_numpy(x[:, :32]), torch.from_numpy(q), torch.from_numpy(s))
    with pytest.raises(ValueError, match="even block"):
        int4_linear(torch.from_numpy(x), torch.from_numpy(q), torch.from_numpy(s[:, :1].repeat(3, 1)))
