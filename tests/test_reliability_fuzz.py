"""Fuzzing the reliability contract of every optimizer in ``optim_db.OPTIMIZERS`` (issue #9, item 5).

Hypothesis generates constructor arguments, parameter shapes and dtypes, gradient contents,
param-group edits between steps and damaged state dicts. Whatever it generates, an optimizer must
either work or raise a clear exception (``ValueError``, ``TypeError``, ``NonFiniteGradientError``,
``NotImplementedError``) with a message, and it must never write NaN or Inf into a parameter or its
state. ``docs/reliability.md`` lists the guarantees and the test that checks each one.

The last section keeps, as regression tests, the minimal reproducers of the bugs this fuzzing found
(all fixed): SAGE column-sum overflow, eps = 0 with a zero gradient, an empty dim 0, SinkGD NaN on
zero/denormal/huge rows, float64 gradients beyond float32's range called non-finite, float16
momentum overflow (now refused), refused param groups left behind, unvalidated flags, and
``load_state_dict`` half-loading malformed state.

Every hypothesis test is derandomized (no example database), so CI runs the same cases each time.
``pytest tests/test_reliability_fuzz.py --hypothesis-show-statistics`` counts them.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import sage_optim as so
from optim_db import OPTIMIZERS, OptimizerInfo
from sage_optim.optim._rules import RULES

CLEAR_ERRORS = (ValueError, TypeError, so.NonFiniteGradientError, NotImplementedError)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NAN, INF = float("nan"), float("inf")
INFO = {info.name: info for info in OPTIMIZERS}
NAMES = list(INFO)

# ------------------------------------------------------------------------------------ arguments
#: constructor keyword of each generic argument, per optimizer (SinkSAGE prefixes SinkGD's).
ARGUMENTS: dict[str, dict[str, str]] = {
    "SAGE": {a: a for a in ("lr", "betas", "eps", "weight_decay", "code_compat", "instant_damper", "foreach",
                            "maximize", "state_dtype", "nonfinite")},
    "Lion": {a: a for a in ("lr", "betas", "weight_decay", "foreach", "maximize", "state_dtype", "nonfinite")},
    "SinkGD": {a: a for a in ("lr", "weight_decay", "iters", "scale", "normalization", "eps", "foreach",
                              "maximize", "nonfinite")},
    "SinkSAGE": {**{a: a for a in ("lr", "betas", "eps", "weight_decay", "normalization", "code_compat",
                                   "instant_damper", "foreach", "maximize", "state_dtype", "nonfinite")},
                 "iters": "sinkgd_iters", "scale": "sinkgd_scale"},
}

#: argument -> (ordinary valid values, valid but extreme values, invalid values).
VALUES: dict[str, tuple[list[Any], list[Any], list[Any]]] = {
    "lr": ([0.0, 1e-3, 0.1, 1, torch.tensor(1e-2)], [1e30],
           [-1e-3, -INF, NAN, INF, "0.1", None, True, [0.1], torch.tensor([0.1, 0.2]), torch.tensor(NAN), 1j]),
    "betas": ([(0.9, 0.99), (0.0, 0.0), (0.5, 0.999999), [0.9, 0.99], (0, 0)], [],
              [(1.0, 0.99), (0.9, 1.0), (-0.1, 0.9), (NAN, 0.9), (0.9, INF), (0.9,), (0.9, 0.99, 0.999), "ab",
               None, 0.9, (True, 0.9), ("0.9", 0.99)]),
    "eps": ([0.0, 1e-8, 1e-3, 1.0], [1e30], [-1e-8, NAN, INF, "1e-8", None, False]),
    "weight_decay": ([0, 0.01, 1.0], [1e30], [-0.1, NAN, INF, -INF, "0.01", None, [0.0]]),
    "iters": ([1, 2, 5], [10**9], [0, -1, 2.5, True, "5", None, NAN]),
    "scale": ([0.5, 1.0, 10], [1e300], [0.0, -1.0, NAN, INF, "10", True, None]),
    "normalization": (["uniform", "sr"], [], ["l1", "", "UNIFORM", None, 1, ["sr"]]),
    "state_dtype": ([None, torch.float32, torch.bfloat16, torch.float64, "float32", "bfloat16"], [],
                    [torch.float16, "float16", torch.int8, torch.complex64, "bf16", "int8", 5, NAN]),
    "foreach": ([None, True, False], [], ["yes", 1, 0, NAN]),
    "nonfinite": (["raise", "skip"], [], ["ignore", "RAISE", None, 1, True]),
    "maximize": ([True, False], [], ["yes", 1, None, NAN]),
    "code_compat": ([True, False], [], ["no", 1, None]),
    "instant_damper": ([True, False], [], ["yes", 0, None]),
}

#: the word an error message must contain to name the argument.
MESSAGE_NAMES = {"betas": "beta"}


@st.composite
def constructor_arguments(draw: st.DrawFn, optimizer: str) -> tuple[dict[str, Any], set[str], set[str]]:
    """kwargs, the arguments given an invalid value, and those given a valid but extreme value."""
    names = list(ARGUMENTS[optimizer])
    can_be_invalid = [n for n in names if VALUES[n][2]]
    invalid = draw(st.one_of(st.just(set()), st.sets(st.sampled_from(can_be_invalid), min_size=1, max_size=2)))
    kwargs: dict[str, Any] = {}
    extreme: set[str] = set()
    for name in names:
        ordinary, extremes, bad = VALUES[name]
        if name in invalid:
            value = draw(st.sampled_from(bad))
        else:
            index = draw(st.integers(-1, len(ordinary) + len(extremes) - 1))  # -1: leave the default
            if index < 0:
                continue
            value = (ordinary + extremes)[index]
            if index >= len(ordinary):
                extreme.add(name)
        kwargs[ARGUMENTS[optimizer][name]] = value
    return kwargs, invalid, extreme


# ------------------------------------------------------------------------------------ helpers
def _rule_of(info: OptimizerInfo, ndim: int) -> str:
    """The rule a parameter of this ndim runs under (``optim_db._hybrid`` routes like SinkSAGE's roles)."""
    if info.name == "SinkGD" or (info.name == "SinkSAGE" and ndim >= 2):
        return "sinkgd"
    return "sage" if info.name in ("SAGE", "SinkSAGE") else "lion"


def _small_params(info: OptimizerInfo, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (2, 3, 2)] if info.matrices_only else [(4, 3), (3,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]


def _random_params(shapes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(d)) for s, d in zip(shapes, dtypes)]


def _gaussian_grads(params: list[torch.nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)


def _all_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _snapshot(opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict[int, dict[str, Any]]]:
    params = [p.detach().clone() for p in _all_params(opt)]
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in s.items()}
             for p, s in opt.state.items() if len(s)}
    return params, state


