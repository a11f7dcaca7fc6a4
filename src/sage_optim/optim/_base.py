"""The one Optimizer engine behind SAGE, Lion, SinkGD and SinkSAGE.

Each param group carries ``rule`` (and, for the hybrid, ``role``). The engine validates groups,
creates state lazily from the rule's spec, guards against non-finite gradients and dispatches to
the rule's functional step. Classes only choose defaults, so no optimizer copies another's code.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import distributed as dist_support
from ..routing import PartitionReport, PartitionRow
from ._rules import RULES, Rule, StateSpec

__all__ = ["RuleOptimizer", "StateBytes", "NonFiniteGradientError", "NONFINITE_POLICIES", "uses_fused"]

NONFINITE_POLICIES = ("raise", "skip")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64", torch.int8: "int8"}


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN or Inf and the optimizer's policy is ``nonfinite="raise"``; nothing was updated."""


class StateBytes(int):
    """Bytes of optimizer state: an ``int`` (the total) that also carries ``by_role`` and ``by_rule``."""

    by_role: dict[str, int]
    by_rule: dict[str, int]

    def __new__(cls, total: int, by_role: dict[str, int], by_rule: dict[str, int]) -> "StateBytes":
        obj = super().__new__(cls, total)
        obj.by_role, obj.by_rule = by_role, by_rule
        return obj

    @classmethod
    def from_report(cls, report: PartitionReport) -> "StateBytes":
        """Totals of a partition table's ``state_bytes`` column, by role and by rule."""
        by_role: dict[str, int] = {}
        by_rule: dict[str, int] = {}
        for row in report.rows:
            by_role[row.role] = by_role.get(row.role, 0) + row.state_bytes
            by_rule[row.rule] = by_rule.get(row.rule, 0) + row.state_bytes
        return cls(sum(by_rule.values()), by_role, by_rule)

    @property
    def total(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"StateBytes(total={int(self)}, by_role={self.by_role}, by_rule={self.by_rule})"


def state_dtype_name(value: Union[None, str, torch.dtype]) -> Optional[str]:
    """Normalise ``state_dtype`` to the string kept in param groups (JSON- and DCP-friendly)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, torch.dtype) and value in _DTYPE_NAMES:
        return _DTYPE_NAMES[value]
    raise ValueError(f"state_dtype must be None, torch.float32, torch.bfloat16, torch.float64 or torch.int8 "
                     f"(8-bit block-quantised, SAGE/Lion only); got {value!r}")


def spec_nbytes(spec: StateSpec) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in spec.values())


def _default_fused(params: list[Tensor]) -> bool:
    """``fused=None``: the Triton kernels when every parameter is on CUDA and Triton is installed."""
    if not params or any(dist_support.local_device(p).type != "cuda" for p in params):
        return False
    from .. import kernels

    return kernels.available()


def _finite(first_pass_result: Any) -> bool:
    """Whether a first-pass result (a float or a tensor; None: not read) shows its gradient to be finite."""
    if first_pass_result is None:
        return False
    if isinstance(first_pass_result, Tensor):
        return bool(torch.isfinite(first_pass_result).all())
    return math.isfinite(first_pass_result)


def uses_fused(group: dict[str, Any], params: list[Tensor]) -> bool:
    """Whether a step of ``group`` over ``params`` takes the fused-kernel path: ``fused`` when set; for ``None``,
    an explicit ``foreach=`` or ``compile=True`` wins, else CUDA parameters with Triton installed."""
    if group.get("fused") is not None:
        return bool(group["fused"])
    return group.get("foreach") is None and not group.get("compile") and _default_fused(params)


class RuleOptimizer(Optimizer):
    """Base class: groups carry ``rule``; ``step`` dispatches each group to its rule.

    Subclasses pass ``rule_defaults``: rule name → hyperparameters that override the rule's own
    defaults for groups of that rule (the constructor's arguments), and ``allowed_rules``.
    """

    def __init__(self, params: Any, *, rule_defaults: dict[str, dict[str, Any]], allowed_rules: Iterable[str],
                 default_rule: Optional[str], foreach: Optional[bool], maximize: bool, nonfinite: str,
                 compile: bool = False, verify_every: Optional[int] = None,
                 fused: Optional[bool] = None) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {list(NONFINITE_POLICIES)}, got {nonfinite!r}")
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
        if not isinstance(maximize, bool):
            raise TypeError(f"maximize must be True or False, got {maximize!r}")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        if fused and compile:
            raise ValueError("fused=True and compile=True are two ways to fuse the update; pass only one")
        if verify_every is not None and (isinstance(verify_every, bool) or not isinstance(verify_every, int)
                                         or verify_every < 1):
            raise ValueError(f"verify_every must be None or an integer >= 1, got {verify_every!r}")
        self._rule_defaults = rule_defaults
        self._allowed_rules = tuple(allowed_rules)
        self.nonfinite = nonfinite
        #: Steps skipped because a gradient was not finite (``nonfinite="skip"``).
        self.skipped_steps = 0
        defaults: dict[str, Any] = {"rule": default_rule, "foreach": foreach, "maximize": maximize, "compile": compile,
                                    "fused": fused}
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors or dicts (param groups), not a single Tensor; "
                            "pass model.parameters() or [tensor]")
        super().__init__(params, defaults)
        #: Self-check of sharded steps (see :func:`sage_optim.distributed.verify_step`); None when off.
        self.verifier = None
        if verify_every is not None:
            from ..distributed.verify import verify_step

            self.verifier = verify_step(self, every=verify_every)

    # ------------------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        rule_name = param_group.get("rule", self.defaults.get("rule"))
        if rule_name not in RULES:
            raise ValueError(f"unknown rule {rule_name!r}; rules are {list(RULES)}")
        if rule_name not in self._allowed_rules:
            raise ValueError(f"{type(self).__name__} does not run rule {rule_name!r}; allowed: "
                             f"{list(self._allowed_rules)} (use SinkSAGE to mix rules)")
        param_group["rule"] = rule_name
        for key, value in {**RULES[rule_name].defaults, **self._rule_defaults.get(rule_name, {})}.items():
            param_group.setdefault(key, value)
        if "state_dtype" in param_group:
            param_group["state_dtype"] = state_dtype_name(param_group["state_dtype"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
            rule = RULES[rule_name]
            for name, param in zip(self._names(group), group["params"]):
                if param.is_complex() or not param.is_floating_point():
                    raise TypeError(f"{name} has dtype {param.dtype}; {type(self).__name__} supports real "
                                    "floating-point parameters only (view complex ones with torch.view_as_real)")
                rule.check_param(name, param, group)
        except (TypeError, ValueError):
            self.param_groups.pop()  # a refused group must not stay behind
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:
        rule = group.get("rule")
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; rules are {list(RULES)}")
        RULES[rule].validate(group)

    def _names(self, group: dict[str, Any]) -> list[str]:
        names = group.get("param_names")
        if names is not None and len(names) == len(group["params"]):
            return list(names)
        index = self.param_groups.index(group) if group in self.param_groups else len(self.param_groups)
        return [f"param_groups[{index}].params[{i}] (shape {tuple(p.shape)})" for i, p in enumerate(group["params"])]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("nonfinite", "raise")
        for group in self.param_groups:
            rule = RULES.get(group.get("rule", ""))
            if rule is not None:
                for key, value in rule.defaults.items():
                    group.setdefault(key, value)

    # ------------------------------------------------------------------------------ step
    def _init_state(self, param: Tensor, spec: StateSpec) -> dict[str, Tensor]:
        state = self.state[param]
        if len(state) == 0:
            for key, (shape, dtype) in spec.items():
                if key == "step":
                    # note: kept on the CPU as torch.optim does, so reading it never syncs a device.
                    state[key] = torch.tensor(0.0, dtype=torch.float32)
                elif key.endswith("_seed"):
                    # note: from torch's seed and the tensor's order, not drawn from torch's RNG, so that an
                    # int8-momentum run consumes the same random numbers (dropout, ...) as any other run
                    state[key] = torch.tensor((torch.initial_seed() * 1_000_003 + len(self.state)) % (2**31 - 1),
                                              dtype=torch.int64)
                elif shape == tuple(param.shape):
                    state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                elif dist_support.is_dtensor(param) and param.ndim >= 2 and len(shape) == 2 \
                        and shape[0] == param.shape[0]:
                    state[key] = _rows_like(param, shape, dtype)  # per-row state: sharded as the rows are
                else:
                    state[key] = torch.zeros(shape, dtype=dtype, device=dist_support.local_device(param))
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """Performs a single optimization step (``closure`` re-evaluates the model and returns the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: list[tuple[dict[str, Any], Rule, list[Tensor], list[Tensor], list[str]]] = []
        for group in self.param_groups:
            self._validate_group(group)  # groups may be edited between steps
            params, grads, names = [], [], []
            for name, param in zip(self._names(group), group["params"]):
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise TypeError(f"{name} has a sparse gradient; {type(self).__name__} does not support sparse "
                                    "gradients (use nn.Embedding(sparse=False))")
                if grad.is_complex():
                    raise TypeError(f"{name} has a complex gradient; only real gradients are supported")
                params.append(param)
                grads.append(grad)
                names.append(name)
            if params:
                work.append((group, RULES[group["rule"]], params, grads, names))
        views = []
        for group, _, params, _, _ in work:  # every group checked before any is updated
            if group.get("fused"):
                from .. import kernels

                kernels.check_devices(dist_support.local_device(p) for p in params)
            view = group
            if group.get("fused") is None:
                view = dict(view, fused=uses_fused(group, params))
            if group.get("foreach") is None:
                view = dict(view, foreach=dist_support.default_foreach(params))
            views.append(view)
        first_passes = [self._first_pass(view, rule, params, grads)
                        for view, (_, rule, params, grads, _) in zip(views, work)]
        if not self._gradients_finite(work, first_passes):
            return loss
        for view, first_pass, (group, rule, params, grads, names) in zip(views, first_passes, work):
            states = [self._init_state(p, rule.state_spec(p, group)) for p in params]
            local_params, local_grads, shards = dist_support.prepare(params, grads, names, rule,
                                                                     row_blocks=group.get("state_dtype") == "int8")
            local_states = [dist_support.local_state(s) for s in states]
            rule.step(view, local_params, local_grads, local_states, shards, first_pass=first_pass)
        return loss

    @staticmethod
    def _first_pass(group: dict[str, Any], rule: Rule, params: list[Tensor], grads: list[Tensor]) -> Optional[list[Any]]:
        """The fused step's first read of each gradient (max |G|, column sums), done now so that the finite
        check can use it instead of reading the gradients once more; None where the step would not read them
        that way (not fused, a rule without such a read, sharded tensors)."""
        if rule.first_pass is None or not group.get("fused") \
                or any(dist_support.is_dtensor(t) for t in (*params, *grads)):
            return None
        return rule.first_pass(grads)

    def _gradients_finite(self, work: list[tuple[dict[str, Any], Rule, list[Tensor], list[Tensor], list[str]]],
                          first_passes: list[Optional[list[Any]]]) -> bool:
        # a gradient whose first-pass result is finite is finite (NaN and ±Inf reach max |G| and column sums);
        # the others, and any that is not finite there, are checked by reading them
        grads = [g for (_, _, _, gs, _), known in zip(work, first_passes)
                 for g, x in zip(gs, known if known is not None else [None] * len(gs)) if not _finite(x)]
        if not grads or dist_support.all_finite(grads):
            return True
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            return False
        bad = [n for _, _, _, gs, ns in work for g, n in zip(gs, ns) if not dist_support.all_finite([g])]
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or Inf) in {', '.join(bad) or 'a sharded parameter on another rank'}; "
            "no parameter was updated. Lower the learning rate, enable gradient clipping, or construct the "
            "optimizer with nonfinite='skip' to skip such steps")

    # ------------------------------------------------------------------------------ state
    def state_nbytes(self) -> StateBytes:
        """Bytes of optimizer state kept between steps (from each rule's state spec, so exact before step 1)."""
        by_role: dict[str, int] = {}
        by_rule: dict[str, int] = {}
        for group in self.param_groups:
            rule = RULES[group["rule"]]
            nbytes = sum(spec_nbytes(rule.state_spec(p, group)) for p in group["params"])
            role = group.get("role") or "-"
            by_role[role] = by_role.get(role, 0) + nbytes
            by_rule[rule.name] = by_rule.get(rule.name, 0) + nbytes
        return StateBytes(sum(by_rule.values()), by_role, by_rule)

    @property
    def partition(self) -> PartitionReport:
        """Table of name, shape, role, rule and state bytes of every parameter."""
        rows = []
        for group in self.param_groups:
            rule = RULES[group["rule"]]
            for name, param in zip(self._names(group), group["params"]):
                rows.append(PartitionRow(name, tuple(param.shape), group.get("role") or "-", rule.name,
                                         spec_nbytes(rule.state_spec(param, group))))
        return PartitionReport(rows)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state; refuses a different partition or malformed state (leaving this optimizer as it was),
        and keeps state dtypes (torch would cast them to the parameter's)."""
        _check_state_dict_layout(state_dict)
        saved_groups = state_dict["param_groups"]
        problems = _partition_differences(saved_groups, self.param_groups)
        if problems:
            raise ValueError("cannot load this optimizer state: its partition differs from this optimizer's: "
                             + "; ".join(problems))
        saved_state = state_dict["state"]
        for saved_group, group in zip(saved_groups, self.param_groups):
            merged = {**group, **{k: v for k, v in saved_group.items() if k != "params"}}
            self._validate_group(merged)  # before anything is replaced
            rule = RULES[merged["rule"]]
            for saved_id, name, param in zip(saved_group["params"], self._names(group), group["params"]):
                if saved_id in saved_state:
                    _check_param_state(name, saved_state[saved_id], rule.state_spec(param, merged))
        super().load_state_dict(state_dict)
        # note: torch.optim casts floating state to the parameter's dtype on load (pytorch#43706), which
        # would turn fp32 state of bf16 parameters into bf16. Restore each tensor from the saved value.
        for saved_group, group in zip(saved_groups, self.param_groups):
            rule = RULES[group["rule"]]
            for saved_id, param in zip(saved_group["params"], group["params"]):
                if saved_id not in saved_state:
                    continue
                spec = rule.state_spec(param, group)
                for key, value in saved_state[saved_id].items():
                    if key in spec and key != "step" and isinstance(value, Tensor):
                        self.state[param][key] = value.to(device=dist_support.local_device(param),
                                                          dtype=spec[key][1], copy=True) \
                            if not dist_support.is_dtensor(value) else value.to(dtype=spec[key][1])


def _rows_like(param: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Zeros of ``shape`` (param's rows × k) as a DTensor whose rows are laid out as ``param``'s."""
    from torch.distributed.tensor import DTensor

    local = torch.zeros((param.to_local().shape[0], shape[1]), dtype=dtype, device=dist_support.local_device(param))
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=torch.Size(shape),
                              stride=(shape[1], 1))


def _check_state_dict_layout(state_dict: Any) -> None:
    fix = "pass the dict returned by optimizer.state_dict()"
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
            or not isinstance(state_dict.get("param_groups"), list):
        raise ValueError(f"an optimizer state dict has a 'state' dict and a 'param_groups' list; {fix}")
    for i, group in enumerate(state_dict["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise ValueError(f"param_groups[{i}] of the state dict has no 'params' list; {fix}")


def _check_param_state(name: str, state: Any, spec: StateSpec) -> None:
    """The saved state of one parameter must have the rule's keys, as tensors of the right shapes."""
    if not isinstance(state, dict):
        raise ValueError(f"saved state of {name} is a {type(state).__name__}, not a dict of tensors")
    if not state:
        return
    missing = sorted(set(spec) - set(state))
    if missing:
        raise ValueError(f"saved state of {name} lacks {missing}; it was not written by this optimizer's rule")
    for key, (shape, _) in spec.items():
        value = state[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"saved state {key!r} of {name} is a {type(value).__name__}, not a tensor")
        if key != "step" and tuple(value.shape) != tuple(shape):
            raise ValueError(f"saved state {key!r} of {name} has shape {tuple(value.shape)}, expected {tuple(shape)}")


def _partition_differences(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> list[str]:
    if len(saved) != len(current):
        return [f"it has {len(saved)} param groups, this optimizer has {len(current)}"]
    problems = []
    for i, (old, new) in enumerate(zip(saved, current)):
        for key in ("role", "rule"):
            if old.get(key) != new.get(key):
                problems.append(f"group {i} {key} is {old.get(key)!r} in the checkpoint but {new.get(key)!r} here")
        if len(old["params"]) != len(new["params"]):
            problems.append(f"group {i} has {len(old['params'])} parameters in the checkpoint but "
                            f"{len(new['params'])} here")
        old_names, new_names = old.get("param_names"), new.get("param_names")
        if old_names is not None and new_names is not None and list(old_names) != list(new_names):
            missing = sorted(set(old_names) - set(new_names))[:3]
            extra = sorted(set(new_names) - set(old_names))[:3]
            problems.append(f"group {i} ({new.get('role') or new.get('rule')}) parameter names differ "
                            f"(only in checkpoint: {missing}, only here: {extra})")
    return problems
