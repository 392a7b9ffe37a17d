"""Transparent huge pages for the memory a session's weights were written into (Linux; elsewhere nothing).

A decode step streams every weight once; with 4 KiB pages that is a page-table walk every 4 KiB (two levels
deep under a virtual machine's nested paging) and the hardware prefetchers stop at each page boundary. Where
the kernel's transparent huge pages are available (`/sys/kernel/mm/transparent_hugepage/enabled` is
`always` or `madvise`; Linux 6.1+ for `MADV_COLLAPSE`), the anonymous memory a backend's session took while
it loaded is collapsed into 2 MiB pages right after: `madvise(MADV_COLLAPSE)` on each 2 MiB window that
appeared during the load. Only windows whose every base page is present and the process's own are collapsed
(`/proc/self/pagemap`), so a sparse mapping (a thread's stack, an arena's unused tail) or pages only read (the
shared zero page) are never filled in and the resident size does not grow. The contents do not change; where
the kernel refuses (an older one, no free huge page) the pages stay as they are, and no flag is left on the
memory (no `MADV_HUGEPAGE`). The collapse copies (about 1-2 s a GB), so by default (`MIXTRT_HUGEPAGES=auto`)
only float weights get it, where fp32 decode measured 5-15% faster; quantized ones measured no faster.
`MIXTRT_HUGEPAGES=1` does it for any weights, `0` never.

    >>> maps = ("7f0000000000-7f0000600000 rw-p 00000000 00:00 0 \\n"
    ...         "7f0000600000-7f0000800000 r--p 00000000 08:01 12 /usr/lib/libc.so.6\\n"
    ...         "55d000200000-55d000600000 rw-p 00000000 00:00 0 [heap]\\n"
    ...         "7ffd00000000-7ffd00400000 rw-p 00000000 00:00 0 [stack]\\n")
    >>> [hex(w) for w in sorted(anonymous_windows(maps, 2 << 20))]
    ['0x55d000200000', '0x55d000400000', '0x7f0000000000', '0x7f0000200000', '0x7f0000400000']
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixtrt.runtime.errors import ConfigError

THP = Path("/sys/kernel/mm/transparent_hugepage")
MADV_COLLAPSE = 25
PAGE = mmap.PAGESIZE  # the base page /proc/self/pagemap has an entry for


def thp_mode(root: Path = THP) -> str | None:
    """The kernel's transparent huge page mode (`always`, `madvise`, `never`), None where it has none."""
    try:
        text = (root / "enabled").read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_page_size(root: Path = THP) -> int:
    """The kernel's PMD huge page size (2 MiB on x86-64; 512 MiB on arm64 with 64 KiB pages)."""
    try:
        size = int((root / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        size = 0
    return size if size > 0 and size % PAGE == 0 else 2 << 20


def setting() -> str:
    """MIXTRT_HUGEPAGES: `auto` (the default: float weights only), `1` (any weights) or `0` (never)."""
    value = os.environ.get("MIXTRT_HUGEPAGES", "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise ConfigError(f"MIXTRT_HUGEPAGES={os.environ['MIXTRT_HUGEPAGES']!r}: give auto, 1 or 0")
    return value


def enabled(float_weights: bool = True) -> bool:
    """Linux with transparent huge pages not set to `never`, and MIXTRT_HUGEPAGES asking for it: `auto` for
    float weights (INT4 / INT8 ones gained nothing: their decode steps are bound by per-step work, not page walks,
    and a 7B INT4 load took 10-17 s longer), `1` for any."""
    wanted = setting()
    return (wanted == "1" or (wanted == "auto" and float_weights)) and sys.platform.startswith("linux") \
        and thp_mode() in ("always", "madvise") and libc() is not None


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library's symbols in this process (Linux; None elsewhere), looked up once: madvise here, glibc's
    mallopt and malloc_trim for the onnxruntime backend. errno is kept for ctypes.get_errno."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        handle = ctypes.CDLL(None, use_errno=True)
        handle.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return handle
    except (OSError, AttributeError):
        return None


def anonymous_windows(maps: str, huge: int) -> set[int]:
    """Start addresses of the `huge`-aligned windows lying wholly inside a private anonymous writable mapping
    (no file, or the heap; the main thread's stack left out) of /proc/self/maps' text `maps`."""
    windows: set[int] = set()
    for line in maps.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[1].startswith("rw") or parts[1][3] != "p":
            continue
        if len(parts) > 5 and parts[5] != "[heap]" and not parts[5].startswith("[anon:"):
            continue
        if parts[4] != "0":  # a file's pages
            continue
        low, high = (int(x, 16) for x in parts[0].split("-"))
        windows.update(range((low + huge - 1) // huge * huge, high // huge * huge, huge))
    return windows


def _maps() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return ""


@dataclass
class Collapsed:
    """What `collapse_since` did: bytes of memory now on huge pages, and bytes the kernel refused to collapse
    (no free huge page; a kernel before MADV_COLLAPSE refuses the first window and no more are tried)."""
    huge_bytes: int = 0
    refused_bytes: int = 0


PM_PRESENT = 1 << 63  # /proc/self/pagemap: the page is in memory
PM_EXCLUSIVE = 1 << 56  # ... and mapped by this process alone (never the shared zero page a read-only touch maps)


def _owned(pagemap: int, start: int, length: int) -> bool:
    """Every base page of [start, start + length) is present and this process's own (written, not the zero page
    a read maps, which mincore counts as resident): collapsing such a window adds no resident memory."""
    n = length // PAGE
    try:
        raw = os.pread(pagemap, 8 * n, start // PAGE * 8)
    except OSError:
        return False
    if len(raw) != 8 * n:
        return False
    flags = np.frombuffer(raw, np.uint64)
    return bool(np.all(flags & np.uint64(PM_PRESENT | PM_EXCLUSIVE) == np.uint64(PM_PRESENT | PM_EXCLUSIVE)))


def collapse(windows: set[int], huge: int) -> Collapsed:
    """Collapse those of `windows` (`huge`-aligned starts) whose pages are all present and owned into huge
    pages, one window per call (the kernel's answer for a range is one error for all of it). No `MADV_HUGEPAGE`:
    `MADV_COLLAPSE` needs none, and the flag would outlive the collapse (later faults in the range taking whole
    huge pages, khugepaged collapsing what the kernel refused now, a library's MADV_NOHUGEPAGE undone)."""
    done = Collapsed()
    c = libc()
    if c is None:
        return done
    try:
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:  # no pagemap: residency unknown, so nothing is collapsed
        return done
    try:
        for w in sorted(windows):
            if not _owned(pagemap, w, huge):
                continue
            if c.madvise(w, huge, MADV_COLLAPSE) == 0:
                done.huge_bytes += huge
                continue
            done.refused_bytes += huge
            if ctypes.get_errno() == errno.EINVAL:  # no MADV_COLLAPSE in this kernel (before Linux 6.1)
                break
    finally:
        os.close(pagemap)
    return done


def snapshot(float_weights: bool = True) -> set[int] | None:
    """Before a session's creation: the anonymous windows there are now (None where `enabled()` is false for
    weights of that kind)."""
    return anonymous_windows(_maps(), huge_page_size()) if enabled(float_weights) else None


def collapse_since(before: set[int] | None) -> Collapsed:
    """After it (and after the heap it freed went back to the OS): the anonymous memory that appeared since
    `snapshot()` goes on huge pages, as the module docstring says."""
    if before is None:
        return Collapsed()
    huge = huge_page_size()
    return collapse(anonymous_windows(_maps(), huge) - before, huge)
