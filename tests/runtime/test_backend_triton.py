"""The triton backend (torch + our Triton kernels) on the CPU under the Triton interpreter, against the onnxruntime
backend on the same artifacts: greedy tokens equal, with a window W shorter than the prompt, generation past 3W
and a ragged batch (rows of different lengths decoded together); teacher-forced logits close; the cache's row
moves; weights from memory; the refusals.

TRITON_INTERPRET is read when the kernels are decorated, so it is set before anything imports them (the backend
sets it too on a CPU device, and refuses when the kernels were compiled for a GPU in this process).
The interpreter runs each Triton program in numpy (~70 ms a program): the default tests keep to 2 short rows;
longer runs are slow-marked.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'mixtrt[gpu]'; the test extra lists it)")

from mixtrt.runtime.backends import load_backend  # noqa: E402
from mixtrt.runtime.cache import HostKVCache  # noqa: E402
from mixtrt.runtime.errors import ConfigError, MissingExtraError  # noqa: E402
from mixtrt.runtime.generation import GenerationConfig, Generator  # noqa: E402
from mixtrt.runtime.manifest import Manifest  # noqa: E402
from tests.checkpoints import EXPORT_W, backend_pairs, bos_prompts  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["mistral-window", "mixtral-window"]
LOGIT_TOL = 1e-4  # fp32: relative to max|logit| (tf32x3 dots in the kernels, fp32 elsewhere)


@pytest.fixture(scope="module")
def backends(exported):
    return backend_pairs(exported)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_equal_onnxruntime_ragged_past_3w(name, exported, backends):
    art = exported[name][1]
    ort, tri = backends(name)
    prompts = bos_prompts(1, (2 * EXPORT_W - 1, 3))  # the first prompt is longer than W; rows of different lengths
    cfg = GenerationConfig(max_new_tokens=3 * EXPORT_W - len(prompts[0]) + 3, eos_token_id=())
    want = Generator.load(art).generate(prompts, cfg)
    got = Generator(tri, Generator.load(art).tokenizer).generate(prompts, cfg)
    assert len(prompts[0]) + len(got[0].token_ids) > 3 * EXPORT_W  # row 0 goes past 3W positions
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert ort.capacity == tri.capacity and tri.windowed


@pytest.mark.parametrize("name", FAMILIES)
def test_teacher_forced_logits_match_onnxruntime(name, backends):
    """One prefill longer than W (MoE: the grouped path), then a 2-row decode step of rows at different
    positions: every logit within tolerance; a row started at 1 (not 0) leaves the others alone."""
    ort, tri = backends(name)
    [p] = bos_prompts(2, (2 * EXPORT_W + 2,))
    caches = [b.new_cache(3) for b in (ort, tri)]
    outs = [b.step(c, np.array([p]), start_row=1) for b, c in zip((ort, tri), caches, strict=True)]
    outs2 = [b.step(c, np.array([p[:3]]), start_row=2, last_only=True) for b, c in zip((ort, tri), caches, strict=True)]
    outs3 = [b.step(c, np.array([[5], [7]]), start_row=1) for b, c in zip((ort, tri), caches, strict=True)]
    for want, got in (outs, outs2, outs3):
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() <= LOGIT_TOL * np.abs(want).max()
    assert outs2[0].shape[1] == 1
    assert caches[1].lengths.tolist() == caches[0].lengths.tolist() == [0, len(p) + 1, 4]
    assert float(caches[1].keys[0][0].abs().sum()) == 0.0  # row 0 untouched


def test_move_rows_as_the_host_cache(backends):
    _, tri = backends("mistral-window")
    dev, host = tri.new_cache(4), HostKVCache(2, 4, 2, tri.capacity, 16)
    rng = np.random.default_rng(0)
    for i in range(2):
        for t, h in ((dev.keys[i], host.keys[i]), (dev.values[i], host.values[i])):
            h[:] = rng.standard_normal(h.shape).astype(np.float32)
            t.copy_(__import__("torch").from_numpy(h))
    dev.lengths[:] = host.lengths[:] = [3, 5, 7, 9]
    for order in ([2, 0], [0, -1, 3], [3, 2, 1, 0], [0, 0, 2, 0]):  # a row taken twice: copied
        tri.move_rows(dev, order)
        host.move_rows(order)
        assert dev.lengths.tolist() == host.lengths.tolist()
        for i in range(2):
            assert np.array_equal(dev.keys[i].numpy(), host.keys[i]) and np.array_equal(dev.values[i].numpy(),
                                                                                        host.values[i])
    with pytest.raises(ValueError, match="on a cache of 4 rows"):
        tri.move_rows(dev, [1, 4])


def test_from_state_dict_gives_the_artifacts_logits(exported, backends):
    """The in-memory path (what the GPU benchmark uses for random weights made on the device) on the artifact's
    own weights gives the same logits; rope tables it computes itself equal the graph's."""
    import torch

    from mixtrt.runtime.backends.graph_weights import read_graph_weights
    from mixtrt.runtime.backends.triton_backend import TritonBackend
    from mixtrt.runtime.manifest import Manifest

    art = exported["mistral-window"][1]
    _, tri = backends("mistral-window")
    m = Manifest.load(art)
    weights = read_graph_weights(art / "model.onnx", m.args).tensors
    own = {k: torch.from_numpy(v.copy()) for k, v in weights.items() if not k.startswith("rope")}
    mem = TritonBackend.from_state_dict(m.args, own, max_context=m.max_context, precision="fp32")
    assert np.allclose(mem.w["rope_cos"].numpy(), weights["rope_cos"][: m.max_context], atol=1e-6)
    [p] = bos_prompts(3, (EXPORT_W + 2,))
    a, b = tri.step(tri.new_cache(1), np.array([p])), mem.step(mem.new_cache(1), np.array([p]))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    eager = TritonBackend.from_state_dict(m.args, own, max_context=m.max_context, precision="fp32", ops="torch")
    cache = eager.new_cache(1)
    c = eager.step(cache, np.array([p]))
    d = eager.step(cache, np.array([[7]]))  # the reference's ring, copied back into the cache, serves the next step
    assert np.abs(a - c).max() <= LOGIT_TOL * np.abs(a).max()
    assert np.abs(d - mem.step(mem.new_cache(1), np.array([[*p, 7]]))[:, -1:]).max() <= LOGIT_TOL * np.abs(d).max()


