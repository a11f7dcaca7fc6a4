"""Optional fused Triton kernels for the element-wise SAGE/Lion update and SinkGD's Sinkhorn passes.

Nothing here is imported by the package itself: :mod:`sage_optim.functional` loads this module only for
``fused=True`` steps. Triton comes with the ``[triton]`` extra. The kernels run on CUDA tensors; with
``TRITON_INTERPRET=1`` Triton's interpreter runs them on CPU tensors too (slowly), which is how CI tests
their numerics against the for-loop path without a GPU.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

__all__ = ["available", "interpreting", "require", "check_devices"]


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """Whether Triton can be imported (not whether a GPU is present)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    """Raise a clear ImportError when Triton is missing."""
    if not available():
        raise ImportError("fused=True needs Triton: pip install 'sage-optim[triton]' (or pass fused=False)")


def check_devices(devices: Iterable[torch.device]) -> None:
    """Refuse devices the kernels cannot run on, with the fix in the message."""
    for device in devices:
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"fused=True runs Triton kernels on CUDA tensors, got a tensor on {device}; pass "
                             "fused=False (or set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)")
