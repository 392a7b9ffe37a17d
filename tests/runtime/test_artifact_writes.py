"""Writing artifacts under faults (runtime/manifest.py `atomic_dir`, `check_target`): only a provable artifact
is ever replaced, a failed or killed write leaves nothing behind (or is cleaned by the next export of the same
target), disk full is one line naming the file, and a signal never lands between the swap's two renames."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mixtrt.runtime import manifest as mf
from mixtrt.runtime.errors import ArtifactError, MixtrtWarning, Terminated
from mixtrt.runtime.manifest import PARTIAL_MARKER, atomic_dir, check_target, file_entries, is_artifact
from tests.hostile import one_line, tree

ROOT = Path(__file__).resolve().parents[2]


def fake_artifact(path: Path, payload: str = "graph") -> Path:
    """A directory is_artifact accepts: a mixtrt manifest listing exactly its files."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_text(payload)
    (path / "tokenizer.model").write_text("tok")
    files = file_entries(path, ["model.onnx", "tokenizer.model"])
    (path / "manifest.json").write_text(json.dumps({"format": mf.FORMAT, "format_version": 2, "files": files}))
    assert is_artifact(path)
    return path


def write_artifact(tmp: Path, payload: str = "new") -> None:
    (tmp / "model.onnx").write_text(payload)
    (tmp / "tokenizer.model").write_text("tok")
    files = file_entries(tmp, ["model.onnx", "tokenizer.model"])
    (tmp / "manifest.json").write_text(json.dumps({"format": mf.FORMAT, "format_version": 2, "files": files}))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- what may be replaced --------------------------------------------------------------------------

def _webapp(p: Path) -> None:
    p.mkdir()
    (p / "manifest.json").write_text('{"name": "my web app", "start_url": "/"}')
    (p / "index.html").write_text("<html>")
    (p / "src").mkdir()
    (p / "src" / "app.js").write_text("main()")


def _looks_like_ours(p: Path) -> None:
    """A mixtrt-format manifest, but the directory holds more than it lists."""
    fake_artifact(p)
    (p / "notes.txt").write_text("mine")


def _lists_a_directory(p: Path) -> None:
    p.mkdir()
    (p / "photos").mkdir()
    (p / "photos" / "a.jpg").write_text("jpg")
    (p / "manifest.json").write_text(json.dumps({"format": mf.FORMAT, "files": {"photos": {}}}))


def _link_to_artifact(p: Path) -> None:
    fake_artifact(p.parent / "real-art")
    p.symlink_to(p.parent / "real-art")


def _link_to_webapp(p: Path) -> None:
    _webapp(p.parent / "site")
    p.symlink_to(p.parent / "site")


def _manifest_is_a_link(p: Path) -> None:
    fake_artifact(p)
    (p.parent / "elsewhere.json").write_text((p / "manifest.json").read_text())
    (p / "manifest.json").unlink()
    (p / "manifest.json").symlink_to(p.parent / "elsewhere.json")


def _fifo_manifest(p: Path) -> None:
    p.mkdir()
    os.mkfifo(p / "manifest.json")


# (name, how the target is made, what the refusal names); every one is refused even with overwrite=True
TARGETS = [
    ("web app with a manifest.json", _webapp, "not a mixtrt artifact"),
    ("our manifest plus a file it does not list", _looks_like_ours, "does not list (notes.txt), so it is not only"),
    ("our manifest listing a directory", _lists_a_directory, "not a mixtrt artifact"),
    ("manifest.json a FIFO", _fifo_manifest, "not a mixtrt artifact"),
    ("manifest.json a link", _manifest_is_a_link, "not a mixtrt artifact"),
    ("a file", lambda p: p.write_text("my notes"), "exists and is not a directory"),
    ("link to an artifact", _link_to_artifact, "is a symbolic link"),
    ("link to a web app", _link_to_webapp, "is a symbolic link"),
    ("dangling link", lambda p: p.symlink_to(p.parent / "nowhere"), "is a symbolic link"),
    ("inside an artifact", lambda p: fake_artifact(p.parent), "lies inside the artifact"),
    ("deep inside an artifact", lambda p: fake_artifact(p.parent.parent), "lies inside the artifact"),
    ("inside an artifact through a link", lambda p: p.parent.symlink_to(fake_artifact(p.parent.parent / "real")),
     "lies inside the artifact"),
]


