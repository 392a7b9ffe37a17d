"""Hostile command lines: every bad argument is exit 2, nothing on stdout and one stderr line naming the argument
(argparse's usage block included: it is one `--help` away), and no file is written or removed. A closed stdout
is a quiet exit; invalid UTF-8 in argv or stdin is named, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixtrt.runtime.threads import available_cores
from tests.hostile import cli, one_line, refused, tree

ROOT = Path(__file__).resolve().parents[2]
CORES = available_cores()
BAD_UTF8 = os.fsdecode(b"caf\xe9")  # what a latin-1 terminal passes: 'caf\udce9'

# (argv after `mixtrt`, the command whose error it is (None: mixtrt's own), what the line must name);
# ART is replaced by a real artifact, CK by a real checkpoint
PARSE = [
    (["generate", "ART", "--prompt", "x", "--threads", "0"], "generate", ["--threads", f"[1, {CORES}]"]),
    (["generate", "ART", "--prompt", "x", "--threads", "-1"], "generate", ["--threads", "-1"]),
    (["generate", "ART", "--prompt", "x", "--threads", "1000"], "generate", ["--threads", "1000", f"[1, {CORES}]"]),
    (["generate", "ART", "--prompt", "x", "--threads", "two"], "generate", ["--threads", "'two'"]),
    (["generate", "ART", "--prompt", "x", "--threads", "1.5"], "generate", ["--threads"]),
    (["chat", "ART", "--threads", "0"], "chat", ["--threads"]),
    (["demo", "--threads", "99999"], "demo", ["--threads"]),
    (["generate", "ART", "--prompt", "x", "--max-new-tokens", "many"], "generate", ["--max-new-tokens", "many"]),
    (["generate", "ART", "--prompt", "x", "--temperature", "hot"], "generate", ["--temperature"]),
    (["generate", "ART"], "generate", ["--prompt", "--prompt-ids", "required"]),
    (["generate", "ART", "--prompt", "x", "--prompt-ids", "1"], "generate", ["--prompt-ids", "not allowed"]),
    (["generate", "ART", "--prompt", "x", "--prompt", "y"], "generate", ["--prompt", "given more than once"]),
    (["generate", "ART", "--prompt-ids", "1", "--prompt-ids", "2"], "generate", ["--prompt-ids", "more than once"]),
    (["generate", "ART", "--prompt", "x", "--colour"], "generate", ["unrecognized arguments: --colour"]),
    # a typo'd required option is named (with the option meant), not reported as the required one missing
    (["generate", "ART", "--promt", "x"], "generate", ["unrecognized arguments: --promt", "did you mean --prompt?"]),
    (["perplexity", "ART", "--txt", "f"], "perplexity", ["--txt", "did you mean --text?"]),
    # options are not abbreviated: a prefix is refused, naming the options it starts
    (["generate", "ART", "--prompt", "x", "--temp", "0"], "generate", ["--temp", "did you mean --temperature?"]),
    # what llama.cpp's and vLLM's users type by habit: named with mixtrt's option, or why there is none; a one-letter
    # option gets no guessed suggestion
    (["generate", "ART", "-p", "x"], "generate", ["unrecognized arguments: -p", "did you mean --prompt?"]),
    (["generate", "ART", "--prompt", "x", "-n", "3"], "generate", ["-n", "did you mean --max-new-tokens?"]),
    (["bench", "ART", "-p", "8"], "bench", ["-p", "did you mean --prompt-tokens?"]),  # llama-bench's -p / -n
    (["bench", "ART", "-n", "8"], "bench", ["-n", "did you mean --new-tokens?"]),
    (["generate", "ART", "--prompt", "x", "--ctx-size", "9"], "generate", ["--ctx-size", "export --max-context"]),
    (["generate", "ART", "--prompt", "x", "-q"], "generate", ["unrecognized arguments: -q (see"]),
    # a value that starts with '-' is written with '=' (argparse takes it for an option)
    (["generate", "ART", "--prompt", "-x"], "generate", ["--prompt expects a value", "--prompt=-x"]),
    (["generate"], "generate", ["artifact"]),
    (["frobnicate"], None, ["invalid command 'frobnicate'", "choose from export"]),
    (["generat", "ART"], None, ["invalid command 'generat' (did you mean generate?)"]),
    (["export", "CK", "--precision", "int8"], "export", ["--precision", "int8"]),
    (["export", "CK", "--max-context", "lots"], "export", ["--max-context", "lots"]),
    # an empty path is not the current folder (Path("") is "."): named, for every path argument
    (["export", "CK", "--out", ""], "export", ["argument --out: an empty path"]),
    (["export", ""], "export", ["argument checkpoint: an empty path"]),
    (["generate", "", "--prompt", "x"], "generate", ["argument artifact: an empty path"]),
    (["perplexity", "ART", "--text", ""], "perplexity", ["argument --text: an empty path"]),
]


@pytest.mark.parametrize("argv, command, culprits", PARSE, ids=[" ".join(a[:1] + a[2:])[:50] for a, _, _ in PARSE])
def test_bad_argument_is_one_line(tmp_path, argv, command, culprits):
    before = tree(tmp_path)
    line = refused(cli(*[str(tmp_path) if a in ("ART", "CK") else a for a in argv]), command, *culprits)
    assert "usage:" not in line and "--help" in line
    assert tree(tmp_path) == before


# named by the option, in the words every command uses, before anything loads or binds a port
EARLY = [
    (["run", "ART", "--text", BAD_UTF8], "run", ["--text is not valid text", "lone surrogate"]),
    (["perplexity", "ART", "--text", "/nonexistent/x.txt"], "perplexity", ["--text /nonexistent/x.txt: no such file"]),
    (["perplexity", "ART", "--text", "/"], "perplexity", ["--text /: a directory, not a text file"]),
    (["perplexity", "ART", "--text", "/dev/urandom"], "perplexity", ["--text /dev/urandom: not a regular file"]),
    (["serve", "ART"], "serve", ["not an artifact directory (no manifest.json)"]),
]


@pytest.mark.parametrize("argv, command, culprits", EARLY, ids=[" ".join(a[:1] + a[2:3]) for a, _, _ in EARLY])
def test_bad_input_is_named_before_loading(tmp_path, argv, command, culprits):
    before = tree(tmp_path)
    refused(cli(*[str(tmp_path) if a == "ART" else a for a in argv]), command, *culprits)
    assert tree(tmp_path) == before


# refused once the artifact is read, still before anything is printed
RUN = [
    (["--max-new-tokens", "0"], ["--max-new-tokens", "got 0"]),
    (["--max-new-tokens", "-5"], ["--max-new-tokens"]),
    (["--temperature", "nan"], ["--temperature", "nan"]),
    (["--temperature", "inf"], ["--temperature", "inf"]),
    (["--temperature", "-1"], ["--temperature must be >= 0 (0 = greedy), got -1.0"]),
    (["--top-p", "0"], ["--top-p"]),
    (["--top-p", "2"], ["--top-p"]),
    (["--top-k", "-1"], ["--top-k"]),
    (["--seed", str(-2**63 - 1)], ["--seed"]),
    (["--repetition-penalty", "0"], ["--repetition-penalty"]),
    (["--repetition-penalty", "inf"], ["--repetition-penalty"]),
    (["--stop", ""], ["--stop"]),
    (["--logit-bias", "1_0=5"], ["--logit-bias '1_0=5' is not ID=BIAS"]),
    (["--stop", BAD_UTF8], ["--stop", "lone surrogate"]),
]
PROMPTS = [
    (["--prompt", ""], ["--prompt is empty"]),
    (["--prompt", BAD_UTF8], ["--prompt", "character 3", "lone surrogate"]),
    (["--prompt-ids", "1,x"], ["--prompt-ids", "'1,x'"]),
    (["--prompt-ids", "1.5"], ["--prompt-ids"]),
    (["--prompt-ids", "1_000"], ["--prompt-ids '1_000'"]),  # ASCII digits only, as a token id is written
    (["--prompt-ids", "\u0661\u0662"], ["--prompt-ids"]),
    (["--prompt-ids", ""], ["--prompt-ids ''", "no token ids"]),
    (["--prompt-ids", "1,-1"], ["outside the vocabulary"]),
    (["--prompt-file", "/nonexistent/prompt.txt"], ["--prompt-file /nonexistent/prompt.txt: no such file"]),
    (["--prompt-file", "/"], ["--prompt-file /: a directory"]),
    (["--prompt-file", "/dev/zero"], ["--prompt-file /dev/zero: not a regular file"]),  # read whole, it was OOM
    (["--prompt-ids", "1,2", "--min-new-tokens", "10", "--max-new-tokens", "5"],
     ["--min-new-tokens 10 is more than --max-new-tokens 5"]),
    (["--prompt-ids", "1,99999999999"], ["outside the vocabulary"]),
    (["--prompt-ids", ",".join(["5"] * 200)], ["prompt 0 has 200 tokens", "max positions"]),
]


@pytest.fixture(scope="module")
def artifact(exported) -> Path:
    return exported["mistral-window"][1]


@pytest.mark.parametrize("extra, culprits", RUN + PROMPTS, ids=[" ".join(a)[:40] for a, _ in RUN + PROMPTS])
def test_bad_generation_argument_is_one_line(artifact, extra, culprits):
    before = tree(artifact)
    base = ["generate", str(artifact), "--threads", "1"]
    prompt = [] if extra[0].startswith("--prompt") else ["--prompt-ids", "1,2,3"]
    refused(cli(*base, *prompt, *extra), "generate", *culprits)
    assert tree(artifact) == before


def test_artifact_argument_that_is_not_one(tmp_path, exported):
    ck, _ = exported["mistral-window"]
    (tmp_path / "file").write_text("x")
    for path, culprit in ((tmp_path / "nope", "no such artifact directory"),
                          (tmp_path / "file", "not a directory"),
                          (ck, "not an artifact directory (no manifest.json); run `mixtrt export` first")):
        for command in (["generate", str(path), "--prompt", "x"], ["chat", str(path)], ["inspect", str(path)]):
            refused(cli(*command), command[0], str(path), culprit)


@pytest.fixture
def checkpoint(tmp_path, exported) -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(exported["mistral-window"][0], ck)
    return ck


def _webapp(path: Path) -> Path:
    path.mkdir()
    (path / "manifest.json").write_text('{"name": "shop", "icons": []}')
    (path / "index.html").write_text("<html>")
    return path


def test_export_arguments_that_would_make_an_unusable_artifact(tmp_path, checkpoint):
    out = str(tmp_path / "art")
    cases = [
        (["--max-context", "1"], ["--max-context 1", "[2, 128]"]),
        (["--max-context", "0"], ["--max-context 0"]),
        (["--max-context", "-5"], ["--max-context -5"]),
        (["--max-context", str(10**9)], ["--max-context 1000000000", "max_position_embeddings=128"]),
    ]
    before = tree(tmp_path)
    for extra, culprits in cases:
        refused(cli("export", str(checkpoint), "--out", out, "--quiet", *extra), "export", *culprits)
    original = (checkpoint / "config.json").read_text()
    (checkpoint / "config.json").write_text(json.dumps({**json.loads(original), "eos_token_id": 32000}))
    refused(cli("export", str(checkpoint), "--out", out, "--quiet"), "export", "config.json", "eos_token_id 32000")
    (checkpoint / "config.json").write_text(original)
    assert tree(tmp_path) == before
    refused(cli("export", str(tmp_path / "none"), "--out", out), "export", "none", "not a checkpoint directory")


def test_export_and_demo_never_replace_what_is_not_an_artifact(tmp_path, checkpoint, exported):
    art = tmp_path / "art"
    shutil.copytree(exported["mistral-window"][1], art)
    web = _webapp(tmp_path / "site")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(art)
    newer = tmp_path / "newer"  # an artifact of another checkpoint in a format this mixtrt cannot load
    shutil.copytree(art, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    before = tree(tmp_path)
    for out, culprit in ((web, "not a mixtrt artifact"), (tmp_path / "notes.txt", "not a directory"),
                         (tmp_path / "notes.txt" / "sub", "notes.txt is a file, not a folder"),
                         (tmp_path / "link", "symbolic link"), (art / "sub", "lies inside the artifact"),
                         (tmp_path / "link" / "sub", "lies inside the artifact"),
                         (checkpoint, "not a mixtrt artifact"), (tmp_path, "not a mixtrt artifact")):
        for force in ([], ["--force"]):
            refused(cli("export", str(checkpoint), "--out", str(out), "--quiet", *force), "export", str(out), culprit)
        refused(cli("demo", "--checkpoint", str(checkpoint), "--out", str(out), "--threads", "1"), "demo", culprit)
    refused(cli("export", str(checkpoint), "--out", str(art), "--quiet"), "export", "already exists", "--force")
    # an artifact of another checkpoint: demo replaces only its own outdated one (it replaced any, silently)
    refused(cli("demo", "--checkpoint", str(checkpoint), "--out", str(art), "--threads", "1"), "demo",
            "exported from another checkpoint", "--reexport")
    # ... nor one it cannot load (it replaced a newer mixtrt's artifact of another checkpoint): its manifest names it
    refused(cli("demo", "--checkpoint", str(checkpoint), "--out", str(newer), "--threads", "1"), "demo",
            "exported from another checkpoint", "--reexport")
    assert tree(tmp_path) == before


def _mixtrt(*args: str | bytes, stdin: bytes | None = None, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mixtrt", *args], input=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, timeout=120, cwd=ROOT, env=env)


def test_piping_into_head_is_quiet(tmp_path, artifact):
    err = tmp_path / "err.txt"
    cmd = (f"{sys.executable} -m mixtrt generate {artifact} --prompt 'It was' --max-new-tokens 100 --threads 1 "
           f"2>{err} | head -c 5; echo; echo ${{PIPESTATUS[0]}}")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    out, code, _ = r.stdout.rsplit("\n", 2)
    # 141 when mixtrt wrote after head left; 0 when it had finished first (a tiny model is fast): quiet either way
    assert out == "It wa" and code in ("0", "141"), r.stdout
    assert err.read_text() == ""  # no "error: Broken pipe", no traceback


def test_a_closed_stdout_is_a_quiet_exit_141(artifact):
    read, write = os.pipe()
    os.close(read)  # nobody will ever read: the first write fails with EPIPE
    try:
        r = _mixtrt("generate", str(artifact), "--prompt", "It was", "--max-new-tokens", "3", "--threads", "1",
                    stdout=write)
    finally:
        os.close(write)
    assert r.returncode == 141 and r.stderr == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device whose writes fail ENOSPC)")
def test_a_full_stdout_or_stderr_is_exit_2(artifact):
    """stdout on a full disk: one line naming the output; stderr full too: still exit 2, never a traceback."""
    with open("/dev/full", "wb") as full:
        r = _mixtrt("inspect", str(artifact), stdout=full)
        assert r.returncode == 2
        one_line(r.stderr.decode(), "mixtrt inspect: error: writing the output (stdout): No space left on device")
        r = subprocess.run([sys.executable, "-m", "mixtrt", "inspect", str(artifact / "nothing")], stdout=full,
                           stderr=full, timeout=120)
        assert r.returncode == 2


def test_a_ctrl_c_after_the_command_is_done_is_ignored(artifact):
    """Run as the program, the command's result stands once it returns: SIGINT is ignored for the interpreter's
    exit (an export's torch teardown took a second, and a Ctrl-C there made a written artifact's exit 130); called
    with arguments (a library or a test), the caller's handler is left alone."""
    import signal

    code = ("import signal, sys; from mixtrt.cli import main; sys.argv = ['mixtrt', 'inspect', sys.argv[1]]; "
            "before = signal.getsignal(signal.SIGINT); code = main(); "
            "print(code, before is signal.default_int_handler, signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")
    # SIGINT at its default for the child, as a terminal starts a program (a shell's background job, as the suite may
    # run under nohup, starts it ignored, and Python then keeps it ignored)
    r = subprocess.run([sys.executable, "-c", code, str(artifact)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert r.stdout.splitlines()[-1] == "0 True True", r.stdout[-500:] + r.stderr[-500:]
    from mixtrt.cli import main

    before = signal.getsignal(signal.SIGINT)
    assert main(["inspect", str(artifact)]) == 0 and signal.getsignal(signal.SIGINT) is before


def test_demo_help_names_the_demos_defaults():
    """`mixtrt demo --help`: the shared sampling options say the demo's defaults (48 tokens, 0.8, seed 0), not
    generate's, which keep theirs."""
    from mixtrt.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    helps = {name: {a.dest: a.help for a in subs[name]._actions} for name in ("demo", "generate")}
    assert helps["demo"]["max_new_tokens"].endswith("(default 48)") and "0.8" in helps["demo"]["temperature"]
    assert "default 0" in helps["demo"]["seed"] and "else 128" in helps["generate"]["max_new_tokens"]
    assert "fresh one each run" in helps["generate"]["seed"]


def test_a_connection_error_is_not_called_an_output_error(monkeypatch, capsys):
    """An OSError naming no file is stdout's failure unless it is a network peer's (Ray's ConnectionError at
    `serve --ray --ray-address`): said as itself, exit 2."""
    import mixtrt.cli.commands.inspect as inspect_command
    from mixtrt.cli import main

    def refuse(ns):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379")

    monkeypatch.setattr(inspect_command, "run", refuse)
    assert main(["inspect", "ART"]) == 2
    one_line(capsys.readouterr().err, "mixtrt inspect: error: Failed to connect to Ray cluster at 127.0.0.1:6379")


def test_a_closed_stdin_or_stderr(artifact):
    """Started with stdin closed (`<&-`) it reads as empty: one line, no traceback; with stderr closed (`2>&-`)
    the diagnostics are lost, never mixed into stdout's results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = dict(stdout=subprocess.PIPE, timeout=120, cwd=ROOT, env=env)
    base = [sys.executable, "-m", "mixtrt"]
    r = subprocess.run(base + ["generate", str(artifact), "-f", "-", "--threads", "1"], stdin=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, **run)
    want = r.stderr
    assert r.returncode == 2 and r.stdout == b"" and b"empty" in want
    for command, words in ((["generate", str(artifact), "-f", "-"], b"empty"),
                           (["perplexity", str(artifact), "--text", "-"], b"perplexity needs at least 2")):
        r = subprocess.run(base + command + ["--threads", "1"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           preexec_fn=lambda: os.close(0), **run)
        assert r.returncode == 2 and r.stdout == b"" and len(r.stderr.splitlines()) == 1, r.stderr
        assert words in r.stderr
    r = subprocess.run(base + ["chat", str(artifact), "--threads", "1"], stdin=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, preexec_fn=lambda: os.close(0), **run)
    assert r.returncode == 0 and r.stderr == b"" and r.stdout == b"you> \n"
    for extra, code in ((["--max-new-tokens", "3"], 0), (["--temperature", "nan"], 2)):
        r = subprocess.run(base + ["generate", str(artifact), "--prompt", "It was", "--threads", "1", *extra],
                           stderr=subprocess.DEVNULL, preexec_fn=lambda: os.close(2), **run)
        assert r.returncode == code
        assert b"error" not in r.stdout and b"finish" not in r.stdout and b"prompt tokens" not in r.stdout, r.stdout


def test_invalid_utf8_in_argv_and_stdin_is_named(artifact):
    r = _mixtrt("generate", str(artifact), b"--prompt", b"caf\xe9", "--threads", "1")
    assert r.returncode == 2 and r.stdout == b""
    one_line(r.stderr.decode(), "mixtrt generate: error: --prompt is not valid text", "character 3")
    # chat refuses the message in one line and keeps the session: the next message is answered
    r = _mixtrt("chat", str(artifact), "--threads", "1", "--max-new-tokens", "2", stdin=b"caf\xe9\nhello\n")
    assert r.returncode == 0 and r.stdout.decode().count("model> ") == 1
    assert r.stdout.decode().startswith("you> caf\ufffd\nyou> hello\nmodel> ")  # the echo shows the bad byte so
    one_line(r.stderr.decode(), "mixtrt chat: message 0 content is not valid text", "character 3")


@pytest.mark.slow
def test_sigterm_during_export_leaves_nothing(tmp_path):
    """SIGTERM while the export writes: exit 143, one line, no `.art.tmp-*` left (about 30 s). The checkpoint
    is large enough (~270 MB of weights) that the streaming writer is still writing when the signal lands."""
    from tests.checkpoints import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "mixtral", hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                         num_local_experts=8)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "mixtrt", "export", str(ck), "--out", str(out / "art")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 300
    while not any((p / "model.onnx.data").exists() for p in out.iterdir() if p.name.startswith(".art.tmp-")):
        assert proc.poll() is None and time.time() < deadline, "the export never started writing"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    one_line(err.strip().splitlines()[-1], "mixtrt export: terminated by signal 15")
    assert list(out.iterdir()) == []


def test_export_api_options(tmp_path, checkpoint):
    from mixtrt.export import export_onnx
    from mixtrt.runtime.errors import ConfigError

    before = tree(tmp_path)
    for kw, culprit in (({"max_context": 12.5}, "--max-context must be an integer"),
                        ({"max_context": "128"}, "--max-context must be an integer"),
                        ({"max_context": True}, "--max-context must be an integer"),
                        ({"precision": ["fp32"]}, "--precision"), ({"precision": "FP16"}, "--precision")):
        with pytest.raises(ConfigError) as e:
            export_onnx(checkpoint, tmp_path / "art", progress=None, **kw)
        one_line(e.value, culprit)
    assert tree(tmp_path) == before


def test_what_the_option_check_still_lets_through(tmp_path, capsys):
    """The check that names unknown options before argparse passes every form argparse takes: a short option with
    its value attached, negative numbers, `--opt=-x`, `-` for stdin; `--version` / `-h` before a misspelt command
    still answer."""
    from mixtrt.cli import _parse, build_parser

    parser = build_parser()
    ns = _parse(parser, ["generate", "ART", "-fprompt.txt", "--seed", "-1", "--stop=-x", "--temperature", "-0.5"])
    assert ns.prompt_file == "prompt.txt" and ns.seed == -1 and ns.stop == ["-x"] and ns.temperature == -0.5
    assert _parse(parser, ["generate", "ART", "-f", "-"]).prompt_file == "-"
    assert _parse(parser, ["bench", "ART", "-r3"]).repetitions == 3
    for argv in (["--version", "generat"], ["-h", "generat"]):
        with pytest.raises(SystemExit) as e:
            _parse(parser, argv)
        assert e.value.code == 0
    capsys.readouterr()
