"""Role-based routing for the hybrid (SPEC §4): the module tree decides, never names or shapes.

``classify(model)`` gives every trainable parameter exactly one :class:`Role`;
``partition(model, rules)`` turns roles into optimizer param groups, each carrying ``role`` and
``rule``, and a :class:`PartitionReport` that prints as a table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping, Optional, Union

from torch import Tensor, nn

__all__ = ["Role", "classify", "partition", "Partition", "PartitionRow", "PartitionReport", "DEFAULT_RULES",
           "RuleSpec"]


class Role(str, Enum):
    """What a parameter does in the network; the hybrid picks an update rule per role."""

    EMBEDDING = "embedding"  #: weights of ``nn.Embedding`` modules
    HEAD = "head"            #: the output projection (``get_output_embeddings()`` or ``head=``), unless tied
    VECTOR = "vector"        #: ndim ≤ 1: norm gains, biases, scalars
    HIDDEN = "hidden"        #: every other parameter with ndim ≥ 2

    def __str__(self) -> str:
        return self.value


#: SPEC §4's default: SinkGD for hidden matrices, SAGE for everything else.
DEFAULT_RULES: dict[str, str] = {"embedding": "sage", "head": "sage", "vector": "sage", "hidden": "sinkgd"}

#: A role's rule: a rule name, or a (rule name, hyperparameter overrides) pair, or {"rule": ..., **overrides}.
RuleSpec = Union[str, tuple[str, Mapping[str, Any]], Mapping[str, Any]]


def _head_module_weight(model: nn.Module, head: Union[nn.Module, Tensor, None]) -> Optional[Tensor]:
    if head is None:
        get_out = getattr(model, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
        if head is None:
            return None
    if isinstance(head, Tensor):
        return head
    if isinstance(head, nn.Module):
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor):
            raise ValueError(f"head={type(head).__name__} has no 'weight' tensor; pass the output parameter itself "
                             "as head=model.<path>.weight")
        return weight
    raise TypeError(f"head must be an nn.Module, a Parameter or None, got {type(head).__name__}")


def classify(model: nn.Module, *, head: Union[nn.Module, Tensor, None] = None) -> dict[str, Role]:
    """The role of every trainable parameter of ``model``, by fully qualified name.

    Tied parameters appear once, under the first name ``named_parameters()`` gives them (so a head
    tied to the embedding is the embedding). The head is ``head`` when given, else
    ``model.get_output_embeddings()`` when the model has one.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"classify() needs an nn.Module, got {type(model).__name__}")
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head_weight = _head_module_weight(model, head)
    if head is not None and head_weight is not None and not any(p is head_weight for p in model.parameters()):
        raise ValueError("head= is not a parameter of this model; pass the model's own output layer")
    roles: dict[str, Role] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_ids:
            roles[name] = Role.EMBEDDING
        elif head_weight is not None and param is head_weight:
            roles[name] = Role.HEAD
        elif param.ndim <= 1:
            roles[name] = Role.VECTOR
        else:
            roles[name] = Role.HIDDEN
    return roles


@dataclass(frozen=True)
class PartitionRow:
    name: str
    shape: tuple[int, ...]
    role: str
    rule: str
    state_bytes: int


@dataclass
class PartitionReport:
    """One row per parameter: name, shape, role, rule, optimizer-state bytes. ``print`` shows a table."""

    rows: list[PartitionRow] = field(default_factory=list)

    def totals(self) -> dict[tuple[str, str], tuple[int, int, int]]:
        """(role, rule) → (number of tensors, numel, state bytes)."""
        out: dict[tuple[str, str], tuple[int, int, int]] = {}
        for r in self.rows:
            n, numel, nbytes = out.get((r.role, r.rule), (0, 0, 0))
            out[(r.role, r.rule)] = (n + 1, numel + _numel(r.shape), nbytes + r.state_bytes)
        return out

    def __str__(self) -> str:
        header = ("name", "shape", "role", "rule", "state bytes")
        body = [(r.name, "×".join(map(str, r.shape)) or "scalar", r.role, r.rule, f"{r.state_bytes:,}")
                for r in self.rows]
        summary = [(f"[{n} tensors, {numel:,} params]", "", role, rule, f"{nbytes:,}")
                   for (role, rule), (n, numel, nbytes) in self.totals().items()]
        total = sum(r.state_bytes for r in self.rows)
        table = [header, *body, *summary, ("total", "", "", "", f"{total:,}")]
        widths = [max(len(row[i]) for row in table) for i in range(5)]
        lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in table]
        rule_line = "-" * len(lines[0])
        return "\n".join([lines[0], rule_line, *lines[1:len(body) + 1], rule_line, *lines[len(body) + 1:]])

    __repr__ = __str__


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class Partition:
    """Param groups (each with ``role``, ``rule``, ``params``, ``param_names`` and overrides) for one model."""

    groups: list[dict[str, Any]]
    roles: dict[str, Role]


def _parse_rule(role: str, spec: RuleSpec) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return spec[0], dict(spec[1])
    if isinstance(spec, Mapping) and isinstance(spec.get("rule"), str):
        overrides = dict(spec)
        return overrides.pop("rule"), overrides
    raise TypeError(f"rules[{role!r}] must be a rule name, a (rule, {{hyperparameters}}) pair or a dict with a "
                    f"'rule' key; got {spec!r}")


def partition(model: nn.Module, rules: Optional[Mapping[str, RuleSpec]] = None, *,
              head: Union[nn.Module, Tensor, None] = None) -> Partition:
    """Param groups for ``model``: one per role present, in role order, with the role's rule.

    ``rules`` maps a role name ("embedding", "head", "vector", "hidden") to a rule name or to
    ``(rule, {hyperparameter: value})``; roles not given keep :data:`DEFAULT_RULES`. A role name
    that does not exist is an error; rule names are checked by the optimizer.
    """
    merged: dict[str, RuleSpec] = dict(DEFAULT_RULES)
    for role, spec in (rules or {}).items():
        if role not in DEFAULT_RULES:
            raise ValueError(f"rules has unknown role {role!r}; roles are {list(DEFAULT_RULES)}")
        merged[role] = spec
    roles = classify(model, head=head)
    named = dict(model.named_parameters())
    groups: list[dict[str, Any]] = []
    for role in Role:
        names = [n for n, r in roles.items() if r is role]
        if not names:
            continue
        rule, overrides = _parse_rule(role.value, merged[role.value])
        groups.append({"params": [named[n] for n in names], "param_names": names, "role": role.value,
                       "rule": rule, **overrides})
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return Partition(groups=groups, roles=roles)
