"""The distribution installs both ways and imports from outside the source tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import mixtrt.runtime, mixtrt.export, mixtrt.plugins.moe, mixtrt.plugins.swa, mixtrt.export.cli as c;"
    "import importlib.resources as r;"
    "print(mixtrt.runtime.__file__);"
    "print(r.files('mixtrt.plugins.moe').joinpath('SPEC.md').is_file());"
    "print(mixtrt.runtime.__version__)"
)


def _probe(tmp_path: Path, env_path: str | None = None) -> list[str]:
    env = {"PATH": "/usr/bin:/bin"}
    if env_path:
        env["PYTHONPATH"] = env_path
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_editable_install_imports_from_outside_the_repo(tmp_path):
    path, spec, version = _probe(tmp_path)
    assert Path(path).resolve() == ROOT / "runtime" / "__init__.py"
    assert spec == "True" and version != "0.0.0+unknown"


def test_wheel_install_imports_from_outside_the_repo(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    [wheel] = wheels.glob("mixtrt-*.whl")
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    path, spec, version = _probe(run_dir, str(site))
    assert Path(path).is_relative_to(site), path
    assert spec == "True" and version == "0.2.0"
    assert (site / "bin" / "mixtrt").is_file()  # the console script
