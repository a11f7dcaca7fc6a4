"""The update rules an optimizer group can carry (``group["rule"]``), each defined once.

A rule knows which hyperparameters it reads, how to validate them, what state it keeps per
parameter (a spec, so memory can be counted before any step) and how to step a group by calling
the functional layer. The Optimizer classes only validate, create state and dispatch here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import functional as F
from ..functional._common import AllReduceSum

__all__ = ["Rule", "RULES", "StateSpec", "resolve_state_dtype"]

#: key -> (shape, dtype) of one parameter's state.
StateSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]

_STEP_SPEC = ((), torch.float32)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
           "int8": torch.int8}
#: Rules whose momentum may be 8-bit block-quantised (functional/_quant.py): sign updates, where only
#: the direction's sign is used, so the rounding noise of an unbiased 8-bit code matters least.
_INT8_RULES = ("sage", "lion")


def resolve_state_dtype(param: Tensor, state_dtype: Optional[str]) -> torch.dtype:
    """Momentum dtype: the explicit ``state_dtype``, else fp32 for bf16/fp16 params, else the param's dtype."""
    if state_dtype is not None:
        return _DTYPES[state_dtype]
    if param.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return param.dtype


def _vector_dtype(param: Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _col_shape(param: Tensor) -> tuple[int, ...]:
    return tuple(param.shape[1:]) if param.ndim >= 2 else tuple(param.shape)


# ---------------------------------------------------------------------------------------- validation
def _check_nonneg(name: str, value: Any, group: dict[str, Any], fix: str) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar; got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r}){_where(group)}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r}{_where(group)}; {fix}")


def _where(group: dict[str, Any]) -> str:
    role = group.get("role")
    return f" in the {role!r} group" if role else ""


def _check_betas(group: dict[str, Any], count: int = 2) -> None:
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}{_where(group)}")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {beta!r}{_where(group)}; "
                             "each beta must be in [0, 1), e.g. betas=(0.9, 0.99)")


def _check_common(group: dict[str, Any]) -> None:
    _check_nonneg("learning rate lr", group["lr"], group, "use lr >= 0, e.g. lr=2e-3")
    _check_nonneg("weight_decay", group["weight_decay"], group, "use weight_decay >= 0, e.g. 0.01")


def _check_eps(group: dict[str, Any]) -> None:
    _check_nonneg("epsilon value eps", group["eps"], group, "use eps >= 0, e.g. eps=1e-8")


def _check_state_dtype(group: dict[str, Any]) -> None:
    value = group.get("state_dtype")
    if value == "float16":
        raise ValueError(f"state_dtype float16 is refused{_where(group)}: momentum beyond 65504 would overflow "
                         "to inf; use bfloat16 (same size, float32's range)")
    if value is not None and value not in _DTYPES:
        raise ValueError(f"state_dtype must be None or one of {list(_DTYPES)}, got {value!r}{_where(group)}")


def _check_flags(group: dict[str, Any], *names: str) -> None:
    for name in names:
        if name in group and not isinstance(group[name], bool):
            raise TypeError(f"{name} must be True or False, got {group[name]!r}{_where(group)}")


def _validate_lion(group: dict[str, Any]) -> None:
    _check_common(group)
    _check_betas(group)
    _check_state_dtype(group)


def _validate_sign_rule(group: dict[str, Any]) -> None:
    _validate_lion(group)
    _check_eps(group)
    _check_flags(group, "code_compat", "instant_damper")


def _refuse_int8(group: dict[str, Any]) -> None:
    if group.get("state_dtype") == "int8":
        raise ValueError(f"state_dtype int8 is for the sign rules {list(_INT8_RULES)}{_where(group)}: this rule "
                         "uses its state's values, not a sign; use bfloat16 or float32")


def _validate_adamw(group: dict[str, Any]) -> None:
    _validate_sign_rule(group)
    _refuse_int8(group)


