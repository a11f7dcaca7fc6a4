"""Placement analysis and the batched all-reduce behind FSDP2 / DTensor support.

The only cross-shard quantities the rules need are sums over dim 0 (SAGE's column |g| sums and the
two sums of squares behind σ and γ; SinkGD's column statistics). Each is a short vector, so a whole
group's statistics travel in one flat buffer: one collective per group (SAGE) or per Sinkhorn
iteration of a same-shape chunk (SinkGD), whatever the number of parameters.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..functional._common import AllReduceSum

__all__ = ["Collective", "record_collectives", "ShardLayout", "layout_of", "make_all_reduce", "all_reduce_flag",
           "first_flat_index", "make_gather"]


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


# ---------------------------------------------------------------------------------------- accounting
@dataclass(frozen=True)
class Collective:
    """One collective this module issued: its kind, element count, dtype and payload bytes."""

    op: str
    numel: int
    dtype: torch.dtype
    group: str

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


_RECORDERS: list[list[Collective]] = []


@contextlib.contextmanager
def record_collectives() -> Iterator[list[Collective]]:
    """Collect every collective the optimizers issue inside the block (for tests and cost accounting).

    Example:
        >>> with record_collectives() as log:  # doctest: +SKIP
        ...     optimizer.step()
        >>> sum(c.nbytes for c in log)  # doctest: +SKIP
    """
    log: list[Collective] = []
    _RECORDERS.append(log)
    try:
        yield log
    finally:
        _RECORDERS.remove(log)


def _record(op: str, tensor: Tensor, group: Any) -> None:
    if _RECORDERS:
        entry = Collective(op, tensor.numel(), tensor.dtype, _group_name(group))
        for log in _RECORDERS:
            log.append(entry)


def _group_name(group: Any) -> str:
    name = getattr(group, "group_name", None)
    return str(name) if name is not None else repr(group)


def _all_reduce(tensor: Tensor, group: Any, op: Any = None) -> None:
    """The one place a tensor is all-reduced (tests monkeypatch this to prove a skipped reduction is caught)."""
    import torch.distributed as dist

    _record("all_reduce", tensor, group)
    dist.all_reduce(tensor, op=op if op is not None else dist.ReduceOp.SUM, group=group)


# ---------------------------------------------------------------------------------------- placements
@dataclass(frozen=True)
class ShardLayout:
    """How one DTensor is laid out: the process groups that split its dim 0 (empty when replicated)."""

    groups: tuple[Any, ...]
    key: tuple[str, ...]

    @property
    def sharded(self) -> bool:
        return bool(self.groups)


def layout_of(t: Tensor, name: str, *, rows_reduced: bool, rule: str) -> ShardLayout:
    """Check ``t``'s placements and return the groups its dim 0 is split over.

    ``rows_reduced``: the rule reduces over dim 0 (SAGE, SinkGD), so only ``Replicate`` and ``Shard(0)``
    are exact; element-wise rules (Lion, AdamW) also accept any other ``Shard(k)``. ``Partial`` (an
    unreduced sum) is never a valid parameter or gradient placement.
    """
    from torch.distributed.tensor import Replicate, Shard

    mesh = t.device_mesh
    groups, key = [], []
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate):
            continue
        plain_shard = type(placement) is Shard
        if plain_shard and placement.dim in (0, -t.ndim) and t.ndim > 0:
            group = mesh.get_group(mesh_dim)
            groups.append(group)
            key.append(_group_name(group))
            continue
        if plain_shard and not rows_reduced:
            continue  # element-wise rule: the local block is all it needs
        if not rows_reduced:
            raise ValueError(f"{name} has placements {tuple(t.placements)}; rule {rule!r} needs Replicate or Shard "
                             f"placements, and {placement} is not one (a Partial tensor is an unreduced sum: "
                             "redistribute it to Replicate or Shard first)")
        raise ValueError(
            f"{name} has placements {tuple(t.placements)} on mesh {tuple(mesh.shape)}; rule {rule!r} is only "
            f"correct for Replicate or Shard(0) placements (FSDP2's dim-0 sharding). Tensor-parallel layouts such "
            f"as {placement} would make the reductions over dim 0 silently wrong, so they are refused: shard this "
            "parameter with fully_shard only, or route it to an element-wise rule (lion, adamw)")
    return ShardLayout(tuple(groups), tuple(key))


def first_flat_index(t: Tensor, name: str) -> int:
    """The flat index, in the whole tensor, of the first element of ``t``'s local shard (0 for plain tensors).

    Only for layouts whose shards hold whole rows (``Replicate``, ``Shard(0)``); any other split is refused
    with ``ValueError`` naming the parameter."""
    if not is_dtensor(t):
        return 0
    local_shape, offset = _local_shape_and_offset(tuple(t.shape), t.device_mesh, tuple(t.placements))
    if t.ndim >= 2 and tuple(local_shape[1:]) != tuple(t.shape[1:]):
        raise ValueError(f"{name} has placements {tuple(t.placements)}: its shards split rows, but an 8-bit "
                         "momentum is kept in blocks along rows and needs whole rows on every shard. Shard it "
                         "on dim 0 only (fully_shard), or give it state_dtype=torch.bfloat16")
    return int(offset[0]) * math.prod(t.shape[1:]) if t.ndim else 0


@functools.lru_cache(maxsize=4096)
def _local_shape_and_offset(shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...]
                            ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # The answer depends only on the layout and this rank's place in the mesh, both fixed for a run, while
    # DTensor recomputes it in Python (~55 µs on the 2-core CPU; 3 µs cached). Cached, an int8 or Muon group
    # pays it once per layout instead of once per parameter per step.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return tuple(local_shape), tuple(offset)


def make_gather(params: Sequence[Tensor]) -> Callable[[int, Tensor], Tensor]:
    """``gather(i, local)``: the whole tensor whose shard, laid out as parameter ``i``, is ``local`` (plain
    parameters: ``local`` itself). DTensor's own redistribution does it, so uneven and empty shards and
    2-D meshes need nothing special; recorded as one ``all_gather`` of the whole tensor."""
    def gather(i: int, local: Tensor) -> Tensor:
        param = params[i]
        if not is_dtensor(param):
            return local
        from torch.distributed.tensor import DTensor

        whole = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                   shape=param.shape, stride=param.stride()).full_tensor()
        _record("all_gather", whole, param.device_mesh)
        return whole

    return gather


def check_grad_layout(param: Tensor, grad: Tensor, name: str) -> None:
    """The gradient must be laid out as its parameter (FSDP2 guarantees it; hand-set gradients may not)."""
    if is_dtensor(param) != is_dtensor(grad):
        kinds = ("a DTensor" if is_dtensor(param) else "a plain tensor", "a DTensor" if is_dtensor(grad) else
                 "a plain tensor")
        raise ValueError(f"{name} is {kinds[0]} but its gradient is {kinds[1]}; set .grad with the parameter's "
                         "layout (e.g. distribute_tensor(g, param.device_mesh, param.placements))")
    if is_dtensor(param) and (tuple(grad.placements) != tuple(param.placements)
                              or grad.device_mesh != param.device_mesh):
        raise ValueError(f"{name} has placements {tuple(param.placements)} but its gradient has "
                         f"{tuple(grad.placements)}; redistribute the gradient to the parameter's placements "
                         "before stepping")


# ---------------------------------------------------------------------------------------- reductions
def make_all_reduce(groups: Sequence[Any], op: str = "sum") -> AllReduceSum:
    """An ``AllReduceSum`` over ``groups`` (several only for a dim 0 split over several mesh dims); with
    ``op="max"`` it takes the element-wise maximum instead of the sum.

    The listed tensors are packed into one flat buffer per dtype, reduced in one collective per group,
    and copied back in place; a single contiguous tensor is reduced where it lies.
    """
    import torch.distributed as dist

    groups = tuple(groups)
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    reduce_op = dist.ReduceOp.MAX if op == "max" else None  # None: _all_reduce's default, the sum

    def all_reduce_sum(tensors: list[Tensor]) -> None:
        by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for t in tensors:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        for same in by_kind.values():
            if len(same) == 1 and same[0].is_contiguous():
                flat = same[0]
            else:
                flat = torch.cat([t.reshape(-1) for t in same])
            for group in groups:
                _all_reduce(flat, group, reduce_op)
            if flat is same[0] and len(same) == 1:
                continue
            offset = 0
            for t in same:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    all_reduce_sum.groups = groups  # type: ignore[attr-defined]
    return all_reduce_sum


def mesh_groups(tensors: Sequence[Tensor]) -> list[Any]:
    """Every process group of every DTensor's mesh, first-seen order, each once (same order on all ranks)."""
    seen: dict[str, Any] = {}
    for t in tensors:
        if not is_dtensor(t):
            continue
        mesh = t.device_mesh
        for mesh_dim in range(mesh.ndim):
            group = mesh.get_group(mesh_dim)
            seen.setdefault(_group_name(group), group)
    return list(seen.values())


def all_reduce_flag(flag: bool, groups: Sequence[Any], device: torch.device) -> bool:
    """True on every rank only when ``flag`` is True on every rank of ``groups`` (a logical AND)."""
    bad = torch.tensor([0.0 if flag else 1.0], device=device)
    import torch.distributed as dist

    for group in groups:
        _all_reduce(bad, group, dist.ReduceOp.MAX)
    return bool(bad.item() == 0.0)


def common_key(layouts: Sequence[Optional[ShardLayout]], names: Sequence[str]) -> Optional[ShardLayout]:
    """The one layout every sharded tensor of a group shares (one collective serves them all)."""
    chosen: Optional[ShardLayout] = None
    chosen_name = ""
    for layout, name in zip(layouts, names):
        if layout is None or not layout.sharded:
            continue
        if chosen is None:
            chosen, chosen_name = layout, name
        elif layout.key != chosen.key:
            raise ValueError(f"{name} is sharded over process groups {layout.key} but {chosen_name} over "
                             f"{chosen.key}; parameters of one param group must share one shard group (put "
                             "them in separate param groups, or shard them with the same device mesh)")
    return chosen