def _assert_unchanged(opt: torch.optim.Optimizer, before: tuple[list[torch.Tensor], dict[int, dict[str, Any]]]) -> None:
    params, state = _snapshot(opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], params)), "a parameter changed"
    assert before[1].keys() == state.keys(), "state was created or dropped"
    for key, saved in before[1].items():
        assert saved.keys() == state[key].keys()
        for name, value in saved.items():
            same = torch.equal(value, state[key][name]) if torch.is_tensor(value) else value == state[key][name]
            assert same, f"state {name!r} changed"


def _dtypes(params: list[torch.Tensor]) -> dict[int, torch.dtype]:
    return {id(p): p.dtype for p in params}


def _assert_finite_and_typed(opt: torch.optim.Optimizer, dtypes: dict[int, torch.dtype],
                             check_params: bool = True) -> None:
    """Parameters keep their dtype (and are finite); state has the spec's keys, shapes and dtypes, all finite."""
    for p in _all_params(opt):
        assert p.dtype == dtypes[id(p)], f"parameter dtype changed from {dtypes[id(p)]} to {p.dtype}"
        if check_params:
            assert torch.isfinite(p).all(), f"non-finite value written into a parameter of shape {tuple(p.shape)}"
    for group in opt.param_groups:
        rule = RULES[group["rule"]]
        for p in group["params"]:
            state = opt.state.get(p)
            if not state:
                continue
            for key, (shape, dtype) in rule.state_spec(p, group).items():
                value = state[key]
                assert (tuple(value.shape), value.dtype) == (shape, dtype), f"state {key!r} is not {shape} {dtype}"
                assert torch.isfinite(value).all(), f"non-finite value written into state {key!r}"


def _assert_names(error: BaseException, arguments: set[str]) -> None:
    message = str(error)
    assert message, f"{type(error).__name__} without a message"
    words = [MESSAGE_NAMES.get(a, a) for a in arguments]
    assert any(w in message for w in words), f"message {message!r} names none of {sorted(arguments)}"


