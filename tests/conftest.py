import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
if not torch.cuda.is_available():
    # note: before anything imports Triton (it reads this once): without a GPU the fused=True kernels run in
    # Triton's interpreter, so tests/test_kernels.py checks their numerics on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:  # decorated now, in interpreter mode, whatever a test later sets TRITON_INTERPRET to
        import sage_optim.kernels.triton_kernels  # noqa: F401
    except ImportError:
        pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
