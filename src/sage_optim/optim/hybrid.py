"""SinkSAGE: the SinkGD+SAGE hybrid as one torch.optim.Optimizer whose groups carry role and rule."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..routing import RuleSpec, partition
from ._base import RuleOptimizer
from ._docs import COMMON_ARGS, STATE_DTYPE_ARG
from ._rules import RULES

__all__ = ["SinkSAGE"]


class SinkSAGE(RuleOptimizer):
    __doc__ = r"""The SinkGD+SAGE hybrid (Lee & Kim 2026, arXiv:2604.07663): SinkGD for hidden matrices, SAGE
    for embeddings, the output head and vectors, routed by *role* from the module tree (SPEC §4).

    | role      | parameters                                             | default rule                    |
    |-----------|--------------------------------------------------------|---------------------------------|
    | embedding | weights of ``nn.Embedding`` modules                    | SAGE                            |
    | head      | ``get_output_embeddings()`` or ``head=`` (once if tied) | SAGE                            |
    | vector    | ndim ≤ 1 (norm gains, biases)                          | SAGE (element-wise s_t)         |
    | hidden    | every other ndim ≥ 2 parameter                         | SinkGD (uniform, scale 10, L 5) |

    Baselines are configurations: ``rules={"embedding": "adamw", "head": "adamw", "vector": "adamw"}`` is
    the SinkGD-AdamW hybrid, ``"lion"`` for those roles the Lion hybrid. A rule may come with overrides:
    ``rules={"embedding": ("adamw", {"lr": 1e-4})}``. ``lr`` and ``weight_decay`` apply to every group;
    ``betas``/``eps`` to SAGE and Lion groups (AdamW groups keep (0.9, 0.999) unless overridden).

    Args:
        model_or_param_groups: an ``nn.Module`` (partitioned with :func:`sage_optim.partition`) or a list of
            param-group dicts, each with a ``rule`` ("sage", "sinkgd", "lion", "adamw") and optionally ``role``.
        lr (float): η for every group. Default ``2e-3``.
        betas, eps, weight_decay: as in :class:`SAGE`. Defaults ``(0.9, 0.99)``, ``1e-8``, ``1e-2``.
        sinkgd_scale (float): SinkGD's ``scale`` for hidden matrices. Default ``10.0``.
        sinkgd_iters (int): SinkGD's ``iters``. Default ``5``.
        normalization ("uniform" | "sr"): SinkGD's convention. Default ``"uniform"``.
        head (nn.Module | Parameter | None): the output layer, when ``get_output_embeddings()`` does not give it.
        rules (dict): role → rule (or (rule, overrides)); unspecified roles keep the defaults above.
        code_compat, instant_damper: as in :class:`SAGE`.
{state_dtype_arg}
{common_args}

    ``print(opt.partition)`` shows name, shape, role, rule and state bytes per parameter;
    ``opt.state_nbytes()`` totals them (``.by_role``, ``.by_rule``). The partition is kept in the
    state dict (each group's ``role``, ``rule`` and ``param_names``): loading a state dict from another
    partition raises an error naming the difference.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 16))
        >>> opt = SinkSAGE(model)
        >>> sorted({g["role"]: g["rule"] for g in opt.param_groups}.items())
        [('embedding', 'sage'), ('hidden', 'sinkgd'), ('vector', 'sage')]
    """.replace("{state_dtype_arg}", STATE_DTYPE_ARG).replace("{common_args}", COMMON_ARGS)

    def __init__(self, model_or_param_groups: Union[nn.Module, list[dict[str, Any]]], lr: float = 2e-3,
                 betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 sinkgd_scale: float = 10.0, sinkgd_iters: int = 5, normalization: str = "uniform",
                 head: Union[nn.Module, Tensor, None] = None, rules: Optional[Mapping[str, RuleSpec]] = None,
                 code_compat: bool = False, instant_damper: bool = True, foreach: Optional[bool] = None,
                 maximize: bool = False, state_dtype: Union[torch.dtype, str, None] = None,
                 nonfinite: str = "raise", compile: bool = False, fused: Optional[bool] = None,
                 verify_every: Optional[int] = None) -> None:
        if isinstance(model_or_param_groups, nn.Module):
            groups = partition(model_or_param_groups, rules, head=head).groups
        else:
            if rules is not None or head is not None:
                raise ValueError("rules= and head= need a model; with explicit param groups, put 'rule' in each group")
            groups = list(model_or_param_groups)
            for i, group in enumerate(groups):
                if not isinstance(group, dict) or "rule" not in group:
                    raise TypeError(f"SinkSAGE needs an nn.Module or param-group dicts with a 'rule' key; item {i} "
                                    f"is {type(group).__name__}{'' if not isinstance(group, dict) else ' without rule'}")
        # lr and weight_decay (and state_dtype, where a rule keeps momentum) reach every rule, derived from
        # RULES so that a rule added there cannot silently keep its own lr (Muon once did)
        rule_defaults = {name: {"lr": lr, "weight_decay": weight_decay,
                                **({"state_dtype": state_dtype} if "state_dtype" in rule.defaults else {})}
                         for name, rule in RULES.items()}
        rule_defaults["sage"].update(betas=betas, eps=eps, code_compat=code_compat, instant_damper=instant_damper)
        rule_defaults["lion"].update(betas=betas)
        rule_defaults["sinkgd"].update(scale=sinkgd_scale, iters=sinkgd_iters, normalization=normalization, eps=eps)
        super().__init__(groups, rule_defaults=rule_defaults, allowed_rules=tuple(RULES), default_rule=None,
                         foreach=foreach, maximize=maximize, nonfinite=nonfinite,
                         compile=compile, verify_every=verify_every, fused=fused)
