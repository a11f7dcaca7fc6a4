"""What a sharded step communicates, predicted from the param groups (global shapes only).

``plan_collectives(optimizer)`` lists the all-reduces one step of a ``Shard(0)``-sharded optimizer
issues, in order, with their sizes; the distributed tests check it against the collectives actually
recorded, and ``docs/distributed.md`` uses it for the Llama-1.3B table (on the meta device).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.optim import Optimizer

from ..functional._common import chunks_by_numel, compute_dtype, group_by_key
from ..functional._quant import absmax_shape
from ._collectives import Collective

__all__ = ["plan_collectives"]


def _sage_statistic_dtype(param_dtype: torch.dtype, ndim: int) -> torch.dtype:
    """The dtype SAGE's functional layer gives this parameter's statistic (asked, not assumed)."""
    from ..functional.sage import _local_statistic

    grad = torch.zeros((1, 1) if ndim >= 2 else (1,), dtype=param_dtype)
    col_ema = torch.zeros(1, dtype=compute_dtype(param_dtype))
    return _local_statistic(grad, col_ema, 1.0, 0.5).dtype


def plan_collectives(optimizer: Optimizer, *, foreach: Optional[bool] = None,
                     fused: Optional[bool] = None) -> list[Collective]:
    """The all-reduces one step issues when every parameter is a ``Shard(0)`` DTensor on one 1-D mesh
    and has a gradient (payload per collective; a ring all-reduce moves about twice that per rank). Sums,
    except the finite-gradient flag's and an 8-bit momentum's vector block maxima (max); Muon all-gathers
    each matrix (the entry's size is the whole matrix).

    Args:
        optimizer: a sage-optim optimizer (its groups' ``rule``, ``iters`` and parameters' shapes are read;
            meta-device parameters are fine).
        foreach: the path the step takes; default ``True`` (what DTensor parameters get by default).
            ``False``: SinkGD reduces per matrix instead of per same-shape chunk.
        fused: the Triton path (SinkGD reduces per matrix, in float64); default: what the step would choose
            (``fused=None`` groups: on for CUDA parameters with Triton installed, unless ``foreach=`` is set).
    """
    from ..optim._base import uses_fused
    from ..optim._rules import RULES

    plan = [Collective("all_reduce", 1, torch.float32, "mesh")]  # the finite-gradient flag
    for group in optimizer.param_groups:
        rule = RULES[group["rule"]]
        params = list(group["params"])
        # an 8-bit momentum's vectors: one max all-reduce of every vector's block maxima, after the step's others
        int8_vectors = [Collective("all_reduce", sum(absmax_shape(p.shape)[1] for p in params if p.ndim == 1),
                                   torch.float32, "mesh")] \
            if group.get("state_dtype") == "int8" and any(p.ndim == 1 for p in params) else []
        if not params or not rule.reduces_over_rows:
            plan.extend(int8_vectors)
            continue
        if rule.name == "muon":  # each matrix gathered whole for Newton-Schulz, in the momentum's dtype
            from ..optim._rules import resolve_state_dtype

            plan.extend(Collective("all_gather", p.numel(), resolve_state_dtype(p, group.get("state_dtype")), "mesh")
                        for p in params)
            continue
        batched = (group.get("foreach") if group.get("foreach") is not None else True) if foreach is None else foreach
        use_fused = uses_fused(group, params) if fused is None else fused
        if rule.name == "sage":
            # one flat buffer per compute dtype: column sums (matrices), [Σ Ŝ², Σ s²] (vectors)
            sizes: dict[torch.dtype, int] = {}
            for p in params:
                n = math.prod(p.shape[1:]) if p.ndim >= 2 else 2
                dtype = _sage_statistic_dtype(p.dtype, p.ndim)
                sizes[dtype] = sizes.get(dtype, 0) + n
            plan.extend(Collective("all_reduce", n, dtype, "mesh") for dtype, n in sizes.items())
            plan.extend(int8_vectors)
        elif rule.name == "sinkgd":
            iters = int(group["iters"])
            cols = [math.prod(p.shape[1:]) for p in params]
            if use_fused:
                plan.extend(Collective("all_reduce", m, torch.float64, "mesh") for m in cols for _ in range(iters))
                continue
            if not batched:
                for p, m in zip(params, cols):
                    plan.extend(Collective("all_reduce", m, compute_dtype(p.dtype), "mesh") for _ in range(iters))
                continue
            numels = [p.numel() for p in params]
            budget = max(numels, default=0)
            kinds = group_by_key(range(len(params)), lambda i: (params[i].shape[0], cols[i], params[i].dtype))
            for indices in kinds.values():
                for chunk in chunks_by_numel(indices, numels, budget):
                    m, dtype = cols[chunk[0]], compute_dtype(params[chunk[0]].dtype)
                    plan.extend(Collective("all_reduce", len(chunk) * m, dtype, "mesh") for _ in range(iters))
    return plan
