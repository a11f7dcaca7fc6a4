"""Self-check for sharded training: every N steps, recompute one sharded parameter's update on the
gathered full tensors with the single-process for-loop path and compare it with what the shards did."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._collectives import is_dtensor

__all__ = ["StepVerifier", "verify_step"]


class StepVerifier:
    """Step hooks that check a sharded optimizer against its single-process definition.

    Made by :func:`verify_step`; ``remove()`` detaches it. ``checks`` counts the comparisons made and
    ``checked`` lists the parameter names, in order.
    """

    def __init__(self, optimizer: Optimizer, *, every: int, rtol: float) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1 (check every N steps), got {every!r}")
        if not (isinstance(rtol, (int, float)) and not isinstance(rtol, bool) and rtol >= 0):
            raise ValueError(f"rtol must be a number >= 0, got {rtol!r}")
        if not hasattr(optimizer, "_names") or not hasattr(optimizer, "skipped_steps"):
            raise TypeError(f"verify_step needs a sage-optim optimizer (SAGE, Lion, SinkGD, SinkSAGE), "
                            f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.every = every
        self.rtol = float(rtol)
        self.steps = 0
        self.checks = 0
        self.checked: list[str] = []
        self._pending: Optional[tuple[str, Tensor, Tensor, Tensor, int]] = None
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _candidates(self) -> list[tuple[dict[str, Any], Tensor, str]]:
        """Sharded parameters with a gradient, interleaved across groups (so successive checks visit every
        group, hence every rule, before revisiting one)."""
        per_group = []
        for group in self.optimizer.param_groups:
            names = self.optimizer._names(group)  # type: ignore[attr-defined]
            found = [(group, p, n) for n, p in zip(names, group["params"])
                     if p.grad is not None and is_dtensor(p) and any(pl.is_shard() for pl in p.placements)]
            if found:
                per_group.append(found)
        out = []
        for i in range(max((len(f) for f in per_group), default=0)):
            out.extend(found[i] for found in per_group if i < len(found))
        return out

    def _before_step(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        from ..optim._rules import RULES, ShardInfo

        self.steps += 1
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer itself
        if self.steps % self.every or closure is not None:
            return  # note: with a closure the gradients do not exist yet; nothing to check against
        candidates = self._candidates()
        if not candidates:
            return
        # Rotate through the sharded parameters; the choice depends only on the step count, so every
        # rank gathers the same tensor (the gathers are collectives).
        group, param, name = candidates[self.checks % len(candidates)]
        rule = RULES[group["rule"]]
        before = param.full_tensor()
        grad = param.grad.full_tensor()
        state = optimizer.state.get(param) or {}
        if state:
            full_state = {k: (v.full_tensor() if is_dtensor(v) else v.detach().clone()) for k, v in state.items()}
        else:  # the optimizer creates state lazily inside this step: start from the same zeros
            full_state = {k: (torch.tensor(0.0, dtype=torch.float32) if k == "step"
                              else torch.zeros(shape, dtype=dtype, device=before.device))
                          for k, (shape, dtype) in rule.state_spec(param, group).items()}
        reference = before.clone()
        # note: the for-loop path on whole tensors is the specification (SPEC §6).
        rule.step(dict(group, foreach=False, compile=False), [reference], [grad], [full_state], ShardInfo())
        self._pending = (name, param, before, reference, optimizer.skipped_steps)  # type: ignore[attr-defined]

    def _after_step(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        del args, kwargs
        if self._pending is None:
            return
        name, param, before, reference, skipped = self._pending
        self._pending = None
        if optimizer.skipped_steps != skipped:  # type: ignore[attr-defined]
            return  # a non-finite gradient skipped the step: nothing was updated
        after = param.full_tensor()
        self.checks += 1
        self.checked.append(name)
        dtype = torch.promote_types(before.dtype, torch.float32)  # fp32 unless the parameter is fp64
        err = (after.to(dtype) - reference.to(dtype)).abs_()
        update = (reference.to(dtype) - before.to(dtype)).abs_().max() if before.numel() else torch.tensor(0.0)
        # Allowed: rtol of the largest update (reduction order differs across shards) plus two rounding
        # steps of the parameter's own dtype (low-precision parameters round the same update differently).
        allowed = before.to(dtype).abs().mul_(2 * torch.finfo(before.dtype).eps).add_(self.rtol * update)
        if bool((err > allowed).any()):
            worst = int(torch.argmax(err - allowed))
            raise RuntimeError(
                f"verify_step: the sharded update of {name} at step {self.steps} differs from the single-process "
                f"update: max |difference| {float(err.max()):.3e} (at flat index {worst}), largest update "
                f"{float(update):.3e}, rtol {self.rtol:g}. The shards' reduction over dim 0 is wrong or missing "
                f"(placements {tuple(param.placements)})")


def verify_step(optimizer: Optimizer, *, every: int = 100, rtol: float = 1e-4) -> StepVerifier:
    """Check every ``every``-th step of a sharded optimizer against the single-process update.

    Registers a step pre-hook that gathers one sharded parameter, its gradient and its state
    (``full_tensor()``, rotating through the sharded parameters), runs the rule's for-loop step on the
    whole tensors, and a post-hook that gathers the parameter again and raises ``RuntimeError`` naming
    it when the sharded step differs by more than ``rtol`` of the largest update (plus two roundings of
    the parameter's dtype). Cost on a checked step: three all-gathers of one parameter (parameter and
    gradient before, parameter after) and its state, and one single-process update of it. Call it on
    every rank. Steps given a closure are not checked (their gradients do not exist before the step).

    Example:
        >>> verifier = verify_step(optimizer, every=50)  # doctest: +SKIP
        >>> ...  # train; a wrong reduction raises RuntimeError at the next checked step
        >>> verifier.remove()  # doctest: +SKIP
    """
    return StepVerifier(optimizer, every=every, rtol=rtol)