@pytest.mark.parametrize("name, make, message", TARGETS, ids=[t[0] for t in TARGETS])
def test_only_a_provable_artifact_is_replaced(tmp_path, name, make, message):
    target = tmp_path / "a" / "b" / "out" if name == "deep inside an artifact" else tmp_path / "box" / "out"
    if "inside" not in name:
        target.parent.mkdir(parents=True)
    make(target)
    before = tree(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(ArtifactError) as e, atomic_dir(target, overwrite=overwrite) as tmp:
            write_artifact(tmp)
        one_line(e.value, str(target), message)
        assert tree(tmp_path) == before


def test_an_artifact_is_replaced_only_with_overwrite(tmp_path):
    target = fake_artifact(tmp_path / "art", "old")
    with pytest.raises(ArtifactError, match="already exists") as e, atomic_dir(target) as tmp:
        write_artifact(tmp)
    one_line(e.value, "--force")
    with atomic_dir(target, overwrite=True) as tmp:
        write_artifact(tmp, "new")
    assert (target / "model.onnx").read_text() == "new" and leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:  # an empty directory holds nothing to lose
        write_artifact(tmp)
    umask = os.umask(0)
    os.umask(umask)
    assert is_artifact(empty) and empty.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700


def test_an_empty_working_directory_given_as_dot_is_filled_in_place(tmp_path, monkeypatch):
    """`--out .` in a new, empty folder: the artifact is written there, the folder itself kept (the same inode,
    so a shell inside it sees the files), staged inside it (the folder may be a mount point: below)."""
    here = tmp_path / "new"
    here.mkdir()
    inode = here.stat().st_ino
    monkeypatch.chdir(here)
    with atomic_dir(Path(".")) as tmp:
        assert tmp.parent == here
        write_artifact(tmp)
    assert is_artifact(here) and here.stat().st_ino == inode and leftovers(tmp_path) == leftovers(here) == []
    assert sorted(p.name for p in Path(".").iterdir()) == ["manifest.json", "model.onnx", "tokenizer.model"]
    with pytest.raises(ArtifactError, match="already exists"), atomic_dir(Path(".")) as tmp:  # now an artifact
        write_artifact(tmp)


def _mount_point(monkeypatch, target: Path) -> None:
    """Make `target` behave as a mount point (a container's volume): a rename between it and anywhere outside
    it fails with EXDEV, as the kernel answers across mounts."""
    real = os.replace

    def replace(src, dst, **kw):
        if Path(src).absolute().is_relative_to(target) != Path(dst).absolute().is_relative_to(target):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        return real(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p).absolute() == target)