# ------------------------------------------------------------------------------------ 1. constructor
@pytest.mark.parametrize("name", NAMES)
@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_constructor_takes_valid_arguments_and_refuses_invalid_ones_naming_them(name, data):
    info = INFO[name]
    kwargs, invalid, extreme = data.draw(constructor_arguments(info.name), label="kwargs, invalid, extreme")
    params = _small_params(info)
    dtypes = _dtypes(params)
    if invalid:
        with pytest.raises((ValueError, TypeError)) as error:
            info.make(params, **kwargs)
        _assert_names(error.value, invalid)
        return
    opt = info.make(params, **kwargs)
    if "iters" in extreme:
        return  # a billion Sinkhorn iterations are valid, but not something to run here
    for step in range(1 if extreme else 3):
        _gaussian_grads(params, step)
        opt.step()
        # note: a valid but extreme lr / weight_decay / scale may overflow the parameters themselves;
        # the state (moments of the gradients) must stay finite all the same.
        _assert_finite_and_typed(opt, dtypes, check_params=not extreme)


# ------------------------------------------------------------------------------------ 2. shapes and dtypes
@st.composite
def shape_for(draw: st.DrawFn, info: OptimizerInfo, dims: st.SearchStrategy[int]) -> tuple[int, ...]:
    ndim = draw(st.integers(2 if info.matrices_only else 0, 4))
    shape = [draw(dims) for _ in range(ndim)]
    return tuple(shape)


@st.composite
def hyperparameters(draw: st.DrawFn, info: OptimizerInfo) -> dict[str, Any]:
    """Ordinary valid hyperparameters (the extreme and invalid ones are the constructor test's job)."""
    kwargs = {"lr": draw(st.sampled_from([0.0, 1e-3, 0.1])), "weight_decay": draw(st.sampled_from([0.0, 0.01, 0.5])),
              "foreach": draw(st.booleans()), "maximize": draw(st.booleans())}
    if info.name != "SinkGD":
        kwargs["betas"] = draw(st.sampled_from([(0.9, 0.99), (0.0, 0.0), (0.5, 0.999)]))
    if info.name in ("SAGE", "SinkSAGE"):
        kwargs["code_compat"] = draw(st.booleans())
    if info.name in ("SinkGD", "SinkSAGE"):
        kwargs["normalization"] = draw(st.sampled_from(["uniform", "sr"]))
    return kwargs


@pytest.mark.parametrize("name", NAMES)
@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_any_shape_and_float_dtype_steps_keeping_dtypes_and_finite_values(name, data):
    info = INFO[name]
    shapes = data.draw(st.lists(shape_for(info, st.integers(0, 3)), min_size=1, max_size=3), label="shapes")
    dtypes = data.draw(st.lists(st.sampled_from(DTYPES), min_size=len(shapes), max_size=len(shapes)), label="dtypes")
    kwargs = data.draw(hyperparameters(info), label="kwargs")
    if info.name != "SinkGD":
        kwargs["state_dtype"] = data.draw(st.sampled_from([None, "float32", "bfloat16", "float64"]),
                                          label="state_dtype")
    params = _random_params(shapes, dtypes)
    expected = _dtypes(params)
    opt = info.make(params, **kwargs)
    for step in range(3):
        _gaussian_grads(params, step)
        opt.step()
        _assert_finite_and_typed(opt, expected)
    assert [tuple(p.shape) for p in params] == shapes


# ------------------------------------------------------------------------------------ 3. gradient contents
def _magnitudes(rule: str, dtype: torch.dtype, ndim: int) -> dict[str, float]:
    """The gradient values to mix for a parameter, by kind; each must be finite in ``dtype``."""
    info = torch.finfo(dtype)
    if dtype == torch.float16:
        kinds = {"zero": 0.0, "denormal": 1e-7, "tiny": 1e-4, "normal": 1.0, "huge": 6e4, "half_max": info.max / 2}
    elif dtype == torch.float64:
        kinds = {"zero": 0.0, "denormal": 1e-310, "tiny": 1e-20, "normal": 1.0, "huge": 1e30, "half_max": info.max / 2}
    else:
        kinds = {"zero": 0.0, "denormal": 1e-40, "tiny": 1e-20, "normal": 1.0, "huge": 1e30, "half_max": info.max / 2}
    return kinds


