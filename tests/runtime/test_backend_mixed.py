"""onnxruntime's mixed-step graph (runtime/backends/ort_mixed.py): decoding rows and one row's prompt chunk in one
pass give the logits, tokens and cache of a decode step and a chunk run apart, for every attention body (head dims
16: GroupQueryAttention, 24: RoPE in standard ops, 12: the standard-op body), windowed and linear caches, int4 and
fp16."""

from __future__ import annotations

import numpy as np
import pytest

from mixtrt.runtime.backends.onnxruntime import OrtBackend
from mixtrt.runtime.errors import ConfigError
from tests.checkpoints import EXPORT_W, close_logits, make_checkpoint


@pytest.fixture(scope="module")
def odd_heads(tmp_path_factory):
    """Artifacts whose attention bodies the shared ones do not cover, and an int4 one."""
    from mixtrt.export import export_onnx

    root = tmp_path_factory.mktemp("mixed")
    cases = {"mixtral-hd12": dict(family="mixtral", head_dim=12, sliding_window=EXPORT_W),
             "mistral-hd24-nowindow": dict(family="mistral", head_dim=24, sliding_window=None),
             "mixtral-int4": dict(family="mixtral", sliding_window=EXPORT_W),
             "mistral-fp16": dict(family="mistral", sliding_window=EXPORT_W)}
    out = {}
    for name, kw in cases.items():
        ck = make_checkpoint(root / f"{name}-ck", kw.pop("family"), max_position_embeddings=128, **kw)
        precision = next((p for p in ("int4", "fp16") if p in name), "fp32")
        out[name] = export_onnx(ck, root / name, precision=precision, progress=None)
    return out


def fp16_close(got, want) -> None:
    """fp16 activations: the rows' GEMMs may round differently with the number of rows beside them."""
    assert np.abs(got - want).max() <= 2e-2 * float(np.abs(want).max())


def compare(artifact, close=close_logits) -> None:
    """Three rows decode while a fourth row's 11-token prompt goes in chunks of 4 (its first chunk asking for every
    position's logits), for more than 3 windows of steps; the mixed backend runs them as one call per step."""
    plain, mixed = OrtBackend.load(artifact), OrtBackend.load(artifact, mixed_steps=True)
    assert mixed.mixed_steps, mixed.mixed_reason
    rng = np.random.default_rng(0)
    vocab = plain.args.vocab_size
    pc, mc = plain.new_cache(4), mixed.new_cache(4)
    for row, n in enumerate((9, 3, 12)):  # prefills through the mixed graph's chunk part alone
        ids = rng.integers(0, vocab, (1, n))
        close(mixed.step(mc, ids, row, last_only=True), plain.step(pc, ids, row, last_only=True))
    ids = rng.integers(0, vocab, (3, 1))
    want = plain.step(pc, ids, 0)
    close(mixed.step(mc, ids, 0), want)  # the decode part alone
    ids = np.argmax(want[:, 0], -1)
    prompt = rng.integers(0, vocab, 11)
    for i in range(4 * EXPORT_W):
        want = plain.step(pc, ids[:, None], 0)[:, 0]
        chunk = prompt[4 * i:4 * i + 4]
        if chunk.size:
            last = i > 0
            want_chunk = plain.step(pc, chunk[None], 3, last_only=last)[0]
            got, got_chunk = mixed.step_mixed(mc, ids, chunk, last_only=last)
            assert got_chunk.shape == want_chunk.shape
            close(got_chunk, want_chunk)
        else:
            got = mixed.step(mc, ids[:, None], 0)[:, 0]
        close(got, want)
        ids = np.argmax(want, -1)
    np.testing.assert_array_equal(mc.lengths, pc.lengths)
    assert mc.lengths[3] == 11


@pytest.mark.parametrize("name", ["mistral-window", "mixtral-window", "mistral-nowindow", "mixtral-nowindow"])
def test_mixed_steps_equal_steps_apart(exported, name):
    compare(exported[name][1])


@pytest.mark.parametrize("name", ["mixtral-hd12", "mistral-hd24-nowindow", "mixtral-int4", "mistral-fp16"])
def test_mixed_steps_equal_steps_apart_other_bodies_int4_and_fp16(odd_heads, name):
    compare(odd_heads[name], fp16_close if "fp16" in name else close_logits)


def test_step_mixed_refuses_what_it_cannot_run(exported):
    art = exported["mistral-window"][1]
    plain, mixed = OrtBackend.load(art), OrtBackend.load(art, mixed_steps=True)
    with pytest.raises(ConfigError, match=r"step_mixed needs the backend loaded with mixed_steps=True"):
        plain.step_mixed(plain.new_cache(2), np.array([1]), np.array([2, 3]))
    cache = mixed.new_cache(2)
    with pytest.raises(ConfigError, match=r"a non-empty chunk"):
        mixed.step_mixed(cache, np.array([1]), np.array([], np.int64))
    with pytest.raises(ConfigError, match=r"2 decoding rows and a chunk's row need 3 cache rows; the cache has 2"):
        mixed.step_mixed(cache, np.array([1, 2]), np.array([3]))
    assert not cache.lengths.any()  # nothing ran


def test_mixed_steps_are_not_offered_without_a_cache(head_artifacts):
    backend = OrtBackend.load(head_artifacts("base")[1], mixed_steps=True)
    assert not backend.mixed_steps and "has no cache" in backend.mixed_reason


class _Recorder:
    """A backend class that records the options load_backend passes it."""

    options: dict = {}

    @classmethod
    def from_artifact(cls, directory, manifest, **options):
        cls.options = options
        return cls()


def test_backends_without_mixed_steps_are_not_passed_the_option(exported, monkeypatch):
    """Generator.load(mixed_steps=True) on a backend that has no mixed steps (triton, tensorrt) loads it as usual:
    the server then runs each prompt chunk as a call of its own."""
    import dataclasses

    from mixtrt.runtime import backends

    art = exported["mistral-window"][1]
    for flag in (False, True):
        info = dataclasses.replace(backends.BACKENDS["onnxruntime"], target=f"{__name__}:_Recorder", mixed_steps=flag)
        monkeypatch.setitem(backends.BACKENDS, "onnxruntime", info)
        backends.load_backend("onnxruntime", art, mixed_steps=True, threads=1)
        assert _Recorder.options == ({"mixed_steps": True, "threads": 1} if flag else {"threads": 1})
