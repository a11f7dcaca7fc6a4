"""Distributed checkpoints (``torch.distributed.checkpoint``) of sage-optim optimizers.

``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` work unchanged: state tensors of sharded
parameters are DTensors laid out like their parameter (``exp_avg``; ``col_ema`` of vectors), the
matrices' ``col_ema`` is a plain replicated vector, ``step`` a 0-D CPU tensor, and the param groups'
``role``/``rule``/``param_names``/``state_dtype`` are plain strings (lists, None) that DCP stores as
bytes. Loading goes through the optimizer's ``load_state_dict``, so a different partition is refused
and ``state_dtype`` is kept. Checkpoints reshard freely (saved on 2 ranks, loaded on 1, and back).

One trap: on an optimizer that has no state yet, ``get_optimizer_state_dict`` creates it by calling
``step()`` with zero gradients and ``lr = 0``. That step still counts (``step`` becomes 1), and a
SinkGD matrix with an all-zero gradient is normalised by 1/ε per iteration, which overflows float32
to NaN and ``0 · NaN`` reaches the parameter. :func:`init_optimizer_state` creates the state without
a step; call it on a fresh optimizer before ``get_optimizer_state_dict`` (for a step-0 save, or to
load a checkpoint into a new optimizer).
"""
from __future__ import annotations

from torch.optim import Optimizer

__all__ = ["init_optimizer_state"]


def init_optimizer_state(optimizer: Optimizer) -> None:
    """Create every parameter's state as the first step would (zeros, ``step`` 0), without stepping.

    Idempotent: existing state is kept. Safe on every rank (no collective).

    Example:
        >>> opt = SinkSAGE(model)  # doctest: +SKIP
        >>> init_optimizer_state(opt)  # doctest: +SKIP
        >>> state = {"optim": get_optimizer_state_dict(model, opt)}  # no zero-gradient step  # doctest: +SKIP
    """
    from ..optim._rules import RULES

    init = getattr(optimizer, "_init_state", None)
    if init is None:
        raise TypeError(f"init_optimizer_state needs a sage-optim optimizer, got {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        rule = RULES[group["rule"]]
        for param in group["params"]:
            init(param, rule.state_spec(param, group))
