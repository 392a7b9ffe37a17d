"""The distribution: both installs import from outside the source tree, the wheel holds every module of
the tree, the extras table matches pyproject, and a runtime-only install runs the runtime commands."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import mixtrt.runtime, mixtrt.export, mixtrt.plugins.moe, mixtrt.plugins.swa, mixtrt.cli as c;"
    "import importlib.resources as r;"
    "print(mixtrt.runtime.__file__);"
    "print(r.files('mixtrt.plugins.moe').joinpath('SPEC.md').is_file());"
    "print(mixtrt.runtime.__version__)"
)
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _probe(tmp_path: Path, env_path: str | None = None) -> list[str]:
    env = {"PATH": "/usr/bin:/bin"}
    if env_path:
        env["PYTHONPATH"] = env_path
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    wheels = tmp_path_factory.mktemp("wheels")
    # built from a copy: setuptools writes build/ inside the source tree, and two builds of one tree collide
    src = tmp_path_factory.mktemp("src") / "mixtrt"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".peers", ".whl", ".mypy_cache", ".hypothesis", ".pytest_cache", ".ruff_cache",
        "__pycache__", "build", "dist", "*.egg-info", "engines"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    [whl] = wheels.glob("mixtrt-*.whl")
    return whl


def test_editable_install_imports_from_outside_the_repo(tmp_path):
    path, spec, version = _probe(tmp_path)
    assert Path(path).resolve() == ROOT / "runtime" / "__init__.py"
    assert spec == "True" and version != "0.0.0+unknown"


def test_wheel_install_imports_from_outside_the_repo(tmp_path, wheel):
    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    path, spec, version = _probe(run_dir, str(site))
    assert Path(path).is_relative_to(site), path
    assert spec == "True" and version == VERSION
    assert (site / "bin" / "mixtrt").is_file()  # the console script


def test_wheel_holds_every_module_of_the_source_tree(wheel):
    """No hand-kept package list: every .py under mixtrt/ and the folders it links ships."""
    tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mixtrt").rglob("*.py")}
    tree |= {f"mixtrt/{p.relative_to(ROOT).as_posix()}" for folder in ("runtime", "export", "plugins")
             for p in (ROOT / folder).rglob("*.py")}
    tree |= {f"mixtrt/plugins/{p.relative_to(ROOT / 'plugins').as_posix()}" for p in (ROOT / "plugins").rglob("*.md")}
    tree |= {"mixtrt/export/calibration.txt"}  # the default calibration text of --method awq
    tree |= {"mixtrt/py.typed"}  # PEP 561: a host's type checker reads mixtrt's annotations
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith("mixtrt/")}
    assert len(tree) > 30 and tree == shipped, (sorted(tree - shipped), sorted(shipped - tree))
    links = sorted(p.name for p in (ROOT / "mixtrt").iterdir() if p.is_symlink())
    assert links == ["export", "plugins", "runtime"]


def test_extras_table_matches_pyproject():
    from mixtrt.runtime.extras import EXTRAS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) - {"base"} == set(extras)


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory, wheel) -> Path:
    """A venv with the wheel and its runtime dependencies only: no torch, no onnxscript, no transformers."""
    venv = tmp_path_factory.mktemp("runtime-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=900)
    assert inst.returncode == 0, inst.stderr
    return venv


def _run(venv: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(venv)}
    return subprocess.run([str(venv / "bin" / "mixtrt"), *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=300, cwd=venv)


def test_runtime_only_install_runs_generate_and_inspect(runtime_venv, exported):
    absent = subprocess.run([str(runtime_venv / "bin" / "python"), "-c",
                             "import importlib.util as u; print([m for m in ('torch', 'onnxscript', 'transformers') "
                             "if u.find_spec(m)])"], capture_output=True, text=True)
    assert absent.stdout.strip() == "[]", absent
    _, art = exported["mixtral-window"]
    r = _run(runtime_venv, "inspect", str(art), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ops"]["mixtrt::MoE"] == 2
    r = _run(runtime_venv, "generate", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) == 4


def test_runtime_only_install_runs_a_head(runtime_venv, head_artifacts):
    """`mixtrt run` needs no torch; token labels need sentencepiece's offsets (protobuf, an onnxruntime dependency)."""
    _, art = head_artifacts("tokcls")
    r = _run(runtime_venv, "run", str(art), "--text", "Anna lives in Paris.", "--json")
    assert r.returncode == 0, r.stderr
    [result] = json.loads(r.stdout)["results"]
    assert "".join(t["text"] for t in result["tokens"]) == "Anna lives in Paris."


def test_every_command_help_and_the_missing_extra_message(runtime_venv):
    from mixtrt.cli.registry import COMMANDS

    assert _run(runtime_venv, "--help").returncode == 0
    for cmd in COMMANDS:
        r = _run(runtime_venv, cmd.name, "--help")
        assert r.returncode == 0 and "usage: mixtrt " + cmd.name in r.stdout, (cmd.name, r.stderr)
    r = _run(runtime_venv, "export", str(runtime_venv))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "mixtrt export: error: `mixtrt export` needs torch, onnxscript, onnx_ir, tqdm, which are not "
        "installed (export checkpoints to artifacts): pip install 'mixtrt[export]' (on a machine without a GPU, the "
        "CPU build of torch first: README's Install)"]


@pytest.mark.parametrize("given, want", [(None, "1"), ("0", "0")])
def test_importing_mixtrt_turns_onnxruntime_telemetry_off_unless_set(tmp_path, given, want):
    """onnxruntime 1.29+ phones home from inside a run; a runtime that reads a local artifact must not (README,
    Guarantees): importing mixtrt sets ORT_DISABLE_TELEMETRY=1, and a value the environment gives is kept."""
    env = {"PATH": "/usr/bin:/bin", **({"ORT_DISABLE_TELEMETRY": given} if given is not None else {})}
    out = subprocess.run([sys.executable, "-c", "import os, mixtrt; print(os.environ['ORT_DISABLE_TELEMETRY'])"],
                         cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == want, out.stderr
