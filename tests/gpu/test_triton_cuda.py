"""The triton backend natively on an NVIDIA GPU (`pytest -m gpu`): compiled Triton kernels and CUDA tensors, against
the onnxruntime backend (CPU) on the same artifacts. The CPU suite runs the same backend under the Triton
interpreter (tests/runtime/test_backend_triton*.py); this is the run that proves the compiled kernels.

Tolerances, as the interpreter tests and the batch-invariance contract (docs/DESIGN.md): fp32 and int4 artifacts
(accuracy level 0, so onnxruntime's int4 matmuls run in fp32 as this backend's), logits within 1e-4 of max|logit|
and greedy tokens equal past 3W; a row's logits alone and beside other rows within 5e-5 of max|logit|; fp16
artifacts, logits within 2e-2 of max|logit| of the fp32 artifact's and teacher-forced top-1 agreement >= 95%.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def _why_not() -> str | None:
    """Why these tests cannot run here (decided at collection, so no session fixture exports anything first)."""
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None:
        return "torch and triton are not installed (pip install 'mixtrt[gpu]')"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU visible"


_WHY_NOT = _why_not()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")]

from mixtrt.runtime.backends import load_backend  # noqa: E402
from mixtrt.runtime.generation import GenerationConfig, Generator  # noqa: E402
from tests.checkpoints import EXPORT_W, backend_pairs, bos_prompts, close_logits  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LOGIT_TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.fail("TRITON_INTERPRET is set in this process: the kernels would run interpreted, not compiled "
                    "(run `pytest -m gpu` so tests/conftest.py leaves it unset)")


@pytest.fixture(scope="module")
def backends(exported):
    return backend_pairs(exported, threads=2)


@pytest.fixture(scope="module")
def other_artifacts(exported, tmp_path_factory):
    """int4 (accuracy level 0, block 64) and fp16 artifacts of the shared tiny checkpoints."""
    from mixtrt.export import export_onnx
    from mixtrt.export.quantize import Int4Options

    root = tmp_path_factory.mktemp("cuda-art")
    out = {}
    for name in ("mistral-window", "mixtral-window"):
        ck = exported[name][0]
        out[f"{name}-int4"] = export_onnx(ck, root / f"{name}-int4", precision="int4", progress=None,
                                          int4=Int4Options(block_size=64, accuracy_level=0))
        out[f"{name}-fp16"] = export_onnx(ck, root / f"{name}-fp16", precision="fp16", progress=None)
    return out


def test_the_backend_runs_compiled_kernels_on_cuda(backends):
    _, tri = backends("mixtral-window")
    assert str(tri.device).startswith("cuda")
    cache = tri.new_cache(1)
    tri.step(cache, np.array([[1, 5, 9]]))
    assert cache.keys[0].is_cuda and int(cache.lengths[0]) == 3
    from mixtrt.plugins.swa import triton_kernels
    from mixtrt.runtime.backends.triton_backend import _compiled_language

    assert _compiled_language()  # triton.language decorated for compiling, not for the interpreter
    assert type(triton_kernels.swa_attention_kernel).__name__ == "JITFunction"


@pytest.mark.parametrize("name", ["mistral-window", "mixtral-window", "mistral-nowindow", "mixtral-nowindow"])
def test_greedy_tokens_equal_onnxruntime_ragged_past_3w(name, exported, backends):
    art = exported[name][1]
    _, tri = backends(name)
    prompts = bos_prompts(1, (2 * EXPORT_W + 1, 3, EXPORT_W + 1))
    cfg = GenerationConfig(max_new_tokens=3 * EXPORT_W + 5, eos_token_id=())
    want = Generator.load(art).generate(prompts, cfg)
    got = Generator(tri, Generator.load(art).tokenizer).generate(prompts, cfg)
    assert len(prompts[0]) + len(got[0].token_ids) > 3 * EXPORT_W
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


@pytest.mark.parametrize("name", ["mistral-window", "mixtral-window", "mixtral-nowindow"])
def test_teacher_forced_logits_match_onnxruntime(name, backends):
    """A prefill longer than W (MoE: the grouped kernel), a short prefill into another row, then a 2-row decode
    step of rows at different positions: every logit within 1e-4 of max|logit|."""
    ort, tri = backends(name)
    [p] = bos_prompts(2, (2 * EXPORT_W + 2,))
    caches = [b.new_cache(3) for b in (ort, tri)]
    steps = [lambda b, c: b.step(c, np.array([p]), start_row=1),
             lambda b, c: b.step(c, np.array([p[:3]]), start_row=2, last_only=True),
             lambda b, c: b.step(c, np.array([[5], [7]]), start_row=1)]
    for run in steps:
        want, got = (run(b, c) for b, c in zip((ort, tri), caches, strict=True))
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() <= LOGIT_TOL * np.abs(want).max()
    assert caches[1].lengths.tolist() == caches[0].lengths.tolist()


@pytest.mark.parametrize("name", ["mistral-window", "mixtral-window"])
def test_batch_invariance(name, backends):
    """A row's decode logits alone and beside three ragged rows (other lengths, other cache rows) within the
    contract's 5e-5 of max|logit|, through 3W steps."""
    _, tri = backends(name)
    prompts = bos_prompts(3, (EXPORT_W + 2, 2 * EXPORT_W + 3, 4, 3 * EXPORT_W))
    alone, batch = tri.new_cache(1), tri.new_cache(4)
    a = tri.step(alone, np.array([prompts[0]]), last_only=True)
    for r, p in enumerate(prompts):
        b = tri.step(batch, np.array([p]), start_row=r, last_only=True)
        if r == 0:
            close_logits(b, a)
    rng = np.random.default_rng(4)
    for _ in range(3 * EXPORT_W):
        ids = rng.integers(3, 32000, (4, 1))
        a = tri.step(alone, ids[:1])
        b = tri.step(batch, ids)
        close_logits(b[:1], a)


