"""Prepare the training corpus for the built-in tiny model: Jane Austen's six novels.

Source
------
Debian package ``r-cran-janeaustenr`` (version 1.0.0-1 in Debian bookworm/trixie), the CRAN package
``janeaustenr`` 1.0.0 by Julia Silge (MIT license; the novels themselves are public domain,
taken from Project Gutenberg with the Gutenberg header/footer already removed by the package).
It ships the six novels as R character vectors (one element per line of the Gutenberg text) in
the lazy-load database ``/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb`` (+ ``Rdata.rdx``).
We read that database with a small pure-Python reader of R's XDR serialization (below), so R
itself is never run.

Getting the files on a fresh machine (this script installs nothing itself), either:

    apt-get update && apt-get install -y r-cran-janeaustenr          # pulls in r-base-core
    # or, without R: only unpack the .deb (1.6 MB)
    cd /tmp && apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*_all.deb /tmp/janeaustenr
    # then pass --rdata-dir /tmp/janeaustenr/usr/lib/R/site-library/janeaustenr/data

Output (deterministic; same bytes on every run)
------
``<out>/train.txt``    Sense and Sensibility, Pride and Prejudice, Mansfield Park, Emma, Persuasion
                       (documents separated by a line holding only ``<|doc|>``)
``<out>/heldout.txt``  Northanger Abbey, the whole book (never seen in training)
``<out>/SOURCE.txt``   provenance and sha256 of the inputs and outputs

Cleaning: hard-wrapped lines are joined into one line per paragraph, paragraphs are separated by a
blank line, ``_italics_`` underscores are dropped, runs of spaces are collapsed, and the text is
NFC-normalized. Chapter headings are kept (they are part of the books).

Usage:  python training/prepare_data.py [--rdata-dir DIR] [--out build/austen]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import struct
import unicodedata
import zlib
from pathlib import Path

DEFAULT_RDATA_DIR = "/usr/lib/R/site-library/janeaustenr/data"
BOOKS = {  # R object name -> title, in a fixed order
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "persuasion": "Persuasion",
    "northangerabbey": "Northanger Abbey",
}
HELDOUT = "northangerabbey"
DOC_SEP = "<|doc|>"


class _RReader:
    """Minimal reader for R's XDR serialization format (versions 2 and 3).

    Handles the types the janeaustenr data and its index use: NULL, symbols, pairlists (for
    attributes), character / integer / logical / double vectors and lists (named lists become dicts).
    """

    def __init__(self, data: bytes) -> None:
        self.b = data
        self.p = 0
        self.refs: list = []
        if data[:2] != b"X\n":
            raise ValueError(f"not an R XDR stream (starts {data[:2]!r})")
        self.p = 2
        version = self._int()
        self._int()  # writer R version
        self._int()  # min reader version
        if version == 3:
            n = self._int()
            self.p += n  # native encoding name

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.p)
        self.p += 4
        return v

    def read(self):
        flags = self._int()
        kind = flags & 0xFF
        has_attr = flags & (1 << 9)
        has_tag = flags & (1 << 10)
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # SYMSXP
            v = self.read()
            self.refs.append(v)
            return v
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            v = self.b[self.p : self.p + n]
            self.p += n
            # bit 12+ levels: LATIN1 = 4, UTF8 = 8, ASCII = 64 (in the gp field, flags >> 12)
            enc = "latin-1" if (flags >> 12) & 4 else "utf-8"
            return v.decode(enc)
        if kind == 2:  # LISTSXP (pairlist)
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            car = self.read()
            cdr = self.read()
            out = [(tag, car)]
            if isinstance(cdr, list):
                out += cdr
            return out
        if kind in (10, 13, 14, 16, 19):
            n = self._int()
            if n == -1:
                n = (self._int() << 32) + self._int()
            if kind in (16, 19):
                v = [self.read() for _ in range(n)]
            elif kind == 14:
                v = list(struct.unpack_from(f">{n}d", self.b, self.p))
                self.p += 8 * n
            else:
                v = list(struct.unpack_from(f">{n}i", self.b, self.p))
                self.p += 4 * n
            if has_attr:
                names = dict(self.read()).get("names")
                if kind == 19 and names:
                    return dict(zip(names, v, strict=True))
            return v
        raise ValueError(f"unsupported R SEXP type {kind} at byte {self.p}")


def _decompress(blob: bytes) -> bytes:
    # lazy-load entries: 4-byte big-endian uncompressed length, then (optionally a type byte) data
    if blob[4:5] in (b"Z", b"2", b"X", b"0"):
        kind, payload = blob[4:5], blob[5:]
        if kind == b"Z":
            return zlib.decompress(payload)
        if kind == b"2":
            import bz2

            return bz2.decompress(payload)
        if kind == b"X":
            import lzma

            return lzma.decompress(payload)
        return payload
    return zlib.decompress(blob[4:])


def read_books(rdata_dir: Path) -> dict[str, list[str]]:
    rdx = rdata_dir / "Rdata.rdx"
    rdb = rdata_dir / "Rdata.rdb"
    if not rdx.exists():
        raise SystemExit(
            f"{rdx} not found: install the Debian package r-cran-janeaustenr (see this file's docstring)"
        )
    index = _RReader(gzip.decompress(rdx.read_bytes())).read()
    db = rdb.read_bytes()
    books = {}
    for name in BOOKS:
        off, length = (int(x) for x in index["variables"][name])
        books[name] = _RReader(_decompress(db[off : off + length])).read()
    return books


def clean(lines: list[str]) -> str:
    paragraphs, cur = [], []
    for line in lines:
        line = (line or "").strip()
        if not line:
            if cur:
                paragraphs.append(" ".join(cur))
                cur = []
            continue
        cur.append(line)
    if cur:
        paragraphs.append(" ".join(cur))
    out = []
    for p in paragraphs:
        p = unicodedata.normalize("NFC", p)
        p = p.replace("_", "")
        p = re.sub(r"[ \t]+", " ", p).strip()
        if p:
            out.append(p)
    return "\n\n".join(out) + "\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rdata-dir", default=DEFAULT_RDATA_DIR, type=Path)
    ap.add_argument("--out", default="build/austen", type=Path)
    args = ap.parse_args()

    books = read_books(args.rdata_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    train_docs = [clean(books[n]) for n in BOOKS if n != HELDOUT]
    heldout = clean(books[HELDOUT])
    train = f"\n{DOC_SEP}\n".join(train_docs)
    (args.out / "train.txt").write_text(train, encoding="utf-8")
    (args.out / "heldout.txt").write_text(heldout, encoding="utf-8")
    src = [
        "corpus: Jane Austen's six novels (public domain), from Debian package r-cran-janeaustenr",
        "        (CRAN janeaustenr 1.0.0, MIT license, Julia Silge)",
        f"rdata: {args.rdata_dir}",
        f"Rdata.rdb sha256: {sha256((args.rdata_dir / 'Rdata.rdb').read_bytes())}",
        f"train: {', '.join(BOOKS[n] for n in BOOKS if n != HELDOUT)}",
        f"heldout: {BOOKS[HELDOUT]}",
        f"train.txt: {len(train.encode())} bytes sha256 {sha256(train.encode())}",
        f"heldout.txt: {len(heldout.encode())} bytes sha256 {sha256(heldout.encode())}",
    ]
    (args.out / "SOURCE.txt").write_text("\n".join(src) + "\n", encoding="utf-8")
    print("\n".join(src))


if __name__ == "__main__":
    main()
