"""Every collective the optimizers need lives here; update rules never import torch.distributed.

Single-process and DDP parameters are plain tensors: nothing to reduce (DDP has already averaged the
gradients, so every rank computes the same update). FSDP2 parameters are DTensors sharded on dim 0
(``Shard(0)``): :func:`prepare` hands the functional layer their local shards, which shards exist,
their global shapes and one batched all-reduce over the mesh's process group, so the update equals the
single-process one. Tensor-parallel placements (``Shard(1)``, ``_StridedShard``, ``Partial``) are refused
for the rules that reduce over dim 0. See ``docs/distributed.md``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..functional._common import AllReduceSum  # noqa: F401  (re-exported type)
from ._collectives import (Collective, all_reduce_flag, check_grad_layout, common_key, first_flat_index, is_dtensor,
                           layout_of, make_all_reduce, make_gather, mesh_groups, record_collectives)
from .checkpoint import init_optimizer_state
from .fsdp import DistEnv, apply_fsdp2, close_process_group, exit_rank, init_from_env
from .plan import plan_collectives
from .verify import StepVerifier, verify_step

__all__ = [
    "prepare",
    "first_flat_index",
    "local_state",
    "local_device",
    "is_dtensor",
    "all_finite",
    "default_foreach",
    "verify_step",
    "StepVerifier",
    "record_collectives",
    "Collective",
    "plan_collectives",
    "apply_fsdp2",
    "init_from_env",
    "close_process_group",
    "exit_rank",
    "DistEnv",
    "init_optimizer_state",
]


def local_device(t: Tensor) -> torch.device:
    return t.to_local().device if is_dtensor(t) else t.device


def default_foreach(params: Sequence[Tensor]) -> bool:
    """torch.optim's rule (batch with foreach ops when every tensor is on a CUDA device), plus: batch
    whenever a parameter is a DTensor, because the batched paths also batch the collectives (SinkGD:
    one all-reduce per iteration for a whole same-shape chunk instead of one per matrix)."""
    if not params:
        return False
    return any(is_dtensor(p) for p in params) or all(local_device(p).type == "cuda" for p in params)


def _local_all_finite(grads: Sequence[Tensor]) -> bool:
    # note: a plain sum reads each gradient once at memory speed (aminmax is ~1.6x slower on CPU, an
    # ∞-norm or isfinite() ~10x) and any NaN/±Inf makes it non-finite. A finite gradient can overflow
    # its sum, so a non-finite sum is re-checked exactly with aminmax (float64, so that finite float64
    # values beyond float32 range are not called infinite).
    present = [g.reshape(-1) for g in grads if g.numel() > 0]
    if not present:
        return True
    sums = torch.stack([g.sum().to(torch.float64) for g in present]).cpu()
    suspects = [g for g, total in zip(present, sums.isfinite().tolist()) if not total]
    extremes = [torch.stack(torch.aminmax(g)).to(torch.float64).cpu() for g in suspects]
    return all(bool(e.isfinite().all()) for e in extremes)


def all_finite(grads: Sequence[Tensor]) -> bool:
    """True when no gradient holds NaN or ±Inf — on every rank of the gradients' meshes.

    Sharded gradients are checked locally and the verdict is all-reduced (one 4-byte collective per
    mesh dimension), so all ranks skip or raise together and never diverge.
    """
    local = [g.to_local() if is_dtensor(g) else g for g in grads]
    finite = _local_all_finite(local)
    groups = mesh_groups(grads)
    if not groups:
        return finite
    device = next(g.to_local().device for g in grads if is_dtensor(g))
    return all_reduce_flag(finite, groups, device)


def prepare(params: list[Tensor], grads: list[Tensor], names: list[str], rule: Any, *,
            row_blocks: bool = False) -> tuple[list[Tensor], list[Tensor], Any]:
    """Local tensors for the functional layer plus how they are sharded (nothing, for plain tensors).

    ``row_blocks``: the group keeps state in blocks along rows (8-bit momentum), so the step also needs each
    shard's flat offset in its whole tensor and a max all-reduce over the shard group (element-wise rules too).
    Raises ``ValueError`` naming the parameter for a placement the rule cannot reduce exactly, for a
    gradient laid out differently from its parameter, and for one group sharded over two process groups.
    """
    from ..optim._rules import ShardInfo

    if not any(is_dtensor(p) or is_dtensor(g) for p, g in zip(params, grads)):
        return params, grads, ShardInfo()
    rows_reduced = bool(getattr(rule, "reduces_over_rows", True))
    rule_name = getattr(rule, "name", str(rule))
    layouts = []
    for param, grad, name in zip(params, grads, names):
        check_grad_layout(param, grad, name)
        layouts.append(layout_of(param, name, rows_reduced=rows_reduced, rule=rule_name) if is_dtensor(param)
                       else None)
    local_params = [p.to_local() if is_dtensor(p) else p for p in params]
    local_grads = [g.to_local() if is_dtensor(g) else g for g in grads]
    if not rows_reduced and not row_blocks:
        return local_params, local_grads, ShardInfo()  # element-wise: each shard is self-contained
    shared = common_key(layouts, names)
    if shared is None:
        return local_params, local_grads, ShardInfo()  # only replicated DTensors
    sharded = [layout is not None and layout.sharded for layout in layouts]
    global_shapes = [tuple(p.shape) for p in params]  # a DTensor's shape is the global one
    info = ShardInfo(all_reduce=make_all_reduce(shared.groups) if rows_reduced else None, sharded=sharded,
                     global_shapes=global_shapes)
    if row_blocks or getattr(rule, "gathers_whole", False):
        info.offsets = [first_flat_index(p, name) for p, name in zip(params, names)]
    if getattr(rule, "gathers_whole", False):
        info.gather = make_gather(params)
    if row_blocks:
        info.all_reduce_max = make_all_reduce(shared.groups, op="max")
    return local_params, local_grads, info


def local_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (v.to_local() if is_dtensor(v) else v) for k, v in state.items()}