@pytest.mark.parametrize("name", ["mistral-window", "mixtral-window"])
def test_int4_artifact_tokens_and_logits(name, other_artifacts):
    art = other_artifacts[f"{name}-int4"]
    ort, tri = load_backend("onnxruntime", art, threads=2), load_backend("triton", art)
    if name.startswith("mixtral"):  # the experts stay packed for the INT4 MoE kernels
        assert str(tri.w["layers.0.fc1"].dtype) == "torch.uint8"
    [p] = bos_prompts(5, (2 * EXPORT_W + 2,))
    want, got = (b.step(b.new_cache(1), np.array([p])) for b in (ort, tri))
    assert np.abs(got - want).max() <= LOGIT_TOL * np.abs(want).max()
    prompts = bos_prompts(6, (2 * EXPORT_W + 1, 3))
    cfg = GenerationConfig(max_new_tokens=3 * EXPORT_W + 5, eos_token_id=())
    tok = Generator.load(art).tokenizer
    assert [g.token_ids for g in Generator(tri, tok).generate(prompts, cfg)] == \
        [g.token_ids for g in Generator(ort, tok).generate(prompts, cfg)]


@pytest.mark.parametrize("name", ["mistral-window", "mixtral-window"])
def test_fp16_artifact_close_to_fp32(name, exported, other_artifacts):
    """fp16 weights and activations on the GPU (fp32 accumulation) against onnxruntime fp32 on the same checkpoint:
    logits within 2e-2 of max|logit| over a prefill longer than W, teacher-forced top-1 >= 95%, and a generation
    past 3W that stays finite."""
    ort = load_backend("onnxruntime", exported[name][1], threads=2)
    tri = load_backend("triton", other_artifacts[f"{name}-fp16"])
    assert "float16" in str(tri.dtype)
    [p] = bos_prompts(7, (2 * EXPORT_W + 2 + 3 * EXPORT_W,))
    caches = [b.new_cache(1) for b in (ort, tri)]
    cut = 2 * EXPORT_W + 2
    want, got = (b.step(c, np.array([p[:cut]])) for b, c in zip((ort, tri), caches, strict=True))
    for t in p[cut:]:  # then decode steps past 3W positions, teacher-forced
        w1, g1 = (b.step(c, np.array([[t]])) for b, c in zip((ort, tri), caches, strict=True))
        want, got = np.concatenate([want, w1], 1), np.concatenate([got, g1], 1)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
    assert float((got.argmax(-1) == want.argmax(-1)).mean()) >= 0.95
    out = Generator(tri, Generator.load(exported[name][1]).tokenizer).generate(
        bos_prompts(8, (2 * EXPORT_W,)), GenerationConfig(max_new_tokens=3 * EXPORT_W + 2, eos_token_id=()))
    assert len(out[0].token_ids) == 3 * EXPORT_W + 2


def test_cli_generate_backend_triton_on_cuda(exported):
    art = exported["mixtral-window"][1]
    runs = [subprocess.run([sys.executable, "-m", "mixtrt", "generate", str(art), "--prompt-ids", "1,2,3,4,5,6,7",
                            "--max-new-tokens", str(3 * EXPORT_W), "--json", "--backend", b],
                           capture_output=True, text=True, timeout=300, cwd=ROOT) for b in ("onnxruntime", "triton")]
    for r in runs:
        assert r.returncode == 0, r.stderr
    ids = [json.loads(r.stdout)["token_ids"] for r in runs]
    assert ids[0] == ids[1] and len(ids[0]) == 3 * EXPORT_W


def test_torch_reference_ops_on_cuda(exported, backends):
    """The backend with the ops' eager torch references (what the GPU benchmark compares against) on CUDA tensors
    gives the kernels' logits: the references make their index tensors on the inputs' device."""
    import torch

    from mixtrt.runtime.backends.graph_weights import read_graph_weights
    from mixtrt.runtime.backends.triton_backend import TritonBackend
    from mixtrt.runtime.manifest import Manifest

    for name in ("mistral-window", "mixtral-window"):
        art = exported[name][1]
        _, tri = backends(name)
        m = Manifest.load(art)
        weights = read_graph_weights(art / "model.onnx", m.args).tensors
        own = {k: torch.from_numpy(v.copy()).cuda() for k, v in weights.items() if not k.startswith("rope")}
        eager = TritonBackend.from_state_dict(m.args, own, max_context=m.max_context, precision="fp32", ops="torch")
        [p] = bos_prompts(9, (2 * EXPORT_W + 2,))
        caches = (tri.new_cache(1), eager.new_cache(1))
        for ids in (np.array([p]), np.array([[7]]), np.array([[11]])):
            a, b = (be.step(c, ids) for be, c in zip((tri, eager), caches, strict=True))
            assert np.abs(a - b).max() <= LOGIT_TOL * np.abs(a).max()
