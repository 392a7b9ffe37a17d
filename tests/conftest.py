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
