"""Helpers for the hostile-input tables (tests/*/test_hostile_*.py): the outcome every bad input must have.

    before = tree(tmp_path)
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_checkpoint_dir(tmp_path)
    one_line(e.value, "config.json", "hidden_size")      # one line naming the file and the field
    assert tree(tmp_path) == before                      # nothing written, nothing deleted
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root (hidden ones and links included) -> (kind, size, content hash or link target)."""
    out: dict[str, tuple] = {}
    root = Path(root)
    if not root.exists() and not root.is_symlink():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            elif p.is_file():
                st = p.stat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size <= 64 << 20 else st.st_mtime_ns
                out[rel] = ("file", st.st_size, digest)
            else:
                out[rel] = ("other",)
    return out


def one_line(error: BaseException | str, *culprits: str) -> str:
    """The message is one line, has no traceback, and names every culprit (file, field, argument)."""
    text = str(error).strip()
    assert text, "empty error message"
    assert "\n" not in text, f"more than one line: {text!r}"
    assert "Traceback" not in text
    for c in culprits:
        assert c in text, f"{c!r} not named in {text!r}"
    return text


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def cli(*argv: str) -> Run:
    """`mixtrt ARGV` in this process (fast: no interpreter start); argparse's exits give their code."""
    from mixtrt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return Run(code, out.getvalue(), err.getvalue())


def refused(run: Run, command: str | None, *culprits: str) -> str:
    """A CLI run that failed as a bad input must: exit 2, nothing on stdout, one stderr line naming the culprits
    (command None: an error of `mixtrt` itself, before a command was chosen)."""
    assert run.code == 2, (run.code, run.stderr)
    assert run.stdout == "", run.stdout
    line = one_line(run.stderr, *culprits)
    assert line.startswith(f"mixtrt {command}: error:" if command else "mixtrt: error:"), line
    return line


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of an artifact whose large files are hard links (never write those in place: `replace_file`)."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def replace_file(path: Path, data: bytes | str) -> None:
    """Write `path` as a new file (breaking a hard link instead of writing through it)."""
    path.unlink(missing_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
