"""`mixtrt export` and `mixtrt inspect` as subprocesses."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys


def test_cli_export_and_inspect(tmp_path, exported):
    ck, _ = exported["mixtral-window"]
    art = tmp_path / "cli-art"
    exe = [sys.executable, "-m", "mixtrt"]
    r = subprocess.run([*exe, "export", str(ck), "--out", str(art)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # progress and status lines go to stderr (stdout carries results only); plain lines when not a terminal
    assert "tracing the graph" in r.stderr and (art / "manifest.json").is_file() and r.stdout == ""
    assert "  writing model.onnx.data: 100% (" in r.stderr and "\r" not in r.stdout + r.stderr
    r = subprocess.run([*exe, "inspect", str(art)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "mixtrt::MoE x2" in r.stdout and "windowed layout, capacity 21" in r.stdout
    # a tiny model's sizes in KiB, never "0.0 MiB"
    assert re.search(r"\nparameters    [\d.]+ M \([1-9][\d.]* [KM]iB\)\n", r.stdout) and " 0.0 MiB" not in r.stdout
    assert "chat          built-in Mistral v1 instruct format, tokenizer.model\n" in r.stdout
    assert "generation    eos [2] (generation_config.json); greedy, max_new_tokens 128 (mixtrt's defaults)\n" \
        in r.stdout
    r = subprocess.run([*exe, "inspect", str(art), "--json", "--verify"], capture_output=True, text=True)
    info = json.loads(r.stdout)
    assert info["ops"]["mixtrt::SlidingWindowAttention"] == 2 and info["parameters"] > 0 and info["verified"] is True
    r = subprocess.run([*exe, "inspect", str(art), "--verify"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.endswith(f"\nverified      the sha256 of all {len(info['files'])} files, "
                                                   "the graph against the manifest, the tokenizer, the weight index\n")
    assert "verified" not in subprocess.run([*exe, "inspect", str(art)], capture_output=True, text=True).stdout
    r = subprocess.run([*exe, "export", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert r.returncode == 2 and "not a checkpoint directory" in r.stderr and "Traceback" not in r.stderr


def test_a_closed_stdout_is_one_line_and_exit_2_for_every_command(tmp_path, exported):
    """Started with stdout closed (`>&-`), a command would lose its result (generate and chat failed with a
    traceback, the others exited 0 printing nothing): one line on stderr, exit 2, nothing written."""
    _, art = exported["mistral-window"]
    exe = [sys.executable, "-m", "mixtrt"]
    for args in (["generate", str(art), "--prompt", "a", "--max-new-tokens", "2"], ["chat", str(art)],
                 ["inspect", str(art)], ["export", str(exported["mistral-window"][0]), "--out", str(tmp_path / "a")]):
        r = subprocess.run(args=[*exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           input="hi\n", preexec_fn=lambda: os.close(1))
        assert r.returncode == 2 and r.stderr == f"mixtrt {args[0]}: error: stdout is closed, so the output would " \
            "be lost; redirect it instead (> FILE, or > /dev/null to discard it)\n", (args, r.stderr)
    assert not (tmp_path / "a").exists()


def test_cli_says_what_it_substitutes_in_one_line(tmp_path, exported):
    """A checkpoint without tokenizer.model: one warning line naming the substitution (the export then stops
    at an output directory it must not replace)."""
    ck, _ = exported["mistral-window"]
    shutil.copytree(ck, tmp_path / "ck")
    (tmp_path / "ck" / "tokenizer.model").unlink()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    r = subprocess.run([sys.executable, "-m", "mixtrt", "export", str(tmp_path / "ck"), "--out",
                        str(tmp_path / "busy")], capture_output=True, text=True)
    warning, error = r.stderr.strip().splitlines()
    assert warning.startswith(f"mixtrt export: warning: {tmp_path / 'ck'}: the checkpoint has no tokenizer.model: "
                              "using mistral-common's Mistral v1 tokenizer")
    assert r.returncode == 2 and error.startswith("mixtrt export: error:") and "not a mixtrt artifact" in error


def test_inspect_counts_a_tied_table_once(tmp_path):
    """A tied embedding is stored twice (the input table and, transposed, lm_head): inspect gives the model's
    parameter count, as export and transformers count them, and says what is stored."""
    from mixtrt.export import export_onnx
    from mixtrt.runtime.inspect import inspect_artifact
    from tests.checkpoints import make_checkpoint, make_hf_model

    kw = dict(tie_word_embeddings=True, num_hidden_layers=1, hidden_size=32, intermediate_size=48)
    ck = make_checkpoint(tmp_path / "ck", "mistral", **kw)
    info = inspect_artifact(export_onnx(ck, tmp_path / "art", progress=None))
    hf = sum(p.numel() for p in make_hf_model("mistral", **kw).parameters())  # counts the tied table once
    # the checkpoint's count, give or take the graph's few scalar constants (the RoPE tables are not counted)
    assert 0 <= info["parameters"] - hf < 64 and info["stored_parameters"] == info["parameters"] + 32000 * 32


def test_inspect_never_sends_a_terminal_escape(tmp_path, exported):
    """Names and notes from a checkpoint or an edited manifest (a substitution note, a generation_config.json key
    left unused, a template's name) reach inspect's text lines: a control character there is shown escaped, and
    the JSON output stays JSON."""
    from tests.hostile import replace_file

    # a real copy: a hard-linked one would give the session's artifact a second link, which onnx refuses to read
    art = shutil.copytree(exported["mistral-window"][1], tmp_path / "art")
    d = json.loads((art / "manifest.json").read_text())
    d["chat"]["note"] = "\x1b[2J\x1b]0;pwned\x07"
    replace_file(art / "manifest.json", json.dumps(d))
    r = subprocess.run([sys.executable, "-m", "mixtrt", "inspect", str(art)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\\x1b[2J\\x1b]0;pwned\\x07" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mixtrt", "inspect", str(art), "--json"], capture_output=True, text=True)
    assert json.loads(r.stdout)["chat"]["note"] == d["chat"]["note"] and "\x1b" not in r.stdout