def test_a_mount_point_is_filled_and_replaced_in_place(tmp_path, monkeypatch):
    target = tmp_path / "volume"
    target.mkdir()
    _mount_point(monkeypatch, target)
    with atomic_dir(target) as tmp:  # empty: staged inside it, the files moved within the mount
        assert tmp.parent == target
        write_artifact(tmp, "first")
    assert is_artifact(target) and leftovers(target) == leftovers(tmp_path) == []
    with pytest.raises(ArtifactError, match="already exists"), atomic_dir(target) as tmp:
        write_artifact(tmp)
    with atomic_dir(target, overwrite=True) as tmp:  # an artifact there: replaced in place, not swapped
        assert tmp.parent == target
        write_artifact(tmp, "second")
    assert (target / "model.onnx").read_text() == "second" and is_artifact(target)
    assert leftovers(target) == leftovers(tmp_path) == []
    # a move that fails half-way puts the old artifact back
    real = os.replace

    def fail_on_manifest(src, dst, **kw):
        if Path(dst) == target / "manifest.json" and Path(src).parent.name.startswith(".volume.tmp-"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real(src, dst, **kw)

    monkeypatch.setattr(os, "replace", fail_on_manifest)
    before = tree(tmp_path)
    with pytest.raises(ArtifactError) as e, atomic_dir(target, overwrite=True) as tmp:
        write_artifact(tmp, "third")
    one_line(e.value, str(target), "nothing was left behind")
    assert tree(tmp_path) == before and (target / "model.onnx").read_text() == "second"


def test_a_mount_point_holding_other_files_is_refused_and_a_dead_exports_leftover_inside_is_cleaned(
        tmp_path, monkeypatch):
    target = tmp_path / "volume"
    target.mkdir()
    _mount_point(monkeypatch, target)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a mixtrt artifact"), atomic_dir(target, overwrite=True) as tmp:
        write_artifact(tmp)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    (target / "notes.txt").unlink()
    dead = _dead_pid()
    stale = _leftover(target, f".volume.tmp-{dead}-x", {**mf._owner(target), "pid": dead})
    with atomic_dir(target) as tmp:
        write_artifact(tmp)
    assert not stale.exists() and is_artifact(target)


def test_check_target_cleans_a_dead_exports_staging_inside_first(tmp_path, exported):
    """The export checks its target before the weights (check_target), earlier than atomic_dir cleans: a dead
    export's staging folder inside an empty target, or inside an artifact replaced in place, is cleaned there, so
    the folder is taken for what it is (it was refused as a non-empty folder that is not an artifact), and loading
    such an artifact says what the leftover is."""
    dead = _dead_pid()
    empty = tmp_path / "empty"
    empty.mkdir()
    stale = _leftover(empty, f".empty.tmp-{dead}-x", {**mf._owner(empty), "pid": dead})
    check_target(empty)
    assert not stale.exists()
    art = tmp_path / "art"
    shutil.copytree(exported["mistral-window"][1], art)
    stale = _leftover(art, f".art.tmp-{dead}-y", {**mf._owner(art), "pid": dead})
    with pytest.raises(ArtifactError, match="the staging folder of an export that was killed"):
        mf.Manifest.load(art, verify=False)
    check_target(art, overwrite=True)
    assert not stale.exists() and is_artifact(art)
    alive = _leftover(empty, f".empty.tmp-{os.getpid()}-z", {**mf._owner(empty), "pid": os.getpid()})
    with pytest.raises(ArtifactError, match="not a mixtrt artifact"):
        check_target(empty)  # a live export's: left alone
    assert alive.exists()


def test_an_old_artifact_that_cannot_be_removed_is_named(tmp_path, monkeypatch):
    """A replaced artifact whose files the file system will not delete (write-protected, for a user who is not
    root) stays where the swap moved it: a warning names it (it stayed hidden and silent)."""
    target = fake_artifact(tmp_path / "art", "old")

    def refuse(path, onerror=None, **_):
        e = PermissionError(errno.EACCES, "Permission denied")
        onerror(os.unlink, str(Path(path) / "model.onnx"), (type(e), e, None))

    monkeypatch.setattr(mf.shutil, "rmtree", refuse)
    with pytest.warns(MixtrtWarning, match=r"could not be removed \(.*model.onnx: Permission denied\)") as w:
        with atomic_dir(target, overwrite=True) as tmp:
            write_artifact(tmp)
    assert f".art.old-{os.getpid()}" in str(w[0].message) and (tmp_path / f".art.old-{os.getpid()}").is_dir()
    assert (target / "model.onnx").read_text() == "new"


def test_a_failed_export_removes_the_folders_it_made(tmp_path):
    """--out a/b/c/art that fails: a, b and c (made for it) go too; a folder that was there stays."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "a" / "b" / "c" / "art") as tmp:
        write_artifact(tmp)
        raise RuntimeError("broken weights")
    assert tree(tmp_path) == before
    with atomic_dir(tmp_path / "a" / "b" / "c" / "art") as tmp:
        write_artifact(tmp)
    assert is_artifact(tmp_path / "a" / "b" / "c" / "art")


def test_a_staging_folder_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    """The file system refuses the staging folder (a read-only parent for a user who is not root): one line
    naming the folder and the reason, and the folders made for it removed again."""
    def refuse(prefix: str, dir: str) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", dir)

    monkeypatch.setattr(mf.tempfile, "mkdtemp", refuse)
    with pytest.raises(ArtifactError) as e, atomic_dir(tmp_path / "new" / "art") as tmp:
        write_artifact(tmp)
    one_line(e.value, "cannot write the artifact directory here (Permission denied)")
    assert list(tmp_path.iterdir()) == []


# ---- faults while writing --------------------------------------------------------------------------

def _enospc(path: Path) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, existing):
    target = tmp_path / "art"
    if existing:
        fake_artifact(target, "old")
    before = tree(tmp_path)
    with pytest.raises(ArtifactError) as e, atomic_dir(target, overwrite=True) as tmp:
        (tmp / "model.onnx").write_text("half")
        _enospc(tmp / "model.onnx.data")
    one_line(e.value, str(target), "model.onnx.data", "No space left on device", "nothing was left behind")
    assert tree(tmp_path) == before  # no partial artifact; the old one (if any) whole


def test_really_full_disk(tmp_path):
    """A 256 KiB tmpfs filled for real (needs the right to mount; the test above covers the same path)."""
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or r.returncode}); "
                    "test_disk_full_is_one_line_and_leaves_nothing simulates ENOSPC instead")
    try:
        with pytest.raises(ArtifactError) as e, atomic_dir(small / "art") as tmp:
            (tmp / "model.onnx").write_bytes(b"\0" * (1 << 20))
        one_line(e.value, str(small / "art"), "model.onnx", "No space left on device")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _child(code: str, *args: str) -> subprocess.Popen:
    # the signals as an interactive process has them: a suite run under nohup or in a background job inherits
    # SIGHUP / SIGINT ignored, and atomic_dir rightly leaves an ignored signal ignored
    script = textwrap.dedent('''
        import os, signal, sys, time
        from pathlib import Path
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from mixtrt.runtime.manifest import atomic_dir
        target = Path(sys.argv[1])
    ''') + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)


WRITE_AND_WAIT = '''
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "model.onnx").write_text("half")
        print("ready", flush=True)
        time.sleep(60)
'''


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, None)])
def test_signal_during_a_write_removes_the_partial_artifact(tmp_path, sig, code):
    target = fake_artifact(tmp_path / "art", "old")
    before = tree(tmp_path)
    child = _child(WRITE_AND_WAIT, str(target))
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    assert any(n.startswith(".art.tmp-") for n in leftovers(tmp_path))  # the partial artifact exists now
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    if code is not None:
        assert child.returncode == code and err == "", err  # Terminated: a quiet SystemExit(128 + signal)
    else:
        assert "KeyboardInterrupt" in err
    assert tree(tmp_path) == before


def test_kill_9_leftovers_are_cleaned_by_the_next_export_of_the_target(tmp_path):
    target = tmp_path / "art"
    child = _child('''
        with atomic_dir(target) as tmp:
            (tmp / "model.onnx").write_text("half")
            os.kill(os.getpid(), 9)
    ''', str(target))
    child.communicate(timeout=60)
    assert child.returncode == -9
    [left] = leftovers(tmp_path)
    assert left.startswith(f".art.tmp-{child.pid}-") and (tmp_path / left / PARTIAL_MARKER).is_file()
    other = fake_artifact(tmp_path / "other")
    with atomic_dir(other, overwrite=True) as tmp:  # another target's export leaves it alone
        write_artifact(tmp)
    assert left in leftovers(tmp_path)
    with atomic_dir(target) as tmp:
        write_artifact(tmp)
    assert leftovers(tmp_path) == [] and is_artifact(target)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _leftover(parent: Path, name: str, owner: dict | None) -> Path:
    d = parent / name
    d.mkdir()
    (d / "model.onnx").write_text("half")
    if owner is not None:
        (d / PARTIAL_MARKER).write_text(json.dumps(owner))
    return d


def test_only_provable_leftovers_are_removed(tmp_path):
    target = tmp_path / "art"
    me, dead = mf._owner(target), _dead_pid()
    keep = [
        _leftover(tmp_path, f".art.tmp-{os.getpid()}-live", {**me, "pid": os.getpid()}),  # an export running now
        _leftover(tmp_path, f".art.tmp-{dead}-nomarker", None),
        _leftover(tmp_path, f".art.tmp-{dead}-othertarget", {**me, "pid": dead, "target": str(tmp_path / "x")}),
        _leftover(tmp_path, f".art.tmp-{dead}-otherhost", {**me, "pid": dead, "host": "elsewhere"}),
        _leftover(tmp_path, f".art.tmp-{dead}-badmarker", None),
        _leftover(tmp_path, f".art.old-{dead}", None),  # not an artifact: not ours to delete
    ]
    (keep[4] / PARTIAL_MARKER).write_text("{not json")
    gone = _leftover(tmp_path, f".art.tmp-{dead}-stale", {**me, "pid": dead})
    with atomic_dir(target) as tmp:
        write_artifact(tmp)
    assert not gone.exists()
    assert all(k.exists() for k in keep)


def test_a_whole_artifact_staged_by_a_dead_export_that_never_renamed_it_is_removed(tmp_path):
    """An export killed between removing its marker and the rename leaves a whole artifact without a marker: removed
    once its process is gone and the marker's removal is older than UNRENAMED_S; kept while either is not so, and
    when what it holds is not a whole artifact (not provably ours)."""
    target, dead = tmp_path / "art", _dead_pid()
    old = time.time() - mf.UNRENAMED_S - 5

    def staged(name: str, whole: bool = True, age: float | None = old) -> Path:
        d = fake_artifact(tmp_path / name) if whole else _leftover(tmp_path, name, None)
        if age is not None:
            os.utime(d, (age, age))
        return d

    gone = staged(f".art.tmp-{dead}-unrenamed")
    keep = [staged(f".art.tmp-{os.getpid()}-alive"), staged(f".art.tmp-{dead}-recent", age=None),
            staged(f".art.tmp-{dead}-half", whole=False), staged(".art.tmp-nopid-x")]
    with atomic_dir(target) as tmp:
        write_artifact(tmp)
    assert not gone.exists() and all(k.exists() for k in keep) and is_artifact(target)


def test_an_old_artifact_moved_aside_by_a_dead_export_is_put_back(tmp_path):
    dead = _dead_pid()
    fake_artifact(tmp_path / f".art.old-{dead}", "precious")
    target = tmp_path / "art"
    with pytest.raises(ArtifactError, match="already exists"), atomic_dir(target) as tmp:
        write_artifact(tmp)
    assert (target / "model.onnx").read_text() == "precious" and leftovers(tmp_path) == []
    fake_artifact(tmp_path / f".art.old-{dead}", "stale")  # the target exists: the aside copy is stale
    with atomic_dir(target, overwrite=True) as tmp:
        write_artifact(tmp, "new")
    assert (target / "model.onnx").read_text() == "new" and leftovers(tmp_path) == []


def test_a_signal_never_lands_between_the_two_renames(tmp_path, monkeypatch):
    """SIGTERM sent between moving the old artifact aside and moving the new one in is delivered after the
    swap: the target is never missing, and the partial / old directories are gone."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this process has its own SIGTERM handler, which atomic_dir keeps: nothing to test here")
    target = fake_artifact(tmp_path / "art", "old")
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        real(src, dst)
        if len(calls) == 1:  # the old artifact was just moved aside
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs at the next bytecode: it must only record the signal

    monkeypatch.setattr(mf.os, "replace", replace)
    with pytest.raises(Terminated) as e, atomic_dir(target, overwrite=True) as tmp:
        write_artifact(tmp, "new")
    assert e.value.code == 143 and len(calls) == 2
    assert (target / "model.onnx").read_text() == "new" and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed with the write