@st.composite
def gradient_values(draw: st.DrawFn, numel: int, kinds: dict[str, float]) -> list[float]:
    """One kind at its exact magnitude for the whole tensor (all zeros, all finfo.max / 2, ...) or a
    mixture of kinds and magnitudes; signs are random either way."""
    names = sorted(kinds)
    signs = draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=numel, max_size=numel))
    if draw(st.booleans()):
        magnitude = kinds[draw(st.sampled_from(names))]
        return [sign * magnitude for sign in signs]
    chosen = draw(st.lists(st.sampled_from(names), min_size=numel, max_size=numel))
    factors = draw(st.lists(st.sampled_from([1.0, 0.75, 0.5]), min_size=numel, max_size=numel))  # <= 1: in range
    return [s * kinds[k] * f for k, s, f in zip(chosen, signs, factors)]


CORNER_SHAPES = {"SAGE": [(), (3,), (3, 2), (2, 2, 2)], "Lion": [(), (3,), (3, 2), (2, 2, 2)],
                 "SinkGD": [(3, 2), (2, 2, 2)], "SinkSAGE": [(3,), (3, 2), (2, 2, 2)]}


def _corner_gradient(p: torch.Tensor, kinds: dict[str, float], kind: str, step: int) -> torch.Tensor:
    numel = p.numel()
    signs = [(-1.0) ** (i + step) for i in range(numel)]  # alternating, flipped every step
    if kind == "mixture":
        names = sorted(kinds)
        values = [sign * kinds[names[(i + step) % len(names)]] for i, sign in enumerate(signs)]
    elif kind in kinds:
        values = [sign * kinds[kind] for sign in signs]
    else:  # a kind not defined for this dtype: an ordinary gradient
        values = [sign * (1.0 + i) for i, sign in enumerate(signs)]
    return torch.tensor(values, dtype=torch.float64).reshape(p.shape).to(p.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_every_named_gradient_kind_leaves_parameters_and_state_finite(name, dtype):
    """The kinds the generator mixes, each over whole tensors: zeros, denormals, tiny, huge, finfo.max / 2."""
    info = INFO[name]
    all_kinds = {k for shape in CORNER_SHAPES[name] for k in _magnitudes(_rule_of(info, len(shape)), dtype, len(shape))}
    for kind in sorted(all_kinds) + ["mixture"]:
        params = [torch.nn.Parameter(torch.ones(shape, dtype=dtype)) for shape in CORNER_SHAPES[name]]
        expected = _dtypes(params)
        opt = info.make(params, lr=0.1)
        for step in range(3):
            for p in params:
                p.grad = _corner_gradient(p, _magnitudes(_rule_of(info, p.ndim), dtype, p.ndim), kind, step)
            opt.step()
            _assert_finite_and_typed(opt, expected)


@pytest.mark.parametrize("name", NAMES)
@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_any_gradient_contents_leave_parameters_and_state_finite(name, data):
    info = INFO[name]
    shapes = data.draw(st.lists(shape_for(info, st.integers(1, 3)), min_size=1, max_size=2), label="shapes")
    dtypes = data.draw(st.lists(st.sampled_from(DTYPES), min_size=len(shapes), max_size=len(shapes)), label="dtypes")
    policy = data.draw(st.sampled_from(["raise", "skip"]), label="nonfinite")
    kwargs = data.draw(hyperparameters(info), label="kwargs")
    params = _random_params(shapes, dtypes)
    expected = _dtypes(params)
    opt = info.make(params, nonfinite=policy, **kwargs)
    for step in range(3):
        for p in params:
            values = data.draw(gradient_values(p.numel(), _magnitudes(_rule_of(info, p.ndim), p.dtype, p.ndim)),
                               label=f"step {step} gradient {tuple(p.shape)} {p.dtype}")
            p.grad = torch.tensor(values, dtype=torch.float64).reshape(p.shape).to(p.dtype)
        poison = data.draw(st.sampled_from([None, None, NAN, INF, -INF]), label=f"step {step} non-finite value")
        if poison is not None:
            target = data.draw(st.sampled_from(params), label="poisoned parameter")
            target.grad.view(-1)[data.draw(st.integers(0, target.numel() - 1), label="element")] = poison
            before, skipped = _snapshot(opt), opt.skipped_steps
            if policy == "raise":
                with pytest.raises(so.NonFiniteGradientError, match="non-finite gradient"):
                    opt.step()
            else:
                opt.step()
                assert opt.skipped_steps == skipped + 1
            _assert_unchanged(opt, before)
            continue
        opt.step()
        _assert_finite_and_typed(opt, expected)


# ------------------------------------------------------------------------------------ 4. group edits
#: group keys a rule validates at every step, with valid values to edit to.
EDITABLE: dict[str, dict[str, list[Any]]] = {
    "sage": {"lr": [0.0, 1e-3, 0.05, torch.tensor(1e-2)], "betas": [(0.9, 0.99), (0.0, 0.5), [0.8, 0.9]],
             "weight_decay": [0.0, 0.1], "eps": [1e-8, 1e-4]},
    "lion": {"lr": [0.0, 1e-3, 0.05], "betas": [(0.9, 0.99), (0.0, 0.5)], "weight_decay": [0.0, 0.1]},
    "sinkgd": {"lr": [0.0, 1e-3, 0.05], "weight_decay": [0.0, 0.1], "eps": [1e-8, 1e-4], "iters": [1, 3],
               "scale": [0.5, 10.0], "normalization": ["uniform", "sr"]},
}


@st.composite
def group_edit(draw: st.DrawFn, opt: torch.optim.Optimizer) -> tuple[int, str, Any, bool]:
    index = draw(st.integers(0, len(opt.param_groups) - 1))
    rule = opt.param_groups[index]["rule"]
    key = draw(st.sampled_from(sorted(EDITABLE[rule])))
    valid = draw(st.booleans())
    value = draw(st.sampled_from(EDITABLE[rule][key] if valid else VALUES[key][2]))
    return index, key, value, valid


@pytest.mark.parametrize("name", NAMES)
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_param_group_edits_between_steps_are_checked_at_the_next_step(name, data):
    info = INFO[name]
    params = _small_params(info)
    dtypes = _dtypes(params)
    opt = info.make(params)
    for step in range(4):
        index, key, value, valid = data.draw(group_edit(opt), label=f"edit before step {step}")
        group = opt.param_groups[index]
        old = group[key]
        group[key] = value
        _gaussian_grads(params, step)
        if valid:
            opt.step()
            _assert_finite_and_typed(opt, dtypes)
            continue
        before = _snapshot(opt)
        with pytest.raises((ValueError, TypeError)) as error:
            opt.step()
        _assert_names(error.value, {key})
        _assert_unchanged(opt, before)
        group[key] = old  # put it back: the optimizer must carry on as if nothing happened
        opt.step()
        _assert_finite_and_typed(opt, dtypes)


# ------------------------------------------------------------------------------------ 5. state dicts
def _model_and_optimizer(info: OptimizerInfo) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[torch.Tensor]]:
    """A named two-layer model: groups carry ``param_names`` (SinkSAGE: roles hidden and vector)."""
    with torch.random.fork_rng():  # the same model every time, without touching the global RNG
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    named = [(n, p) for n, p in model.named_parameters() if not info.matrices_only or p.ndim >= 2]
    opt = so.SinkSAGE(model) if info.name == "SinkSAGE" else info.make(named)
    return model, opt, [p for _, p in named]


