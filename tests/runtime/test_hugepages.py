"""Huge pages for a session's weights (runtime/hugepages.py): which memory is chosen, that only fully resident
windows are collapsed (the resident size never grows), that the contents stay, and the switch."""

from __future__ import annotations

import ctypes
import mmap
import re

import numpy as np
import pytest

from mixtrt.runtime import hugepages

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _default_setting(monkeypatch):
    """The tests state MIXTRT_HUGEPAGES where they depend on it; the caller's setting does not leak in."""
    monkeypatch.delenv("MIXTRT_HUGEPAGES", raising=False)


def test_windows_are_private_anonymous_writable_and_whole():
    maps = "\n".join([
        "7f0000100000-7f0000700000 rw-p 00000000 00:00 0 ",  # unaligned ends: the 2 whole windows inside
        "7f1000000000-7f1000400000 rw-s 00000000 00:01 5 /dev/zero (deleted)",  # shared
        "7f2000000000-7f2000400000 r--p 00000000 00:00 0 ",  # read-only
        "7f3000000000-7f3000400000 rw-p 00000000 08:01 7 /data/model.onnx.data",  # a file's pages
        "7ffd00000000-7ffd00400000 rw-p 00000000 00:00 0 [stack]",
        "55d000000000-55d000200000 rw-p 00000000 00:00 0 [heap]",
        "7f4000000000-7f40001ff000 rw-p 00000000 00:00 0",  # smaller than a window
        "7f5000000000-7f5000200000 rw-p 00000000 00:00 0 [anon: glibc: malloc arena]",  # named anonymous memory
        "7f6000000000-7f6000200000 rw-p 00000000 08:01 9 /data/a file with spaces (deleted)",
        "garbage",
    ])
    assert sorted(hugepages.anonymous_windows(maps, 2 * MIB)) == [0x55D000000000, 0x7F0000200000, 0x7F0000400000,
                                                                  0x7F5000000000]