def test_a_signal_that_an_extension_turns_into_its_own_error_is_still_the_signal(tmp_path):
    """The handler's Terminated raised inside an extension's code can come out as that code's own error
    (safetensors reading a tensor gave a ValueError): the write still ends as terminated by the signal (exit 143,
    one line in the CLI), with nothing left behind."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this process has its own SIGTERM handler, which atomic_dir keeps: nothing to test here")

    def extension_read() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        except Terminated:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    with pytest.raises(Terminated) as e, atomic_dir(tmp_path / "art") as tmp:
        (tmp / "model.onnx").write_text("partial")
        extension_read()
    assert e.value.code == 143 and leftovers(tmp_path) == [] and not (tmp_path / "art").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_check_target_refuses_the_same_as_atomic_dir(tmp_path):
    _webapp(tmp_path / "site")
    with pytest.raises(ArtifactError) as e:
        check_target(tmp_path / "site", overwrite=True)
    one_line(e.value, "site", "not a mixtrt artifact")


def test_a_full_disk_while_copying_names_the_artifacts_file_not_the_source(tmp_path):
    """shutil's copy raises ENOSPC naming its source (the checkpoint's file): the line names what was being
    written in the artifact instead."""
    import errno
    import os

    from mixtrt.runtime.manifest import _culprit

    tmp = tmp_path / ".art.tmp"
    tmp.mkdir()
    (tmp / "model.onnx").write_bytes(b"x")
    (tmp / "tokenizer.model").write_bytes(b"")
    os.utime(tmp / "model.onnx", ns=(1, 1))
    source = str(tmp_path / "ck" / "tokenizer.model")
    assert _culprit(tmp, OSError(errno.ENOSPC, "No space left on device", source)) == "tokenizer.model"
    assert _culprit(tmp, OSError(errno.ENOSPC, "No space", source, None, str(tmp / "model.onnx"))) == "model.onnx"
    assert _culprit(tmp, OSError(errno.EACCES, "Permission denied", source)) == source  # a read: the source


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception
def test_a_signal_swallowed_where_python_drops_exceptions_still_ends_the_write(tmp_path):
    """The handler's Terminated raised inside a callback whose exceptions Python prints and drops (a weakref
    callback run by the garbage collector, as torch's): the export does not go on to replace the artifact; it
    ends as terminated by the signal, the old artifact whole, nothing left behind."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this process has its own SIGTERM handler, which atomic_dir keeps: nothing to test here")
    import weakref

    class Thing:
        pass

    target = fake_artifact(tmp_path / "art", "old")
    with pytest.raises(Terminated) as e, atomic_dir(target, overwrite=True) as tmp:
        write_artifact(tmp, "new")
        thing = Thing()

        def dropped(_: object) -> None:  # the signal arrives while the callback runs: its exception is dropped
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)

        ref = weakref.ref(thing, dropped)
        del thing  # the callback runs now; Python prints "Exception ignored in ..." and goes on
        assert ref() is None
    assert e.value.code == 143 and (target / "model.onnx").read_text() == "old" and leftovers(tmp_path) == []