def _on_first_state(change):
    """Damage applied to the state of the parameter with the lowest id (none when there is no state)."""
    def damage(sd: dict[str, Any]) -> None:
        if sd["state"]:
            change(sd["state"], min(sd["state"]))
    return damage


def _on_group(index: int, change):
    """Damage applied to one saved group (none when the groups are already gone)."""
    def damage(sd: dict[str, Any]) -> None:
        if sd["param_groups"]:
            change(sd["param_groups"][index])
    return damage


def _cast_state(dtype: torch.dtype):
    def damage(sd: dict[str, Any]) -> None:
        for state in sd["state"].values():
            for key, value in list(state.items()):
                if key != "step" and torch.is_tensor(value):
                    state[key] = value.to(dtype)
    return damage


def _drop_hyperparameter(group: dict[str, Any]) -> None:
    for key in ("betas", "lr", "weight_decay"):
        if key in group:
            del group[key]
            return


def _rename_first(group: dict[str, Any]) -> None:
    if group.get("param_names"):
        group["param_names"][0] = "renamed.weight"


#: name -> damage to a saved state dict. Each either still loads (and the next step is finite) or is
#: refused with a clear error; malformed state is refused at load time (see the regression tests below).
DAMAGE = {
    "drop one parameter's state": _on_first_state(lambda state, i: state.pop(i)),
    "drop all state": lambda sd: sd["state"].clear(),
    "add an unknown key to a parameter's state": _on_first_state(
        lambda state, i: state[i].__setitem__("extra", torch.zeros(2))),
    "add state for an unknown parameter id": lambda sd: sd["state"].__setitem__(99, {"exp_avg": torch.zeros(2)}),
    "cast state tensors to float16": _cast_state(torch.float16),
    "cast state tensors to float64": _cast_state(torch.float64),
    "drop a hyperparameter from a group": _on_group(0, _drop_hyperparameter),
    "set lr to NaN in a group": _on_group(0, lambda g: g.__setitem__("lr", NAN)),
    "set weight_decay negative in a group": _on_group(-1, lambda g: g.__setitem__("weight_decay", -1.0)),
    "add an unknown key to a group": _on_group(0, lambda g: g.__setitem__("extra", 1)),
    "drop a group": lambda sd: sd.__setitem__("param_groups", sd["param_groups"][:-1]),
    "duplicate a group": lambda sd: sd["param_groups"].extend(copy.deepcopy(sd["param_groups"][:1])),
    "no groups at all": lambda sd: sd["param_groups"].clear(),
    "truncate a group's params": _on_group(0, lambda g: g.__setitem__("params", g["params"][:-1])),
    "extend a group's params": _on_group(0, lambda g: g["params"].append(99)),
    "change a group's rule": _on_group(0, lambda g: g.__setitem__("rule", "adamw" if g["rule"] != "adamw" else "lion")),
    "change a group's role": _on_group(0, lambda g: g.__setitem__("role", "embedding")),
    "rename a parameter": _on_group(0, _rename_first),
    "truncate param_names": _on_group(0, lambda g: g.__setitem__("param_names", [])),
}