def test_mode_and_switch(tmp_path, monkeypatch):
    assert hugepages.thp_mode(tmp_path) is None  # no THP directory: none
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert hugepages.thp_mode(tmp_path) == "madvise"
    assert hugepages.huge_page_size(tmp_path) == 2 * MIB  # the file missing: x86-64's 2 MiB
    (tmp_path / "hpage_pmd_size").write_text("524288\n")
    assert hugepages.huge_page_size(tmp_path) == 512 << 10
    (tmp_path / "hpage_pmd_size").write_text("0\n")
    assert hugepages.huge_page_size(tmp_path) == 2 * MIB  # nonsense: the default, never a division by zero
    monkeypatch.setattr(hugepages, "thp_mode", lambda root=None: "never")
    assert not hugepages.enabled() and hugepages.snapshot() is None
    assert hugepages.collapse_since(None) == hugepages.Collapsed()
    monkeypatch.setattr(hugepages, "thp_mode", lambda root=None: "madvise")
    monkeypatch.setattr(hugepages, "libc", lambda: object())
    assert hugepages.enabled() and not hugepages.enabled(float_weights=False)  # auto: float weights only
    for value, float_only, quantized in (("auto", True, False), ("", True, False), ("1", True, True),
                                         ("0", False, False), (" AUTO ", True, False)):
        monkeypatch.setenv("MIXTRT_HUGEPAGES", value)
        assert (hugepages.enabled(), hugepages.enabled(float_weights=False)) == (float_only, quantized), value
    monkeypatch.setenv("MIXTRT_HUGEPAGES", "yes")
    with pytest.raises(hugepages.ConfigError, match=r"^MIXTRT_HUGEPAGES='yes': give auto, 1 or 0$"):
        hugepages.enabled()


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping holding `address` (/proc/self/smaps)."""
    text = open("/proc/self/smaps").read()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        low, high = (int(x, 16) for x in block.split()[0].split("-"))
        if low <= address < high:
            return int(re.search(r"AnonHugePages:\s+(\d+)", block).group(1))
    raise AssertionError("no mapping")


def _live() -> None:
    if not hugepages.enabled():
        pytest.skip(f"transparent huge pages unavailable here (mode {hugepages.thp_mode()!r}, "
                    "or MIXTRT_HUGEPAGES=0)")


def _mapping(size: int, no_huge: bool = False) -> tuple[mmap.mmap, np.ndarray]:
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if no_huge:  # 4 KiB pages on first touch even where THP is `always`; the flag is cleared before collapsing
        m.madvise(mmap.MADV_NOHUGEPAGE)
    return m, np.frombuffer(m, np.uint8)


def _present(a: np.ndarray) -> int:
    vec = (ctypes.c_ubyte * (a.nbytes // hugepages.PAGE))()
    libc = ctypes.CDLL(None)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(a.ctypes.data, a.nbytes, vec) == 0
    return sum(b & 1 for b in vec)


def test_collapse_new_memory_keeps_contents_and_leaves_sparse_and_read_only_windows(monkeypatch):
    _live()
    huge = hugepages.huge_page_size()
    before = hugepages.snapshot()
    full, data = _mapping(4 * huge)
    data = data.view(np.uint32)
    data[:] = np.arange(data.size, dtype=np.uint32)  # every page written
    sparse, sp = _mapping(4 * huge, no_huge=True)
    sp[::2 * hugepages.PAGE] = 1  # every other page
    read, rd = _mapping(4 * huge, no_huge=True)
    assert int(rd[::hugepages.PAGE].sum()) == 0  # every page read: the shared zero page, which mincore calls resident
    rd[::2 * hugepages.PAGE] = 1
    for m in (sparse, read):
        m.madvise(mmap.MADV_HUGEPAGE)  # the NOHUGEPAGE flag off again (the pages stay as they are)
    real = hugepages.libc()
    asked: list[int] = []  # the windows collapse asked the kernel for (khugepaged may collapse the flagged sparse
    # and read mappings on its own while the test runs: what mixtrt asks is what it answers for)

    class Spy:
        def madvise(self, start: int, length: int, advice: int) -> int:
            asked.append(start)
            return real.madvise(start, length, advice)

    monkeypatch.setattr(hugepages, "libc", lambda: Spy())
    done = hugepages.collapse_since(before)
    if done.huge_bytes == 0:
        pytest.skip(f"the kernel refused MADV_COLLAPSE ({done.refused_bytes} bytes; it needs Linux 6.1+ and free "
                    "huge pages)")
    assert done.huge_bytes >= 3 * huge  # the 4-window mapping holds at least 3 whole windows wherever it lands
    assert _anon_huge_kib(data.ctypes.data + 2 * huge) > 0
    # neither sparse nor read-only windows asked for: collapsing them would fill them in (the resident size grows)
    assert asked and not any(a.ctypes.data <= w < a.ctypes.data + a.nbytes for a in (sp, rd) for w in asked), asked
    assert np.array_equal(data, np.arange(data.size, dtype=np.uint32))
    del data, sp, rd
    for m in (full, sparse, read):
        m.close()


def test_a_refusing_kernel_is_counted_and_not_asked_again(monkeypatch):
    """EINVAL (no MADV_COLLAPSE, before Linux 6.1): the first window refused and no more calls; another error
    (no free huge page) is counted per window and the rest are still tried."""
    import errno

    if not hugepages.sys.platform.startswith("linux"):
        pytest.skip("Linux only: /proc/self/pagemap")
    huge = hugepages.huge_page_size()
    m, a = _mapping(5 * huge)
    a[:] = 7
    windows = {w for w in range(a.ctypes.data, a.ctypes.data + a.nbytes, huge) if w % huge == 0
               and w + huge <= a.ctypes.data + a.nbytes}
    for code, calls_expected in ((errno.EINVAL, 1), (errno.EAGAIN, len(windows))):
        calls: list[int] = []

        class Refusing:
            def madvise(self, start, length, advice, code=code, calls=calls):
                calls.append(advice)
                ctypes.set_errno(code)
                return -1

        monkeypatch.setattr(hugepages, "libc", Refusing)
        done = hugepages.collapse(windows, huge)
        assert calls == [hugepages.MADV_COLLAPSE] * calls_expected
        assert done == hugepages.Collapsed(0, calls_expected * huge)
    del a
    m.close()


def test_backend_collapses_after_the_freed_heap_went_back(exported, monkeypatch):
    """The onnxruntime backend takes the snapshot before the session and collapses after malloc_trim (so trimmed
    pages are not collapsed), for float weights by default; MIXTRT_HUGEPAGES=0 leaves its memory alone, and a value
    it does not know is refused by name."""
    from mixtrt.runtime.backends import onnxruntime as ortb

    calls: list[str] = []
    snapshot, since, trim = hugepages.snapshot, hugepages.collapse_since, ortb._release_freed_heap
    monkeypatch.setattr(hugepages, "snapshot",
                        lambda float_weights: calls.append("snapshot") or snapshot(float_weights))
    monkeypatch.setattr(hugepages, "collapse_since", lambda b: calls.append("collapse") or since(b))
    monkeypatch.setattr(ortb, "_release_freed_heap", lambda: calls.append("trim") or trim())
    backend = ortb.OrtBackend.load(exported["mixtral-window"][1], threads=1)
    assert calls == ["snapshot", "trim", "collapse"]
    assert backend.huge_pages.huge_bytes % hugepages.huge_page_size() == 0
    monkeypatch.setenv("MIXTRT_HUGEPAGES", "0")
    assert ortb.OrtBackend.load(exported["mixtral-window"][1], threads=1).huge_pages == hugepages.Collapsed()
    monkeypatch.setenv("MIXTRT_HUGEPAGES", "on")
    with pytest.raises(hugepages.ConfigError, match="MIXTRT_HUGEPAGES='on'"):
        ortb.OrtBackend.load(exported["mixtral-window"][1], threads=1)


def test_quantized_weights_are_left_alone_by_default(exported, tmp_path, monkeypatch):
    from mixtrt.export import export_onnx
    from mixtrt.runtime.backends import onnxruntime as ortb

    art = export_onnx(exported["mistral-window"][0], tmp_path / "int4", precision="int4", progress=None)
    seen: list[bool] = []
    snapshot = hugepages.snapshot
    monkeypatch.setattr(hugepages, "snapshot",
                        lambda float_weights: seen.append(float_weights) or snapshot(float_weights))
    assert ortb.OrtBackend.load(art, threads=1).huge_pages == hugepages.Collapsed()  # auto: not quantized weights
    ortb.OrtBackend.load(exported["mistral-window"][1], threads=1)
    assert seen == [False, True]