def test_an_export_killed_while_filling_a_folder_in_place_is_named_as_such(tmp_path):
    """kill -9 while an export moved its files into an empty folder (or a mount point) leaves part of them there
    and the rest in its staging folder, without the marker: not removable as provably partial, and not a foreign
    folder either: loading and exporting say what it is, and where the replaced artifact's files are."""
    target, dead = tmp_path / "art", _dead_pid()
    target.mkdir()
    (target / "model.onnx").write_text("moved in")
    staging = target / f".art.tmp-{dead}-x"
    (staging / ".replaced").mkdir(parents=True)
    (staging / ".replaced" / "manifest.json").write_text("{}")
    before = tree(tmp_path)
    for attempt in (lambda: check_target(target, overwrite=True), lambda: mf.Manifest.read(target)):
        with pytest.raises(ArtifactError) as e:
            attempt()
        one_line(e.value, f"{target}: holds the files of an export that was killed while it moved them in "
                          f"(.art.tmp-{dead}-x, process {dead}, no longer running); the files of the artifact it "
                          f"was replacing are in {staging / '.replaced'}")
    assert tree(tmp_path) == before


def test_a_missing_artifact_names_where_a_killed_export_moved_it_aside(tmp_path):
    dead = _dead_pid()
    fake_artifact(tmp_path / f".art.old-{dead}", "precious")
    with pytest.raises(ArtifactError) as e:
        mf.Manifest.read(tmp_path / "art")
    one_line(e.value, f"{tmp_path / 'art'}: no such artifact directory; {tmp_path / f'.art.old-{dead}'} holds the "
                      "artifact an export killed while replacing it had moved aside")


