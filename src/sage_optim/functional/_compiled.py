"""``torch.compile`` versions of the element-wise kernels (the ``compile=True`` path).

Hyperparameters enter as 0-D CPU tensors so LR schedules cause no recompiles (modded-nanogpt's
rule); shapes are marked dynamic after the first recompile. The compiled kernel reads θ, g, m and H
once and writes θ and m once, with no full-size temporaries. Tested against the for-loop path.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from ._common import as_rows


def _sage_elementwise(param: Tensor, grad: Tensor, exp_avg: Tensor, damper: Tensor, lr: Tensor,
                      weight_decay: Tensor, beta1: Tensor, beta2: Tensor, code_compat: bool) -> None:
    param.mul_(1 - lr * weight_decay)
    g = grad.to(exp_avg.dtype) if exp_avg.dtype == torch.float64 else grad.float()
    m = exp_avg.to(g.dtype)
    if code_compat:
        m = beta2 * m + (1 - beta2) * g
        direction = torch.sign(beta1 * m + (1 - beta1) * g)
    else:
        direction = torch.sign(beta1 * m + (1 - beta1) * g)
        m = beta2 * m + (1 - beta2) * g
    exp_avg.copy_(m)
    param.sub_((lr * direction * damper).to(param.dtype))


def _sinkgd_apply(param: Tensor, grad: Tensor, grad_scale: Tensor, rows: Tensor, cols: Tensor, lr: Tensor,
                  weight_decay: Tensor, step_scale: Tensor) -> None:
    x = rows.unsqueeze(-1) * (grad / grad_scale) * cols.unsqueeze(0)
    param.mul_(1 - lr * weight_decay)
    param.sub_((lr * step_scale * x).to(param.dtype))


#: Graphs a kernel may hold: sizes are dynamic, but sizes 0/1 specialise, and flags/dtypes guard.
RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=None)
def _compiled(name: str, variant: tuple) -> Callable[..., None]:
    # note: tensors arrive as 2-D views so rank never changes; the variant (flags, dtypes) only keys
    # this cache — dynamo's own graph cache lives on the code object and is bounded by RECOMPILE_LIMIT.
    del variant
    fn = {"sage": _sage_elementwise, "sinkgd": _sinkgd_apply}[name]
    compiled_fn = torch.compile(fn, fullgraph=True, dynamic=True)

    def call(*args: object) -> None:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            compiled_fn(*args)

    return call


def sage_update(param: Tensor, grad: Tensor, exp_avg: Tensor, damper: Optional[Tensor], *, lr: float,
                weight_decay: float, beta1: float, beta2: float, code_compat: bool) -> None:
    """The compiled element-wise SAGE/Lion update of one tensor (``damper=None``: Lion)."""
    rows = as_rows(param)
    h = damper.reshape(-1) if damper is not None else torch.ones(rows.shape[1], dtype=grad.dtype, device=grad.device)
    kernel = _compiled("sage", (code_compat, param.dtype, exp_avg.dtype, grad.dtype))
    kernel(rows, as_rows(grad), as_rows(exp_avg), h, *[scalar(v, grad) for v in (lr, weight_decay, beta1, beta2)],
           code_compat)


def sinkgd_update(param: Tensor, grad: Tensor, grad_scale: Tensor, rows: Tensor, cols: Tensor, *, lr: float,
                  weight_decay: float, step_scale: float) -> None:
    """The compiled θ ← θ·(1 − ηλ) − η·scale·diag(r)·(G/s)·diag(c) of one matrix."""
    kernel = _compiled("sinkgd", (param.dtype, grad.dtype, rows.dtype))
    kernel(as_rows(param), as_rows(grad), grad_scale, rows, cols,
           *[scalar(v, rows) for v in (lr, weight_decay, step_scale)])


def scalar(value: float, like: Tensor) -> Tensor:
    """A 0-D CPU tensor (float64 for float64 work, else float32): a value that must not trigger recompiles."""
    return torch.tensor(value, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)
