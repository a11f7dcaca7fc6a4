"""Pieces shared by the functional update rules (kept here once, never copied per rule)."""
from __future__ import annotations

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
