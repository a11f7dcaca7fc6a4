"""Pieces shared by the functional update rules (kept here once, never copied per rule)."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

#: A collective that sums each tensor of the list in place across the shard group.
#: ``None`` means the tensors are whole (single process, DDP): nothing to reduce.
AllReduceSum = Callable[[list[Tensor]], None]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype work on a tensor of ``dtype`` is done in: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_compute(t: Tensor) -> Tensor:
    """``t`` in its compute dtype, without a copy when it already is."""
    return t.to(compute_dtype(t.dtype))


#: Elements per block of the blocked element-wise passes: small enough that a block's temporaries stay
#: in a core's L2 cache (1 MiB in float32), large enough that per-op overhead is a few percent.
BLOCK_NUMEL = 1 << 18


class Workspace:
    """Flat scratch buffers, one per (dtype, device), reused by every tensor of one ``step()`` call.

    A fresh full-size temporary per tensor costs page faults on CPU (measured at 3x the time of the op
    it feeds); one buffer per call, grown to the largest request, costs them once.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def take(self, numel: int, like: Tensor) -> Tensor:
        """``numel`` elements of scratch in ``like``'s dtype and device (contents undefined)."""
        key = (like.dtype, like.device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)  # free the smaller buffer before allocating its replacement
            buffer = self._buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel]


def fused_kernels(device: torch.device):  # type: ignore[no-untyped-def]
    """The ``fused=True`` kernel module for ``device`` (Triton on CUDA, C on CPU; imported on first use)."""
    from .. import kernels

    return kernels.backend(device)


def as_rows(t: Tensor) -> Tensor:
    """A 2-D view: (dim 0, rest) for ndim ≥ 2, (1, numel) for vectors and scalars (a copy if not contiguous)."""
    # note: explicit column count, not -1: an empty shard (0 local rows under FSDP2) cannot infer it.
    return t.reshape(t.shape[0], math.prod(t.shape[1:])) if t.ndim >= 2 else t.reshape(1, t.numel())


def row_blocks(rows: int, cols: int, block_numel: int = BLOCK_NUMEL) -> Iterator[slice]:
    """Consecutive slices of dim 0 holding about ``block_numel`` elements each (at least one row)."""
    per_block = max(1, block_numel // max(cols, 1))
    for start in range(0, rows, per_block):
        yield slice(start, min(start + per_block, rows))


def group_by_key(indices: Sequence[int], key: Callable[[int], object]) -> dict[object, list[int]]:
    """Indices grouped by ``key(i)``, groups in first-seen order (deterministic)."""
    groups: dict[object, list[int]] = defaultdict(list)
    for i in indices:
        groups[key(i)].append(i)
    return dict(groups)


def chunks_by_numel(indices: Sequence[int], numels: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Split ``indices`` into consecutive chunks whose total numel stays within ``budget``.

    A single tensor larger than the budget forms a chunk of its own, so every chunk's
    temporaries are bounded by ``max(budget, largest tensor)``.
    """
    chunk: list[int] = []
    total = 0
    for i in indices:
        if chunk and total + numels[i] > budget:
            yield chunk
            chunk, total = [], 0
        chunk.append(i)
        total += numels[i]
    if chunk:
        yield chunk