def test_a_replace_in_place_killed_after_its_manifest_went_in_is_finished_by_the_next_export(tmp_path):
    """kill -9 while a replace in place removed its staging folder (every new file in, the manifest last): the folder
    is a whole artifact beside a staging folder without its marker, holding what is left of the old files. The next
    export (or check) removes that folder and takes the artifact for what it is (it was called "not a whole
    artifact", and emptying the folder by hand was asked for); while its process runs it is left alone."""
    target, dead = fake_artifact(tmp_path / "art", "new"), _dead_pid()
    staging = target / f".art.tmp-{dead}-x"
    (staging / ".replaced").mkdir(parents=True)
    (staging / ".replaced" / "weights.json").write_text("{}")  # the old artifact's, on its way out
    with pytest.raises(ArtifactError, match="killed after it moved its files in .*: the artifact is whole"):
        check_target(target, overwrite=True)  # changed less than UNRENAMED_S ago: maybe a peer host's, kept
    old = time.time() - mf.UNRENAMED_S - 5
    os.utime(staging, (old, old))
    with pytest.raises(ArtifactError, match="already exists"):
        check_target(target)
    assert not staging.exists() and is_artifact(target) and (target / "model.onnx").read_text() == "new"
    # an update in place killed part way (mixtrt build on a mount point): the old manifest still there and the
    # names matching, but the staging folder still holds what it had to move in: kept (its .replaced holds the only
    # copy of the files the update had swapped out)
    staging = target / f".art.tmp-{dead}-u"
    (staging / ".replaced").mkdir(parents=True)
    (staging / ".replaced" / "model.onnx").write_text("the old graph")
    (staging / "manifest.json").write_text("{}")
    os.utime(staging, (old, old))
    with pytest.raises(ArtifactError):
        check_target(target, overwrite=True)
    assert (staging / ".replaced" / "model.onnx").read_text() == "the old graph"
    shutil.rmtree(staging)
    live = target / f".art.tmp-{os.getpid()}-y"
    (live / ".replaced").mkdir(parents=True)
    os.utime(live, (old, old))
    with pytest.raises(ArtifactError, match="not only a mixtrt artifact"):
        check_target(target, overwrite=True)
    assert live.exists()