def test_refusals(backends):
    _, tri = backends("mistral-window")
    cache = tri.new_cache(1)
    with pytest.raises(ConfigError, match="outside the cache"):
        tri.step(cache, np.array([[1]]), start_row=1)
    with pytest.raises(ConfigError, match="token ids"):
        tri.step(cache, np.array([[32000]]))
    with pytest.raises(ConfigError, match="more than the cache"):
        tri.step(cache, np.ones((1, tri.capacity + 1), np.int64))
    assert cache.lengths.tolist() == [0]


def test_a_device_torch_cannot_use_is_one_line(exported):
    """device='cuda' where torch has no CUDA (a CPU build, no GPU): one ConfigError saying why and what to do, not
    torch's AssertionError from the first weight copied; a device that is neither is named too."""
    import torch

    from mixtrt.runtime.backends.triton_backend import TritonBackend

    art = exported["mistral-window"][1]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device 'cuda': .*; device 'cpu' runs the kernels in the Triton"):
            TritonBackend.from_artifact(art, Manifest.load(art), device="cuda")
    with pytest.raises(ConfigError, match=r"device 'tpu': 'cuda' \(or 'cuda:N'\) or 'cpu'"):
        TritonBackend.from_artifact(art, Manifest.load(art), device="tpu")


def test_missing_gpu_extra_is_named(exported, monkeypatch):
    import mixtrt.runtime.extras as extras

    real = extras.missing
    monkeypatch.setattr(extras, "missing", lambda e: ["triton"] if e == "gpu" else real(e))
    with pytest.raises(MissingExtraError, match=r"the triton backend needs triton.*pip install 'mixtrt\[gpu\]'"):
        load_backend("triton", exported["mistral-window"][1])


