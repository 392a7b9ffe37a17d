"""The onnxruntime backend on exported artifacts: rows, binding reuse, last-token logits, moving rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixtrt.export import load_model
from mixtrt.export.model import KVCache as TorchCache
from mixtrt.runtime.backends.onnxruntime import OrtBackend
from tests.checkpoints import EXPORT_W as W
from tests.checkpoints import close_logits as _close


@pytest.mark.parametrize("name", ["mixtral-window", "mistral-nowindow"])
def test_batched_decode_with_ragged_rows_matches_reference(exported, name):
    """Rows prefilled separately (different lengths), then decoded together with per-row lengths."""
    ck, art = exported[name]
    backend = OrtBackend.load(art, threads=2)
    model = load_model(ck)
    gen = torch.Generator().manual_seed(1)
    lengths = [3, 11, 8]
    cache = backend.new_cache(3)
    tcaches = [TorchCache(model.args, 1, capacity=backend.capacity) for _ in lengths]
    prompts = [torch.randint(3, 32000, (1, n), generator=gen) for n in lengths]
    for row, p in enumerate(prompts):
        backend.step(cache, p.numpy(), start_row=row)
        with torch.no_grad():
            model(p, cache=tcaches[row])
    for _ in range(2 * W):
        nxt = torch.randint(3, 32000, (3, 1), generator=gen)
        got = backend.step(cache, nxt.numpy())
        with torch.no_grad():
            want = np.concatenate([model(nxt[r:r + 1], cache=tcaches[r]).numpy() for r in range(3)])
        _close(got, want)
    # a finished row is dropped: the remaining rows keep decoding correctly from the front of the buffer
    backend.move_rows(cache, [2, 0])
    nxt = torch.randint(3, 32000, (2, 1), generator=gen)
    got = backend.step(cache, nxt.numpy())
    with torch.no_grad():
        want = np.concatenate([model(nxt[i:i + 1], cache=tcaches[r]).numpy() for i, r in enumerate([2, 0])])
    _close(got, want)


def test_binding_reuse_across_caches_and_rows(exported):
    """The backend keeps one IOBinding while the cache and rows stay the same. Steps alternating between
    two caches, and between row ranges of a third, must give what each sequence gets alone."""
    _, art = exported["mixtral-window"]
    backend = OrtBackend.load(art, threads=2)
    ids = torch.randint(3, 32000, (2, 14), generator=torch.Generator().manual_seed(3)).numpy()
    steps = [(0, 6)] + [(t, t + 1) for t in range(6, 14)]
    alone = []
    for r in range(2):
        cache = backend.new_cache(1)
        alone.append([backend.step(cache, ids[r:r + 1, a:b]).copy() for a, b in steps])
    one, two, both = backend.new_cache(1), backend.new_cache(1), backend.new_cache(2)
    for i, (a, b) in enumerate(steps):
        np.testing.assert_array_equal(backend.step(one, ids[0:1, a:b]), alone[0][i])
        np.testing.assert_array_equal(backend.step(two, ids[1:2, a:b]), alone[1][i])
        if b - a > 1 or i % 2:  # rows one at a time (start_row 0, then 1)
            got = [backend.step(both, ids[r:r + 1, a:b], start_row=r) for r in range(2)]
        else:  # both rows in one step
            got = list(backend.step(both, ids[:, a:b])[:, None])
        for r in range(2):
            _close(got[r], alone[r][i])
    assert one.lengths.tolist() == two.lengths.tolist() == [14] and both.lengths.tolist() == [14, 14]


def test_last_only_logits_equal_the_last_row_of_all(exported):
    """logit_positions: a prefill asking for the last token only gets exactly that row of the full
    logits, and the cache ends the same either way."""
    _, art = exported["mixtral-window"]
    backend = OrtBackend.load(art, threads=2)
    ids = torch.randint(3, 32000, (1, 9), generator=torch.Generator().manual_seed(4)).numpy()
    full_cache, last_cache = backend.new_cache(1), backend.new_cache(1)
    full = backend.step(full_cache, ids)
    last = backend.step(last_cache, ids, last_only=True)
    assert full.shape[1] == 9 and last.shape[1] == 1
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=0, atol=1e-5)
    for a, b in zip(full_cache.keys + full_cache.values, last_cache.keys + last_cache.values, strict=True):
        np.testing.assert_array_equal(a, b)
    nxt = np.array([[7], [7]])[:1]
    np.testing.assert_array_equal(backend.step(full_cache, nxt), backend.step(last_cache, nxt, last_only=True))


def test_returned_logits_are_the_callers(exported):
    """The step's inputs and logits live in buffers kept with the binding; what a step returns must not change
    when the next step (same rows and shape, so the same buffers) runs."""
    _, art = exported["mixtral-window"]
    backend = OrtBackend.load(art, threads=1)
    cache = backend.new_cache(1)
    backend.step(cache, np.array([[1, 50, 60]]), last_only=True)
    first = backend.step(cache, np.array([[70]]))
    kept = first.copy()
    second = backend.step(cache, np.array([[80]]))
    np.testing.assert_array_equal(first, kept)
    assert not np.array_equal(first, second) and second.dtype == np.float32


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2", None])
def test_new_cache_refuses_a_bad_batch_size(exported, bad):
    """One rule for every backend (runtime/cache.check_batch_size): an int >= 1, not a bool, in one line."""
    from mixtrt.runtime.errors import ConfigError

    backend = OrtBackend.load(exported["mistral-window"][1], threads=1)
    with pytest.raises(ConfigError, match=r"^batch_size must be an integer >= 1, got "):
        backend.new_cache(bad)


def test_what_a_host_application_passes(exported):
    """A library's host passes numpy integers where ints go, may try to pickle a Generator for another process, and
    may pass a path of the wrong type: each works or is one MixtrtError saying what to do."""
    import copy
    import pickle

    import numpy as np

    from mixtrt.runtime.benchmark import bench
    from mixtrt.runtime.errors import ConfigError
    from mixtrt.runtime.generation import Generator

    _, art = exported["mistral-window"]
    gen = Generator.load(art, threads=np.int64(1))
    assert gen.backend.session.get_session_options().intra_op_num_threads == 1
    assert bench(art, prompt_tokens=np.int64(4), new_tokens=np.int32(3), batch=np.int64(2),
                 threads=np.int64(1), verify=False).batch == 2
    for copier in (pickle.dumps, copy.deepcopy):
        with pytest.raises(ConfigError, match="cannot be pickled .* load the artifact in the other process"):
            copier(gen)
    class BytesPath:  # an os.PathLike of bytes is not a path mixtrt takes either
        def __fspath__(self) -> bytes:
            return b"art"

    __import__("os").PathLike.register(BytesPath)
    for bad in (b"art", 5, None, BytesPath()):
        with pytest.raises(ConfigError, match="the artifact must be a path"):
            Generator.load(bad)


def test_session_creation_maps_large_blocks_and_restores_the_threshold(exported, monkeypatch):
    """glibc's mmap threshold is fixed at 1 MiB while the session is created (each weight's fused and pre-packed
    copies go back to the OS when freed, not into a heap that grows by most of the weights' bytes) and set to
    glibc's own ceiling afterwards, also when creation fails; without glibc nothing is called."""
    import onnxruntime

    import mixtrt.runtime.backends.onnxruntime as ortb

    calls: list[tuple[str, int, int]] = []
    session = onnxruntime.InferenceSession

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad: int) -> int:
            calls.append(("trim", pad, 0))
            return 1

    def created(*a, **kw):
        calls.append(("session", 0, 0))
        return session(*a, **kw)

    monkeypatch.setattr(ortb, "_glibc", Libc)
    monkeypatch.setattr(onnxruntime, "InferenceSession", created)
    OrtBackend.load(exported["mixtral-window"][1], threads=1)
    assert calls == [("mallopt", -3, 1 << 20), ("session", 0, 0), ("mallopt", -3, 32 << 20), ("trim", 0, 0)]
    calls.clear()

    def fails(*a, **kw):
        raise RuntimeError("no")

    monkeypatch.setattr(onnxruntime, "InferenceSession", fails)
    with pytest.raises(ortb.ArtifactError, match="cannot load the graph: no"):
        OrtBackend.load(exported["mixtral-window"][1], threads=1)
    assert calls == [("mallopt", -3, 1 << 20), ("mallopt", -3, 32 << 20)]
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    for env, value in (("MALLOC_MMAP_THRESHOLD_", "65536"), ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=4096"),
                       ("MIXTRT_MALLOPT", "0")):  # the user's own setting (or none wanted): left alone
        calls.clear()
        with monkeypatch.context() as m:
            m.setenv(env, value)
            OrtBackend.load(exported["mixtral-window"][1], threads=1)
        assert calls == [("trim", 0, 0)], env
    monkeypatch.setattr(ortb, "_glibc", lambda: None)
    OrtBackend.load(exported["mixtral-window"][1], threads=1)  # no C library to tune: loads all the same
