"""The tensorrt backend on a GPU with TensorRT (`pytest -m gpu`): engines built by `mixtrt build` from the tiny
test artifacts, against onnxruntime on the same artifacts. NOT RUN where this was written (no GPU, no TensorRT).

Tolerances: fp32 engines, logits within 1e-3 of max|logit| and greedy tokens equal; fp16 engines, logits within
2e-2 of max|logit| (fp16 activations, fp32 accumulation in the kernels and in TensorRT's GEMMs) and teacher-forced
top-1 agreement >= 95% (greedy tokens may part ways after a near-tie). int4 engines (INT4 DequantizeLinear -> MatMul,
the MoEInt4 plugin, fp32 activations) against the artifact at accuracy level 0 (onnxruntime's int4 matmuls in fp32):
as fp32 engines."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                       reason="TensorRT is not installed (pip install 'mixtrt[tensorrt]' on a machine with a GPU)"),
]

from mixtrt.runtime.generation import GenerationConfig, Generator  # noqa: E402
from tests.checkpoints import EXPORT_W, make_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def engines(exported, tmp_path_factory):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    from mixtrt.export import export_onnx
    from mixtrt.export.tensorrt_build import build_engine

    root = tmp_path_factory.mktemp("trt")
    out = {}
    for name in ("mistral-window", "mixtral-window", "mixtral-nowindow"):
        art = root / name
        shutil.copytree(exported[name][1], art)
        build_engine(art, max_batch=4, opt_level=0, progress=None)
        out[name] = art
    ck = make_checkpoint(root / "fp16-ck", "mixtral", sliding_window=EXPORT_W, max_position_embeddings=128)
    out["mixtral-fp16"] = export_onnx(ck, root / "mixtral-fp16", precision="fp16", progress=None)
    build_engine(out["mixtral-fp16"], max_batch=4, opt_level=0, progress=None)
    from mixtrt.export.quantize import Int4Options

    for name in ("mistral-window", "mixtral-window"):  # int4 weights, fp32 activations (the int4 artifact's)
        out[f"{name}-int4"] = export_onnx(exported[name][0], root / f"{name}-int4", precision="int4", progress=None,
                                          int4=Int4Options(block_size=64, accuracy_level=0))
        build_engine(out[f"{name}-int4"], max_batch=4, opt_level=0, progress=None)
    return out


def assert_greedy_equal_through_3w(art):
    """A ragged batch (prompts of 2W and 3 tokens) generating past 3W: the engine's greedy tokens equal
    onnxruntime's."""
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(3, 32000, n).tolist()] for n in (2 * EXPORT_W, 3)]
    cfg = GenerationConfig(max_new_tokens=3 * EXPORT_W + 2, eos_token_id=())
    want = Generator.load(art).generate(prompts, cfg)
    got = Generator.load(art, backend="tensorrt").generate(prompts, cfg)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


@pytest.mark.parametrize("name", ["mistral-window", "mixtral-window", "mixtral-nowindow"])
def test_fp32_engine_greedy_through_3w(name, engines):
    art = engines[name]
    assert_greedy_equal_through_3w(art)


def test_fp16_engine_logits(engines):
    from mixtrt.runtime.backends import load_backend

    art = engines["mixtral-fp16"]
    ort, trt = load_backend("onnxruntime", art), load_backend("tensorrt", art)
    ids = np.random.default_rng(1).integers(3, 32000, (1, 3 * EXPORT_W + 4))
    a = ort.step(ort.new_cache(1), ids)
    b = trt.step(trt.new_cache(1), ids)  # longer than one engine step: run in pieces
    assert np.abs(a - b).max() <= 2e-2 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("name", ["mistral-window-int4", "mixtral-window-int4"])
def test_int4_engine_logits_and_greedy_through_3w(name, engines):
    from mixtrt.runtime.backends import load_backend

    art = engines[name]
    ort, trt = load_backend("onnxruntime", art), load_backend("tensorrt", art)
    ids = np.random.default_rng(2).integers(3, 32000, (1, 2 * EXPORT_W + 3))
    a, b = ort.step(ort.new_cache(1), ids), trt.step(trt.new_cache(1), ids)
    assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()
    assert_greedy_equal_through_3w(art)
