"""The table of optimizers under test: every generic test iterates over it (torch's optim_db)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import sage_optim as so


@dataclass(frozen=True)
class OptimizerInput:
    kwargs: dict[str, Any]
    desc: str


@dataclass(frozen=True)
class ErrorInput:
    kwargs: dict[str, Any]
    error_type: type[BaseException]
    error_regex: str
    desc: str
    params: str = "matrix"  # which params to build with: "matrix", "vector", "complex"


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    #: builds the optimizer from (params or param-groups, kwargs)
    make: Callable[..., torch.optim.Optimizer]
    inputs: list[OptimizerInput]
    error_inputs: list[ErrorInput] = field(default_factory=list)
    matrices_only: bool = False

    def __str__(self) -> str:
        return self.name


def _hybrid(params: Any, **kw: Any) -> torch.optim.Optimizer:
    """SinkSAGE from plain params: matrices → sinkgd, vectors → sage, like its default routing."""
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim >= 2], "rule": "sinkgd", "role": "hidden"},
              {"params": [p for p in params if p.ndim < 2], "rule": "sage", "role": "vector"}]
    return so.SinkSAGE([g for g in groups if g["params"]], **kw)


_COMMON_ERRORS = [
    ErrorInput({"lr": -1.0}, ValueError, r"Invalid learning rate lr: -1\.0", "negative lr"),
    ErrorInput({"lr": float("nan")}, ValueError, r"Invalid learning rate lr: nan", "nan lr"),
    ErrorInput({"weight_decay": -0.1}, ValueError, r"Invalid weight_decay: -0\.1", "negative weight decay"),
    ErrorInput({"nonfinite": "ignore"}, ValueError, r"nonfinite must be one of \['raise', 'skip'\]", "bad policy"),
    ErrorInput({"foreach": "yes"}, TypeError, r"foreach must be None, True or False", "foreach not bool"),
    ErrorInput({}, TypeError, r"supports real floating-point parameters only", "complex parameter", params="complex"),
]
_SIGN_ERRORS = [
    ErrorInput({"betas": (1.0, 0.99)}, ValueError, r"Invalid beta parameter at index 0: 1\.0", "beta1 = 1"),
    ErrorInput({"betas": (0.9, -0.1)}, ValueError, r"Invalid beta parameter at index 1: -0\.1", "negative beta2"),
    ErrorInput({"betas": (0.9,)}, ValueError, r"betas must be a pair", "one beta"),
    ErrorInput({"state_dtype": torch.int16}, ValueError, r"state_dtype must be None", "integer state dtype"),
]
_EPS_ERRORS = [ErrorInput({"eps": -1e-8}, ValueError, r"Invalid epsilon value eps: -1e-08", "negative eps")]
_SINK_ERRORS = [
    ErrorInput({"iters": 0}, ValueError, r"Invalid iters: 0.*iters >= 1", "zero iters"),
    ErrorInput({"iters": 2.5}, ValueError, r"Invalid iters: 2\.5", "fractional iters"),
    ErrorInput({"normalization": "l1"}, ValueError, r"Invalid normalization: 'l1'.*\['uniform', 'sr'\]", "unknown normalization"),
    ErrorInput({"scale": 0.0}, ValueError, r"Invalid scale: 0\.0", "zero scale"),
    ErrorInput({}, ValueError, r"SinkGD needs parameters with ndim >= 2, but .* has shape \(5,\)", "vector", params="vector"),
]

OPTIMIZERS: list[OptimizerInfo] = [
    OptimizerInfo(
        "SAGE", lambda p, **kw: so.SAGE(p, **kw),
        [OptimizerInput({}, "defaults"),
         OptimizerInput({"weight_decay": 0.1, "lr": 1e-2}, "weight decay"),
         OptimizerInput({"code_compat": True}, "released-code order"),
         OptimizerInput({"instant_damper": False}, "no instantaneous damper"),
         OptimizerInput({"maximize": True}, "maximize"),
         OptimizerInput({"betas": (0.0, 0.5), "eps": 0.0}, "extreme betas, eps 0")],
        _COMMON_ERRORS + _SIGN_ERRORS + _EPS_ERRORS),
    OptimizerInfo(
        "Lion", lambda p, **kw: so.Lion(p, **kw),
        [OptimizerInput({}, "defaults"), OptimizerInput({"weight_decay": 0.5, "lr": 1e-3}, "weight decay"),
         OptimizerInput({"maximize": True}, "maximize")],
        _COMMON_ERRORS + _SIGN_ERRORS),
    OptimizerInfo(
        "SinkGD", lambda p, **kw: so.SinkGD(p, **{"lr": 1e-2, **kw}),
        [OptimizerInput({}, "defaults"), OptimizerInput({"normalization": "sr", "scale": 0.1}, "sr convention"),
         OptimizerInput({"iters": 1, "weight_decay": 0.0}, "one iteration"),
         OptimizerInput({"maximize": True}, "maximize")],
        _COMMON_ERRORS + _SINK_ERRORS, matrices_only=True),
    OptimizerInfo(
        "SinkSAGE", _hybrid,
        [OptimizerInput({}, "defaults"), OptimizerInput({"normalization": "sr", "sinkgd_scale": 1.0}, "sr"),
         OptimizerInput({"code_compat": True, "weight_decay": 0.0}, "released-code order")],
        [e for e in _COMMON_ERRORS if e.params != "complex"] + _SIGN_ERRORS + _EPS_ERRORS),
]


def ids(items: list[Any]) -> list[str]:
    return [str(i) for i in items]


def all_inputs() -> list[tuple[OptimizerInfo, OptimizerInput]]:
    return [(info, inp) for info in OPTIMIZERS for inp in info.inputs]


def input_id(pair: tuple[OptimizerInfo, OptimizerInput]) -> str:
    return f"{pair[0].name}-{re.sub(r'[^a-z0-9]+', '_', pair[1].desc)}"


def all_error_inputs() -> list[tuple[OptimizerInfo, ErrorInput]]:
    return [(info, e) for info in OPTIMIZERS for e in info.error_inputs]
