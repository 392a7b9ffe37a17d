import os

import pytest

# Tests are sized for 2 cores; keep torch and onnxruntime from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


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
