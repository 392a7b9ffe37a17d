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


def test_windows_are_private_anonymous_writable_and_whole():
    maps = "\n".join([
        "7f0000100000-7f0000700000 rw-p 00000000 00:00 0 ",  # unaligned ends: the 2 whole windows inside
        "7f1000000000-7f1000400000 rw-s 00000000 00:01 5 /dev/zero (deleted)",  # shared
        "7f2000000000-7f2000400000 r--p 00000000 00:00 0 ",  # read-only
        "7f3000000000-7f3000400000 rw-p 00000000 08:01 7 /data/model.onnx.data",  # a file's pages
        "7ffd00000000-7ffd00400000 rw-p 00000000 00:00 0 [stack]",
        "55d000000000-55d000200000 rw-p 00000000 00:00 0 [heap]",
        "7f4000000000-7f40001ff000 rw-p 00000000 00:00 0",  # smaller than a window
        "garbage",
    ])
    assert sorted(hugepages.anonymous_windows(maps, 2 * MIB)) == [0x55D000000000, 0x7F0000200000, 0x7F0000400000]


def test_mode_and_switch(tmp_path, monkeypatch):
    assert hugepages.thp_mode(tmp_path) is None  # no THP directory: none
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert hugepages.thp_mode(tmp_path) == "madvise"
    assert hugepages.huge_page_size(tmp_path) == 2 * MIB  # the file missing: x86-64's 2 MiB
    (tmp_path / "hpage_pmd_size").write_text("524288\n")
    assert hugepages.huge_page_size(tmp_path) == 512 << 10
    monkeypatch.setattr(hugepages, "thp_mode", lambda root=None: "never")
    assert not hugepages.enabled() and hugepages.snapshot() is None
    assert hugepages.collapse_since(None) == hugepages.Collapsed()
    monkeypatch.setattr(hugepages, "thp_mode", lambda root=None: "madvise")
    monkeypatch.setattr(hugepages, "_libc", lambda: object())
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


def test_collapse_new_memory_keeps_contents_and_leaves_sparse_windows():
    _live()
    huge = hugepages.huge_page_size()
    before = hugepages.snapshot()
    full = mmap.mmap(-1, 4 * huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    sparse = mmap.mmap(-1, 4 * huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    data = np.frombuffer(full, np.uint32)
    data[:] = np.arange(data.size, dtype=np.uint32)  # every page resident
    sp = np.frombuffer(sparse, np.uint8)
    sp[::2 * hugepages.PAGE] = 1  # every other page
    done = hugepages.collapse_since(before)
    if done.huge_bytes == 0:
        pytest.skip(f"the kernel refused MADV_COLLAPSE ({done.refused_bytes} bytes; it needs Linux 6.1+ and free "
                    "huge pages)")
    assert done.huge_bytes >= 2 * huge  # the 4-window mapping holds at least 3 whole windows wherever it lands
    assert _anon_huge_kib(data.ctypes.data + 2 * huge) > 0
    assert _anon_huge_kib(sp.ctypes.data) == 0  # sparse: not filled in
    vec = (ctypes.c_ubyte * (4 * huge // hugepages.PAGE))()
    assert hugepages._libc().mincore(sp.ctypes.data, 4 * huge, vec) == 0
    assert sum(b & 1 for b in vec) == 4 * huge // hugepages.PAGE // 2  # its resident size did not grow
    assert np.array_equal(data, np.arange(data.size, dtype=np.uint32))
    del data, sp
    full.close()
    sparse.close()


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
