import os

import pytest

# Tests are sized for 2 cores; keep torch and onnxruntime from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    """Triton reads TRITON_INTERPRET when it decorates a function, its own language helpers (tl.max, ...)
    included, so whichever test module imports triton first decides for the whole process. Every CPU test
    of our kernels runs them under the interpreter (the compile tests run in subprocesses without it), so the
    process sets it before collection imports anything; a `-m gpu` run keeps native kernels."""
    if not _gpu_run(config):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _gpu_run(config) -> bool:
    expr = config.option.markexpr or ""
    return "gpu" in expr and "not gpu" not in expr


INTERPRETED = 'os.environ["TRITON_INTERPRET"] = "1"'  # what an interpreter test module runs at import


def pytest_ignore_collect(collection_path, config):
    """A `-m gpu` run leaves out the modules that set TRITON_INTERPRET at import (the interpreter tests, none of
    them gpu-marked): importing one would make every Triton kernel of the process run interpreted."""
    if _gpu_run(config) and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return INTERPRETED in collection_path.read_text(encoding="utf-8")
    return None


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # the runtime tests need no torch
        return
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """name -> (checkpoint dir, artifact dir) for tests.checkpoints.EXPORT_CASES, exported once per session.
    Tests must not modify these directories (copy them first)."""
    from tests.checkpoints import EXPORT_CASES, export_cases

    root = tmp_path_factory.mktemp("export")
    return export_cases(root, EXPORT_CASES, max_position_embeddings=128)


@pytest.fixture(scope="session")
def head_artifacts(tmp_path_factory):
    """head_artifacts(name) -> (checkpoint dir, artifact dir) for tests.checkpoints.HEAD_CASES, each exported on
    first use, once per session. Tests must not modify these directories."""
    from tests.checkpoints import HEAD_CASES, HEAD_DEFAULTS, export_cases

    root = tmp_path_factory.mktemp("heads")
    done: dict = {}

    def get(name: str):
        if name not in done:
            done.update(export_cases(root, {name: HEAD_CASES[name]}, **HEAD_DEFAULTS))
        return done[name]

    return get