def _group_settings(opt: torch.optim.Optimizer) -> list[tuple[list[int], dict[str, Any]]]:
    return [([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]


@pytest.mark.parametrize("name", NAMES)
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_damaged_state_dict_loads_or_is_refused_clearly_never_half_loaded(name, data):
    info = INFO[name]
    damage = data.draw(st.lists(st.sampled_from(sorted(DAMAGE)), min_size=1, max_size=3), label="damage")
    _, source, source_params = _model_and_optimizer(info)
    for step in range(2):
        _gaussian_grads(source_params, step)
        source.step()
    saved = copy.deepcopy(source.state_dict())
    for harm in damage:
        DAMAGE[harm](saved)
    _, opt, params = _model_and_optimizer(info)
    dtypes = _dtypes(_all_params(opt))
    _gaussian_grads(params, 0)
    opt.step()  # the optimizer being loaded into already has state of its own
    before, groups_before = _snapshot(opt), _group_settings(opt)
    try:
        opt.load_state_dict(saved)
    except CLEAR_ERRORS as error:
        assert str(error)
        _assert_unchanged(opt, before)
        assert _group_settings(opt) == groups_before, "a refused load changed the param groups"
    _gaussian_grads(params, 5)
    try:
        opt.step()
    except (ValueError, TypeError) as error:  # a loaded invalid hyperparameter is named at the step
        _assert_names(error, {"lr", "weight_decay"})
        return
    _assert_finite_and_typed(opt, dtypes)


# ------------------------------------------------------------------ regression tests of bugs found by fuzzing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sage_finite_huge_gradients_on_a_matrix_leave_it_finite(dtype):
    p = torch.nn.Parameter(torch.ones(4, 3, dtype=dtype))
    opt = so.SAGE([p])
    p.grad = torch.full((4, 3), torch.finfo(dtype).max / 2, dtype=dtype)
    opt.step()
    _assert_finite_and_typed(opt, _dtypes([p]))


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
def test_sage_with_eps_zero_and_a_zero_gradient_leaves_parameters_finite(foreach):
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = so.SAGE([p], eps=0.0, foreach=foreach)
    p.grad = torch.zeros(4, 3)
    opt.step()
    _assert_finite_and_typed(opt, _dtypes([p]))


def test_sage_on_a_parameter_with_an_empty_dim_0_keeps_finite_state():
    p = torch.nn.Parameter(torch.ones(0, 3))
    opt = so.SAGE([p])
    p.grad = torch.ones(0, 3)
    opt.step()
    _assert_finite_and_typed(opt, _dtypes([p]))


def _sinkgd_grad(kind: str) -> torch.Tensor:
    g = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    if kind == "one zero row":
        g[1] = 0
    elif kind == "one zero column":
        g[:, 1] = 0
    elif kind == "all zeros":
        g.zero_()
    elif kind == "denormal 1e-40":
        g.fill_(1e-40)
    elif kind == "huge 1e30":
        g.fill_(1e30)
    return g


@pytest.mark.parametrize("kind", ["one zero row", "one zero column", "all zeros", "denormal 1e-40", "huge 1e30"])
@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
def test_sinkgd_float32_gradient_with_zero_tiny_or_huge_rows_leaves_parameters_finite(kind, foreach):
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = so.SinkGD([p], lr=1e-2, foreach=foreach)
    p.grad = _sinkgd_grad(kind)
    opt.step()
    _assert_finite_and_typed(opt, _dtypes([p]))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
def test_finite_float64_gradient_beyond_float32_range_is_not_called_non_finite(info):
    params = _small_params(info)
    opt = info.make(params)
    for p in params:
        p.grad = torch.full_like(p, 1e300)
    opt.step()


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.name in ("SAGE", "Lion")], ids=str)
def test_float16_momentum_is_refused_because_it_would_overflow(info):
    """float16 state would store momentum beyond 65504 as inf (then inf − inf = NaN freezes the parameter)."""
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="state_dtype float16 is refused.*use bfloat16"):
        info.make([p], state_dtype=torch.float16)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