def test_what_a_killed_removal_left_of_a_replaced_artifact_is_removed(tmp_path):
    """kill -9 while a swap removed the artifact it replaced (`.NAME.old-PID`) leaves part of it, hidden, maybe as big
    as the weights: the removal marks it first and unmarks it last, so the next export of NAME removes what is left;
    an empty one goes too; one marked for another target, or unmarked and not empty, is not provably ours."""
    target, dead = fake_artifact(tmp_path / "art", "current"), _dead_pid()
    marked = tmp_path / f".art.old-{dead}"
    marked.mkdir()
    (marked / "model.onnx.data").write_text("weights")
    (marked / mf.REPLACED_MARKER).write_text(json.dumps(mf._owner(target)))
    empty = tmp_path / f".art.old-{_dead_pid()}"
    empty.mkdir()
    other = tmp_path / f".art.old-{_dead_pid()}"
    other.mkdir()
    (other / "model.onnx.data").write_text("weights")
    (other / mf.REPLACED_MARKER).write_text(json.dumps(mf._owner(tmp_path / "elsewhere")))
    with atomic_dir(target, overwrite=True) as tmp:
        write_artifact(tmp, "newer")
    assert not marked.exists() and not empty.exists() and other.exists()
    assert (target / "model.onnx").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["art", other.name])


def test_a_bind_mount_is_a_mount_point(tmp_path, monkeypatch):
    """A bind mount of a folder of the same file system is a mount point os.path.ismount does not see (same device,
    another inode than its parent's): the kernel's mount table names it, escapes and all, and an export replaces
    the artifact there in place (the swap's rename failed with EBUSY after the whole export)."""
    target = tmp_path / "my volume"
    target.mkdir()
    table = tmp_path / "mountinfo"
    escaped = str(target).replace(" ", "\\040")
    table.write_text(f"36 35 98:0 / / rw - ext4 /dev/root rw\n99 36 98:0 /src {escaped} rw,relatime - ext4 /dev/x rw\n")
    monkeypatch.setattr(mf, "MOUNTINFO", str(table))
    assert mf.is_mount(target) and not mf.is_mount(tmp_path)
    fake_artifact(target, "old")
    with atomic_dir(target, overwrite=True) as tmp:
        assert tmp.parent == target  # staged inside, replaced in place
        write_artifact(tmp, "new")
    assert (target / "model.onnx").read_text() == "new" and is_artifact(target) and leftovers(target) == []
    monkeypatch.setattr(mf, "MOUNTINFO", str(tmp_path / "none"))  # no table: os.path.ismount's answer
    assert not mf.is_mount(target) and mf.is_mount(Path("/"))


def test_a_leftover_this_process_cannot_read_is_left_alone(tmp_path, monkeypatch):
    """A `.NAME.old-PID` of a dead process that this user cannot read (another user's) is not provably ours: left,
    and the export goes on (reading it raised PermissionError out of every export of NAME)."""
    target = fake_artifact(tmp_path / "art", "current")
    foreign = tmp_path / f".art.old-{_dead_pid()}"
    foreign.mkdir()
    real = Path.iterdir

    def iterdir(self):
        if self == foreign:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with atomic_dir(target, overwrite=True) as tmp:
        write_artifact(tmp, "new")
    assert foreign.is_dir() and (target / "model.onnx").read_text() == "new"
