"""Optimizer-state bytes per optimizer and role, counted on the meta device (``sage-optim memory``)."""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["state_bytes_table", "human_bytes"]


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def state_bytes_table(model: Any, optimizers: Sequence[str]) -> list[dict[str, Any]]:
    """Optimizer-state bytes of each registry optimizer for ``model`` (meta device or real), total and by role.

    The count is the optimizer's own ``state_nbytes()`` and ``partition`` when it has them (computed
    from its state spec, exact before the first step); otherwise the optimizer takes one step with
    meta gradients and the state tensors it creates are summed. Roles come from
    :func:`sage_optim.routing.classify`. ``tests/test_cli.py`` checks the counts against real
    optimizers after one real step. An optional baseline whose package is missing gets a row with
    ``state_bytes`` ``None`` and a ``note`` saying why.
    """
    import torch

    from .optim.registry import create_optimizer, unavailable_reason
    from .routing import classify
    from .train.metrics import state_nbytes, tensor_nbytes

    roles = {name: str(role) for name, role in classify(model).items()}
    name_of = {id(p): n for n, p in model.named_parameters()}
    results = []
    for name in optimizers:
        reason = unavailable_reason(name)
        if reason is not None:
            results.append({"optimizer": name, "state_bytes": None, "by_role": {}, "method": None,
                            "note": f"not available: {reason}"})
            continue
        optimizer = create_optimizer(name, model)
        if hasattr(optimizer, "state_nbytes") and hasattr(optimizer, "partition"):
            method = "state_nbytes"
            per_param = {row.name: row.state_bytes for row in optimizer.partition.rows}
        else:
            method = "one step on meta tensors"
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            try:
                optimizer.step()
            finally:
                for p in model.parameters():
                    p.grad = None
            per_param = {name_of[id(p)]: tensor_nbytes(state) for p, state in optimizer.state.items()}
        by_role: dict[str, int] = {}
        for param_name, nbytes in per_param.items():
            role = roles.get(param_name, "-")
            by_role[role] = by_role.get(role, 0) + nbytes
        results.append({"optimizer": name, "state_bytes": int(state_nbytes(optimizer)), "by_role": by_role,
                        "method": method})
    return results
