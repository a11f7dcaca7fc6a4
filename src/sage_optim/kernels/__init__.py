"""Fused kernels behind ``fused=True``: SAGE/Lion's element-wise update and column statistic, SinkGD's
single-pass Sinkhorn sweep and apply — one pass over memory each.

Two backends with one interface, chosen by the tensors' device (:func:`backend`):

- CUDA: Triton (:mod:`.triton_kernels`, the ``[triton]`` extra).
- CPU: C (:mod:`.cpu`, ``cpu_kernels.c`` built with the system's C compiler on first use). With
  ``TRITON_INTERPRET=1`` CPU tensors go to the Triton kernels instead, run by Triton's interpreter (slowly):
  that is how the tests check the Triton code without a GPU.

Nothing here is imported by the package itself; :mod:`sage_optim.functional` loads it for fused steps.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import torch

__all__ = ["available", "interpreting", "require", "check_devices", "backend"]


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
        raise ImportError("fused=True on CUDA tensors needs Triton: pip install 'sage-optim[triton]' "
                          "(or pass fused=False)")


def check_devices(devices: Iterable[torch.device]) -> None:
    """Refuse devices without kernels (and CUDA without Triton), with the fix in the message; build the C
    kernels for CPU tensors if they are not yet, so a failed build happens before any parameter changes."""
    for device in set(devices):
        module = backend(device)
        if hasattr(module, "library"):
            module.library()


def backend(device: torch.device) -> Any:
    """The kernel module for tensors on ``device``: Triton for CUDA (and for CPU under TRITON_INTERPRET=1),
    else C on CPU."""
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        require()
        from . import triton_kernels

        return triton_kernels
    if device.type == "cpu":
        from . import cpu

        return cpu
    raise ValueError(f"fused=True has kernels for CUDA and CPU tensors, got a tensor on {device}; pass fused=False")