def test_cli_generate_backend_triton(exported):
    art = exported["mistral-window"][1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, "-m", "mixtrt", "generate", str(art), "--prompt-ids", "1,2,3,4,5,6,7",
                            "--max-new-tokens", "3", "--json", "--backend", b], capture_output=True, text=True,
                           timeout=300, cwd=ROOT, env=env) for b in ("onnxruntime", "triton")]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert [__import__("json").loads(r.stdout)["token_ids"] for r in runs][0] == \
        __import__("json").loads(runs[1].stdout)["token_ids"]
    bad = subprocess.run([sys.executable, "-m", "mixtrt", "generate", str(art), "--prompt-ids", "1", "--backend",
                          "cuda"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "'triton'" in bad.stderr


def test_a_process_that_imported_triton_before_the_interpreter_is_refused_at_load(exported):
    """triton decorates triton.language's own jit functions (tl.zeros, ...) when it is first imported: a process
    that imported it without TRITON_INTERPRET (transformers' Mistral modules do) cannot run interpreted kernels.
    Loading the CPU backend there is one ConfigError naming the remedy (it loaded, then failed at the first step)."""
    art = exported["mistral-window"][1]
    code = ("import os, sys; os.environ.pop('TRITON_INTERPRET', None); import triton.language;"
            "from mixtrt.runtime.errors import ConfigError; from mixtrt.runtime.backends import load_backend\n"
            f"try: load_backend('triton', {str(art)!r})\nexcept ConfigError as e: print(e)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0 and "imported triton before TRITON_INTERPRET=1 was set" in r.stdout, r.stdout + r.stderr
    assert len(r.stdout.strip().splitlines()) == 1


def test_runtime_stays_torch_free():
    code = ("import sys, mixtrt.runtime.backends, mixtrt.runtime.generation, mixtrt.cli.options;"
            "print(sorted(m for m in ('torch', 'triton', 'onnx') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mistral-nowindow", "mixtral-nowindow", "mixtral-window"])
def test_greedy_three_rows_long(name, exported):
    """Three rows, 3W + 5 new tokens each, linear caches too (full causal attention)."""
    art = exported[name][1]
    prompts = bos_prompts(4, (2 * EXPORT_W + 1, 4, EXPORT_W + 1))
    cfg = GenerationConfig(max_new_tokens=3 * EXPORT_W + 5, eos_token_id=())
    want = Generator.load(art).generate(prompts, cfg)
    got = Generator.load(art, backend="triton").generate(prompts, cfg)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


@pytest.mark.slow
def test_fp16_mixtral_tokens(tmp_path):
    """fp16 artifact: the kernels' fp16 paths against onnxruntime's fp16 graph (greedy ids; a flip would show a
    numerics difference bigger than fp16 rounding at initializer_range 0.5)."""
    from mixtrt.export import export_onnx
    from tests.checkpoints import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "mixtral", sliding_window=EXPORT_W, max_position_embeddings=64)
    art = export_onnx(ck, tmp_path / "art", precision="fp16", progress=None)
    prompts = bos_prompts(5, (2 * EXPORT_W, 3))
    cfg = GenerationConfig(max_new_tokens=3 * EXPORT_W, eos_token_id=())
    want = Generator.load(art).generate(prompts, cfg)
    got = Generator.load(art, backend="triton").generate(prompts, cfg)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


@pytest.mark.slow
@pytest.mark.parametrize("head_dim_case", [dict(hidden_size=48, num_attention_heads=4),  # D=12: masked tiles
                                           dict(hidden_size=96, num_attention_heads=4)])  # D=24
def test_head_dims_that_are_not_powers_of_two(head_dim_case, tmp_path):
    from mixtrt.export import export_onnx
    from tests.checkpoints import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "mixtral", sliding_window=EXPORT_W, num_key_value_heads=2,
                         max_position_embeddings=64, **head_dim_case)
    art = export_onnx(ck, tmp_path / "art", progress=None)
    prompts = bos_prompts(6, (2 * EXPORT_W, 4))
    cfg = GenerationConfig(max_new_tokens=2 * EXPORT_W, eos_token_id=())
    want = Generator.load(art).generate(prompts, cfg)
    got = Generator.load(art, backend="triton").generate(prompts, cfg)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