def _validate_sinkgd(group: dict[str, Any]) -> None:
    _check_common(group)
    _check_eps(group)
    iters = group["iters"]
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"Invalid iters: {iters!r}{_where(group)}; SinkGD needs an integer iters >= 1 (default 5)")
    scale = group["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"Invalid scale: {scale!r}{_where(group)}; use a finite scale > 0 (e.g. 10.0)")
    if group["normalization"] not in F.NORMALIZATIONS:
        raise ValueError(f"Invalid normalization: {group['normalization']!r}{_where(group)}; "
                         f"choose one of {list(F.NORMALIZATIONS)}")


def _param_check_matrix(name: str, param: Tensor, group: dict[str, Any]) -> None:
    if param.ndim < 2:
        raise ValueError(f"SinkGD needs parameters with ndim >= 2, but {name} has shape {tuple(param.shape)}{_where(group)}; "
                         "route vectors to another rule (e.g. SinkSAGE sends them to SAGE)")


def _param_ok(name: str, param: Tensor, group: dict[str, Any]) -> None:
    del name, param, group


def _check_sign_param(name: str, param: Tensor, group: dict[str, Any]) -> None:
    if group.get("state_dtype") == "int8":  # 8-bit blocks run along rows: shards must hold whole rows
        from ..distributed import first_flat_index

        first_flat_index(param, name)


# ---------------------------------------------------------------------------------------- specs
def _momentum_spec(param: Tensor, group: dict[str, Any]) -> StateSpec:
    dtype = resolve_state_dtype(param, group.get("state_dtype"))
    spec: StateSpec = {"step": _STEP_SPEC, "exp_avg": (tuple(param.shape), dtype)}
    if dtype == torch.int8:  # codes + per-block maxima + the stochastic rounding's seed (functional/_quant.py)
        from ..functional._quant import absmax_shape

        spec["exp_avg_absmax"] = (absmax_shape(param.shape), torch.float32)
        spec["exp_avg_seed"] = ((), torch.int64)
    return spec


def _sage_spec(param: Tensor, group: dict[str, Any]) -> StateSpec:
    return {**_momentum_spec(param, group), "col_ema": (_col_shape(param), _vector_dtype(param))}


def _lion_spec(param: Tensor, group: dict[str, Any]) -> StateSpec:
    return _momentum_spec(param, group)


def _adamw_spec(param: Tensor, group: dict[str, Any]) -> StateSpec:
    dtype = resolve_state_dtype(param, group.get("state_dtype"))
    return {"step": _STEP_SPEC, "exp_avg": (tuple(param.shape), dtype), "exp_avg_sq": (tuple(param.shape), dtype)}


def _no_state(param: Tensor, group: dict[str, Any]) -> StateSpec:
    del param, group
    return {}


# ---------------------------------------------------------------------------------------- steps
@dataclass
class ShardInfo:
    """How a group's parameters are sharded (filled by the Optimizer; all-False when nothing is)."""

    all_reduce: Optional[AllReduceSum] = None
    sharded: Optional[list[bool]] = None
    global_shapes: Optional[list[tuple[int, ...]]] = None
    #: Each local tensor's first element's flat index in its whole tensor (8-bit momentum rounds by it; Muon
    #: takes its rows from it), the whole tensor of parameter i's shard (``gather(i, local)``, a collective),
    #: and with an 8-bit momentum the element-wise max over the shard group (a vector's blocks span ranks).
    offsets: Optional[list[int]] = None
    gather: Optional[Callable[[int, Tensor], Tensor]] = None
    all_reduce_max: Optional[AllReduceSum] = None


def _step_sign(group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
               shards: ShardInfo, *, damper: bool, first_pass: Optional[list[Any]] = None) -> None:
    beta1, beta2 = group["betas"]
    F.sage(params, grads, [s["exp_avg"] for s in states], [s.get("col_ema") for s in states],
           [s["step"] for s in states], lr=_float(group["lr"]), beta1=beta1, beta2=beta2,
           eps=group.get("eps", 0.0), weight_decay=group["weight_decay"], damper=damper,
           instant_damper=group.get("instant_damper", True), code_compat=group.get("code_compat", False),
           maximize=group.get("maximize", False), foreach=bool(group.get("foreach")),
           all_reduce=shards.all_reduce, sharded=shards.sharded, global_shapes=shards.global_shapes,
           compiled=bool(group.get("compile")), fused=bool(group.get("fused")), column_means=first_pass,
           quantized=[(s["exp_avg_absmax"], s["exp_avg_seed"]) if "exp_avg_seed" in s else None for s in states],
           shard_offsets=shards.offsets, all_reduce_max=shards.all_reduce_max)


def _step_sage(group, params, grads, states, shards, first_pass=None) -> None:  # type: ignore[no-untyped-def]
    _step_sign(group, params, grads, states, shards, damper=True, first_pass=first_pass)


def _step_lion(group, params, grads, states, shards, first_pass=None) -> None:  # type: ignore[no-untyped-def]
    del first_pass  # Lion reads g once, in its update: nothing to read first
    _step_sign(group, params, grads, states, shards, damper=False)


def _step_sinkgd(group, params, grads, states, shards, first_pass=None) -> None:  # type: ignore[no-untyped-def]
    del states
    F.sinkgd(params, grads, lr=_float(group["lr"]), weight_decay=group["weight_decay"], iters=group["iters"],
             scale=group["scale"], normalization=group["normalization"], eps=group["eps"],
             maximize=group.get("maximize", False), foreach=bool(group.get("foreach")),
             all_reduce=shards.all_reduce, sharded=shards.sharded, global_shapes=shards.global_shapes,
             compiled=bool(group.get("compile")), fused=bool(group.get("fused")), grad_maxima=first_pass)


def _first_pass_sage(grads: list[Tensor]) -> list[Optional[Tensor]]:
    from ..functional.sage import first_pass_column_sums

    return first_pass_column_sums(grads)


def _first_pass_sinkgd(grads: list[Tensor]) -> list[Optional[float]]:
    from ..functional.sinkgd import first_pass_maxima

    return first_pass_maxima(grads)


def _step_adamw(group, params, grads, states, shards, first_pass=None) -> None:  # type: ignore[no-untyped-def]
    del shards, first_pass  # element-wise: sharding needs no communication
    from torch.optim.adam import adam

    beta1, beta2 = group["betas"]
    exp_avgs = [s["exp_avg"] for s in states]
    # note: torch's Adam wants grads in the state's dtype; fp32 state for bf16 params widens them here.
    grads = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    mixed = any(p.dtype != m.dtype for p, m in zip(params, exp_avgs))
    adam(params, grads, exp_avgs, [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
         foreach=bool(group.get("foreach")) and not mixed, decoupled_weight_decay=True, amsgrad=False,
         beta1=beta1, beta2=beta2, lr=_float(group["lr"]), weight_decay=group["weight_decay"], eps=group["eps"],
         maximize=group.get("maximize", False))


def _validate_muon(group: dict[str, Any]) -> None:
    if not hasattr(torch.optim, "Muon"):
        raise ValueError(f"rule 'muon' needs torch.optim.Muon (torch >= 2.9); this torch {torch.__version__} "
                         "has none: pick another rule")
    _check_common(group)
    _check_eps(group)
    momentum = group["momentum"]
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum: {momentum!r}{_where(group)}; use a value in [0, 1), e.g. 0.95")
    _check_flags(group, "nesterov")
    _refuse_int8(group)
    if group["adjust_lr_fn"] not in (None, "original", "match_rms_adamw"):
        raise ValueError(f"Invalid adjust_lr_fn: {group['adjust_lr_fn']!r}{_where(group)}; "
                         "choose None, 'original' or 'match_rms_adamw'")
    _check_state_dtype(group)


def _param_check_2d(name: str, param: Tensor, group: dict[str, Any]) -> None:
    if param.ndim != 2:
        raise ValueError(f"Muon needs 2-D parameters, but {name} has shape {tuple(param.shape)}{_where(group)}; "
                         "route it to another rule")


def _muon_spec(param: Tensor, group: dict[str, Any]) -> StateSpec:
    return {"momentum_buffer": (tuple(param.shape), resolve_state_dtype(param, group.get("state_dtype")))}


def _step_muon(group, params, grads, states, shards, first_pass=None) -> None:  # type: ignore[no-untyped-def]
    from torch.optim._muon import muon

    from ..functional.muon import muon_shard_

    del first_pass
    buffers = [s["momentum_buffer"] for s in states]
    grads = [g.to(b.dtype) for g, b in zip(grads, buffers)]
    if group.get("maximize", False):
        grads = [-g for g in grads]
    hparams = dict(lr=_float(group["lr"]), weight_decay=group["weight_decay"], momentum=group["momentum"],
                   nesterov=group["nesterov"], ns_coefficients=(3.4445, -4.775, 2.0315), ns_steps=5,
                   eps=group["eps"], adjust_lr_fn=group["adjust_lr_fn"])
    sharded = shards.sharded if shards.sharded is not None else [False] * len(params)
    whole = [i for i, is_sharded in enumerate(sharded) if not is_sharded]
    if whole:
        muon([params[i] for i in whole], [grads[i] for i in whole], [buffers[i] for i in whole],
             has_complex=False, **hparams)
    for i in (i for i, is_sharded in enumerate(sharded) if is_sharded):  # Newton-Schulz needs the whole matrix
        shape = shards.global_shapes[i]
        muon_shard_(params[i], grads[i], buffers[i], gather=lambda local, i=i: shards.gather(i, local),
                    first_row=shards.offsets[i] // max(shape[1], 1), global_shape=shape, **hparams)


def _float(value: Any) -> float:
    return value.item() if isinstance(value, Tensor) else float(value)


@dataclass(frozen=True)
class Rule:
    """One update rule: its hyperparameters with defaults, validation, state spec and step."""

    name: str
    defaults: dict[str, Any]
    validate: Callable[[dict[str, Any]], None]
    check_param: Callable[[str, Tensor, dict[str, Any]], None]
    state_spec: Callable[[Tensor, dict[str, Any]], StateSpec]
    step: Callable[..., None]
    """``step(group, params, grads, states, shards, first_pass=None)``: one update of the group's tensors."""
    #: True when the rule reduces over dim 0 (so dim-0 sharding needs a collective, or is refused).
    reduces_over_rows: bool
    #: The fused step's first read of each unsharded gradient, done before any update (an entry None: not
    #: read early). The Optimizer takes a finite result as that gradient's finite check and passes the list
    #: back to ``step``, so the gradient is read once less. None: the rule has no such read.
    first_pass: Optional[Callable[[list[Tensor]], list[Any]]] = None
    #: True when the step needs each sharded parameter whole (Muon's Newton-Schulz): the shards then come
    #: with their offsets and a gather (``ShardInfo.offsets``, ``ShardInfo.gather``).
    gathers_whole: bool = False


RULES: dict[str, Rule] = {
    "sage": Rule("sage", {"lr": 2e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 1e-2,
                          "instant_damper": True, "code_compat": False, "state_dtype": None},
                 _validate_sign_rule, _check_sign_param, _sage_spec, _step_sage, True, _first_pass_sage),
    "lion": Rule("lion", {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "state_dtype": None},
                 _validate_lion, _check_sign_param, _lion_spec, _step_lion, False),
    "sinkgd": Rule("sinkgd", {"lr": 2e-3, "weight_decay": 1e-2, "iters": 5, "scale": 1.0,
                              "normalization": "uniform", "eps": 1e-8},
                   _validate_sinkgd, _param_check_matrix, _no_state, _step_sinkgd, True, _first_pass_sinkgd),
    "adamw": Rule("adamw", {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2,
                            "state_dtype": None},
                  _validate_adamw, _param_ok, _adamw_spec, _step_adamw, False),
    "muon": Rule("muon", {"lr": 1e-3, "weight_decay": 1e-2, "momentum": 0.95, "nesterov": True, "eps": 1e-7,
                          "adjust_lr_fn": "match_rms_adamw", "state_dtype": None},
                 _validate_muon, _param_check_2d, _muon_spec, _step_muon, True, gathers_whole=True),
}