def test_a_refused_add_param_group_leaves_the_optimizer_as_it_was(info):
    params = _small_params(info)
    opt = info.make(params)
    extra = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    group = {"params": [extra], "lr": -1.0}
    if info.name == "SinkSAGE":
        group["rule"] = "sinkgd"
    with pytest.raises(ValueError, match="Invalid learning rate lr"):
        opt.add_param_group(group)
    assert len(opt.param_groups) == (2 if info.name == "SinkSAGE" else 1)
    _gaussian_grads(params, 0)
    opt.step()


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.name in ("SAGE", "SinkSAGE")], ids=str)
@pytest.mark.parametrize("flag", ["code_compat", "instant_damper"])
@pytest.mark.parametrize("value", ["no", 1, None], ids=repr)
def test_non_boolean_flags_are_refused_naming_them(info, flag, value):
    with pytest.raises(TypeError, match=flag):
        info.make(_small_params(info), **{flag: value})


def _sage_params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]


def _sage_state_dict() -> dict[str, Any]:
    params = _sage_params()
    opt = so.SAGE(params)
    _gaussian_grads(params, 0)
    opt.step()
    return copy.deepcopy(opt.state_dict())


MALFORMED = {
    "no 'state' key": lambda sd: sd.pop("state"),
    "no 'param_groups' key": lambda sd: sd.pop("param_groups"),
    "a group without 'params'": lambda sd: sd["param_groups"][0].pop("params"),
    "'state' is a list": lambda sd: sd.__setitem__("state", []),
    "a parameter's state lacks 'step'": lambda sd: sd["state"][0].pop("step"),
    "a parameter's state lacks 'exp_avg'": lambda sd: sd["state"][0].pop("exp_avg"),
    "a parameter's state lacks 'col_ema'": lambda sd: sd["state"][0].pop("col_ema"),
    "exp_avg has the wrong shape": lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(2)),
    "col_ema has the wrong shape": lambda sd: sd["state"][0].__setitem__("col_ema", torch.zeros(5)),
    "the two parameters' ids are swapped": lambda sd: sd["param_groups"][0].__setitem__("params", [1, 0]),
    "step is a Python number": lambda sd: sd["state"][0].__setitem__("step", 1.0),
    "exp_avg is a list": lambda sd: sd["state"][0].__setitem__("exp_avg", [0.0] * 12),
    "state_dtype is an unknown string": lambda sd: sd["param_groups"][0].__setitem__("state_dtype", "int8"),
}


@pytest.mark.parametrize("damage", sorted(MALFORMED))
def test_malformed_state_dict_is_refused_at_load_with_a_clear_error(damage):
    saved = _sage_state_dict()
    MALFORMED[damage](saved)
    params = _sage_params()
    opt = so.SAGE(params)
    before = _snapshot(opt)
    try:
        opt.load_state_dict(saved)
    except (ValueError, TypeError) as error:
        assert str(error)
        _assert_unchanged(opt, before)
        return
    _gaussian_grads(params, 1)
    opt.step()
    _assert_finite_and_typed(opt, _dtypes(params))
