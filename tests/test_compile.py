"""The compile=True path: equal to the for-loop in float64, and no recompiles across steps and LR changes."""
from __future__ import annotations

import pytest
import torch

import sage_optim as so

SHAPES = [(24, 8), (8,), (5, 4, 3), (1, 6), ()]


def _run(cls, kwargs, compile_, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [s for s in SHAPES if cls is not so.SinkGD or len(s) >= 2]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    opt = cls(params, **kwargs, compile=compile_)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.8**step)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
        sched.step()
    return params


@pytest.mark.parametrize("cls, kwargs", [(so.SAGE, {}), (so.SAGE, {"code_compat": True, "weight_decay": 0.3}),
                                         (so.Lion, {"lr": 1e-2}), (so.SinkGD, {"lr": 1e-2, "normalization": "sr"})],
                         ids=["SAGE", "SAGE-code_compat", "Lion", "SinkGD-sr"])
def test_compiled_path_matches_the_for_loop_in_float64(cls, kwargs):
    for eager, compiled in zip(_run(cls, kwargs, False), _run(cls, kwargs, True)):
        torch.testing.assert_close(compiled, eager, atol=1e-12, rtol=0)


def test_no_recompiles_after_the_first_step_even_when_the_lr_changes():
    from torch._dynamo.utils import counters

    params = [torch.nn.Parameter(torch.randn(s)) for s in [(16, 8), (8,), (3, 4, 5)]]
    opt = so.SAGE(params, compile=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    frames_after_first_step = counters["stats"]["unique_graphs"]
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    assert counters["stats"]["unique_graphs"] == frames_after_first_step
    assert opt.param_groups[0]["lr"] != 2e-3  # the schedule really changed the lr
