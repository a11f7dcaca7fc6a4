"""Every collective the optimizers need lives here; update rules never import torch.distributed.

Single-process and DDP parameters are plain tensors: nothing to reduce. FSDP2 / DTensor support
(``Shard(0)``) plugs in through :func:`prepare`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..functional._common import AllReduceSum  # noqa: F401  (re-exported type)

__all__ = ["prepare", "local_state", "local_device", "is_dtensor", "all_finite", "default_foreach"]


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local_device(t: Tensor) -> torch.device:
    return t.to_local().device if is_dtensor(t) else t.device


def default_foreach(params: Sequence[Tensor]) -> bool:
    """torch.optim's rule: batch with foreach ops when every tensor is on a CUDA device."""
    return bool(params) and all(local_device(p).type == "cuda" for p in params)


def all_finite(grads: Sequence[Tensor]) -> bool:
    """True when no gradient holds NaN or ±Inf (one max-norm reduction per tensor, no full-size temporaries)."""
    if any(is_dtensor(g) for g in grads):
        raise NotImplementedError("DTensor (FSDP2) parameters are not supported yet: see issue #7")
    # note: aminmax propagates NaN and keeps ±Inf, reads each gradient once and allocates nothing
    # full-size (an ∞-norm or isfinite() is ~10× slower on CPU).
    extremes = [torch.stack(torch.aminmax(g.reshape(-1))).to(torch.float32) for g in grads if g.numel() > 0]
    if not extremes:
        return True
    return bool(torch.cat([e.cpu() for e in extremes]).isfinite().all())


def prepare(params: list[Tensor], grads: list[Tensor], names: list[str], rule: Any) -> tuple[list[Tensor], list[Tensor], Any]:
    """Local tensors for the functional layer plus how they are sharded (nothing, for plain tensors)."""
    from ..optim._rules import ShardInfo

    if any(is_dtensor(p) for p in params):
        raise NotImplementedError("DTensor (FSDP2) parameters are not supported yet: see issue #7")
    return params, grads, ShardInfo()


def local_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (v.to_local() if is_dtensor(v) else v) for k, v in state.items()}
