"""`mixtrt export` and `mixtrt inspect` as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys


def test_cli_export_and_inspect(tmp_path, exported):
    ck, _ = exported["mixtral-window"]
    art = tmp_path / "cli-art"
    exe = [sys.executable, "-m", "mixtrt"]
    r = subprocess.run([*exe, "export", str(ck), "--out", str(art)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "tracing the graph" in r.stdout and (art / "manifest.json").is_file()
    r = subprocess.run([*exe, "inspect", str(art)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "mixtrt::MoE x2" in r.stdout and "windowed layout, capacity 21" in r.stdout
    r = subprocess.run([*exe, "inspect", str(art), "--json", "--verify"], capture_output=True, text=True)
    info = json.loads(r.stdout)
    assert info["ops"]["mixtrt::SlidingWindowAttention"] == 2 and info["parameters"] > 0
    r = subprocess.run([*exe, "export", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert r.returncode == 2 and "not a checkpoint directory" in r.stderr and "Traceback" not in r.stderr
