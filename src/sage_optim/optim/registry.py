"""Name → optimizer factory for every optimizer and baseline (shared by Python, the CLI and the tests).

Each entry builds an optimizer for a model with the paper's learning rate unless ``lr`` is given
(SPEC §5: AdamW 1e-4, Lion 1e-4, SinkGD 2e-4 with scale 100, SAGE 2e-3 with SinkGD scale 10 uniform).
Baselines that are hybrids are :class:`~sage_optim.SinkSAGE` configurations, not new classes.

Notes on choices the paper leaves open (documented, not silent):

* ``sinkgd-pure`` / ``sinkgd-hybrid`` use the SinkGD paper's "sr" convention with scale 100 (so its
  dense step is 2e-2 in SR units, SPEC §5). Vectors cannot be Sinkhorn-normalised; in
  ``sinkgd-pure`` they use AdamW at the same lr. ``sinkgd-hybrid`` runs both parts at one lr, as the paper
  does, unless given ``embed_lr`` for its AdamW part: on cpu-bench SinkGD alone (``sinkgd-pure``) is best at
  lr 6.32e-6 and AdamW at 1e-3 (docs/results.md §4), so one shared lr cannot suit both parts.
* ``adamw`` takes ``embed_lr`` too (default: none, one lr): torch's AdamW with the embedding, head and
  vectors in a group at that lr, so that a hybrid tuned on two lrs can be compared with an AdamW tuned
  on the same two (``sage-optim sweep --optimizer adamw --param embed_lr``).
* ``muon-hybrid`` is torch's ``Muon`` (as rule "muon", ``adjust_lr_fn="match_rms_adamw"``) for hidden
  matrices and AdamW elsewhere, one lr (1e-3, not from the paper, which has no Muon run) unless given
  ``embed_lr`` for its AdamW part.
* ``lion-hybrid`` keeps SAGE-hybrid's dense part (SinkGD uniform, scale 10, lr 2e-3) and gives the
  Lion groups ``embed_lr`` (default: Lion's paper lr 1e-4). ``sage-hybrid`` (and its ablation variants)
  take ``embed_lr`` too (default: none, the SAGE groups share ``lr``, as in the paper), so that ablation (a)
  can tune every embedding rule's lr with the dense part fixed (``sage-optim sweep --param embed_lr``).
* ``apollo`` is APOLLO-Mini from the optional ``apollo-torch`` package (1.0.3): rank-1 random projection,
  tensor-wise scaling, scale 128 (its README's APOLLO-Mini value), projection gap 200, for the hidden
  (attention and MLP) matrices; apollo-torch's AdamW for embeddings, head and vectors. lr 1e-4 is the
  paper's APOLLO lr (SPEC §5); APOLLO's own README uses 1e-2 for its C4 runs. State is counted from
  shapes (apollo-torch cannot step on the meta device: it draws its projection from a device RNG).
* ``adam-mini`` is Adam-mini from the optional ``adam-mini`` package (1.1.1), with dim / n_heads /
  n_kv_heads from the model's Hugging Face config (or ``dim=``, ``n_heads=``, ``n_kv_heads=``). The
  paper has no Adam-mini run; its README says to use AdamW's hyperparameters, so lr 1e-4, betas
  (0.9, 0.999), eps 1e-8. It exempts norm gains and biases from weight decay (its rule, kept).
* Both come with ``pip install "sage-optim[baselines]"`` and are imported only when built; without the
  package, building one raises an ``ImportError`` naming the extra (:func:`unavailable_reason` says so
  without building).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..routing import Role, classify
from .hybrid import SinkSAGE
from .sage import Lion

__all__ = ["create_optimizer", "available_optimizers", "default_lr", "unavailable_reason", "RegistryEntry",
           "REGISTRY", "ABLATIONS"]

_NON_DENSE = ("embedding", "head", "vector")


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    factory: Callable[..., torch.optim.Optimizer]
    default_lr: float
    description: str
    #: top-level modules of optional packages the factory imports (checked by :func:`unavailable_reason`)
    requires: tuple[str, ...] = ()
    #: a configuration that exists for a controlled ablation (:data:`ABLATIONS`), not a baseline of its own
    ablation: bool = False


def _adamw(model: nn.Module, *, lr: float, weight_decay: float, embed_lr: Optional[float] = None,
           **kw: Any) -> torch.optim.Optimizer:
    kw.setdefault("betas", (0.9, 0.999))
    if embed_lr is None:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **kw)
    # the control for the hybrids' two learning rates: the same split (hidden matrices at lr, embedding,
    # head and vectors at embed_lr), with torch's AdamW on both sides
    named = dict(model.named_parameters())
    by_role: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    for name, role in classify(model).items():
        by_role[role is Role.HIDDEN].append(named[name])
    groups = [{"params": by_role[True], "role": "hidden"},
              {"params": by_role[False], "lr": embed_lr, "role": "embedding/head/vector"}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay, **kw)


def _lion(model: nn.Module, *, lr: float, weight_decay: float, **kw: Any) -> torch.optim.Optimizer:
    return Lion(model.named_parameters(), lr=lr, weight_decay=weight_decay, **kw)


def _non_dense_rules(rule: str, embed_lr: Optional[float]) -> dict[str, Any]:
    """``rules=`` for SinkSAGE: ``rule`` for embedding, head and vectors (hidden unchanged), at ``embed_lr``
    when given, else at the optimizer's lr."""
    return {role: rule if embed_lr is None else (rule, {"lr": embed_lr}) for role in _NON_DENSE}


def _sage_hybrid(model: nn.Module, *, lr: float, weight_decay: float, embed_lr: Optional[float] = None,
                 **kw: Any) -> torch.optim.Optimizer:
    if embed_lr is not None:  # the SAGE groups at their own lr (ablation (a)'s embed_lr sweep); dense lr unchanged
        if "rules" in kw:
            raise ValueError("sage-hybrid: give embed_lr or rules, not both (embed_lr sets the embedding, head "
                             "and vector rules to SAGE at that lr)")
        kw["rules"] = _non_dense_rules("sage", embed_lr)
    return SinkSAGE(model, lr=lr, weight_decay=weight_decay, **kw)


def _sage_pure(model: nn.Module, *, lr: float, weight_decay: float, **kw: Any) -> torch.optim.Optimizer:
    return SinkSAGE(model, lr=lr, weight_decay=weight_decay, rules={"hidden": "sage"}, **kw)


def _sinkgd_hybrid(model: nn.Module, *, lr: float, weight_decay: float, embed_lr: Optional[float] = None,
                   **kw: Any) -> torch.optim.Optimizer:
    kw.setdefault("sinkgd_scale", 100.0)
    kw.setdefault("normalization", "sr")
    return SinkSAGE(model, lr=lr, weight_decay=weight_decay, rules=_non_dense_rules("adamw", embed_lr), **kw)


def _sinkgd_pure(model: nn.Module, *, lr: float, weight_decay: float, **kw: Any) -> torch.optim.Optimizer:
    kw.setdefault("sinkgd_scale", 100.0)
    kw.setdefault("normalization", "sr")
    rules = {"embedding": "sinkgd", "head": "sinkgd", "vector": "adamw"}
    return SinkSAGE(model, lr=lr, weight_decay=weight_decay, rules=rules, **kw)


def _lion_hybrid(model: nn.Module, *, lr: float, weight_decay: float, embed_lr: float = 1e-4,
                 **kw: Any) -> torch.optim.Optimizer:
    rules = _non_dense_rules("lion", embed_lr)
    return SinkSAGE(model, lr=lr, weight_decay=weight_decay, rules=rules, **kw)


def _hybrid_embed_adamw(model: nn.Module, *, lr: float, weight_decay: float, embed_lr: float = 1e-4,
                        **kw: Any) -> torch.optim.Optimizer:
    rules = _non_dense_rules("adamw", embed_lr)
    return SinkSAGE(model, lr=lr, weight_decay=weight_decay, rules=rules, **kw)


def _with_defaults(factory: Callable[..., torch.optim.Optimizer], **defaults: Any) -> Callable[..., torch.optim.Optimizer]:
    def build(model: nn.Module, *, lr: float, weight_decay: float, **kw: Any) -> torch.optim.Optimizer:
        return factory(model, lr=lr, weight_decay=weight_decay, **{**defaults, **kw})
    return build


def _muon_hybrid(model: nn.Module, *, lr: float, weight_decay: float, embed_lr: Optional[float] = None,
                 **kw: Any) -> torch.optim.Optimizer:
    # note: torch's Muon with adjust_lr_fn="match_rms_adamw" scales its update to AdamW's RMS, so one lr can
    # serve both the Muon (hidden) and the AdamW (embedding/head/vector) groups; embed_lr splits them.
    rules = {"hidden": "muon", **_non_dense_rules("adamw", embed_lr)}
    return SinkSAGE(model, lr=lr, weight_decay=weight_decay, rules=rules, **kw)


def _apollo(model: nn.Module, *, lr: float, weight_decay: float, **kw: Any) -> torch.optim.Optimizer:
    return _optional_module("apollo", "._apollo").Apollo(model, lr=lr, weight_decay=weight_decay, **kw)


def _adam_mini(model: nn.Module, *, lr: float, weight_decay: float, **kw: Any) -> torch.optim.Optimizer:
    return _optional_module("adam-mini", "._adam_mini").AdamMini(model, lr=lr, weight_decay=weight_decay, **kw)


REGISTRY: dict[str, RegistryEntry] = {e.name: e for e in [
    RegistryEntry("adamw", _adamw, 1e-4, "torch.optim.AdamW, betas (0.9, 0.999)"),
    RegistryEntry("lion", _lion, 1e-4, "Lion on every parameter"),
    RegistryEntry("sinkgd-pure", _sinkgd_pure, 2e-4, "SinkGD (sr, scale 100) on every matrix; AdamW for vectors"),
    RegistryEntry("sinkgd-hybrid", _sinkgd_hybrid, 2e-4, "SinkGD (sr, scale 100) hidden + AdamW embedding/head/vectors"),
    RegistryEntry("lion-hybrid", _lion_hybrid, 2e-3, "SinkGD (uniform, scale 10) hidden + Lion (embed_lr 1e-4) elsewhere"),
    RegistryEntry("sage-pure", _sage_pure, 2e-3, "SAGE on every parameter"),
    RegistryEntry("sage-hybrid", _sage_hybrid, 2e-3, "SinkGD (uniform, scale 10) hidden + SAGE embedding/head/vectors"),
    RegistryEntry("muon-hybrid", _muon_hybrid, 1e-3, "torch Muon (match_rms_adamw) hidden + AdamW embedding/head/vectors"),
    RegistryEntry("sage-hybrid-bf16", _with_defaults(_sage_hybrid, state_dtype=torch.bfloat16), 2e-3,
                  "sage-hybrid with bf16 momentum (round to nearest)"),
    RegistryEntry("sage-hybrid-int8", _with_defaults(_sage_hybrid, state_dtype=torch.int8), 2e-3,
                  "sage-hybrid with 8-bit block-quantised momentum (stochastic rounding)"),
    RegistryEntry("apollo", _apollo, 1e-4, "APOLLO-Mini (apollo-torch: rank 1, tensor-wise, scale 128) hidden + "
                  "AdamW embedding/head/vectors", requires=("apollo_torch", "bitsandbytes", "transformers", "numpy")),
    RegistryEntry("adam-mini", _adam_mini, 1e-4, "Adam-mini (adam-mini): one second moment per head/row/tensor",
                  requires=("adam_mini",)),
    RegistryEntry("hybrid-embed-adamw", _hybrid_embed_adamw, 2e-3, "sage-hybrid's dense part + AdamW "
                  "(embed_lr 1e-4) for embedding/head/vectors", ablation=True),
    RegistryEntry("hybrid-embed-sage-no-instant", _with_defaults(_sage_hybrid, instant_damper=False), 2e-3,
                  "sage-hybrid without the instantaneous damper term", ablation=True),
    RegistryEntry("hybrid-embed-sage-code-compat", _with_defaults(_sage_hybrid, code_compat=True), 2e-3,
                  "sage-hybrid with the released code's momentum order (code_compat=True)", ablation=True),
]}

#: The controlled ablations of the reproduction (same seeds, same tokens; ``sage-optim compare --ablation``):
#: the embedding/head/vector rule under one fixed dense optimizer (SinkGD uniform, scale 10, lr 2e-3); the
#: "embedding dilemma" (one rule everywhere vs the hybrids); bf16 vs fp32 SAGE momentum.
ABLATIONS: dict[str, list[str]] = {
    "embedding-rule": ["hybrid-embed-adamw", "lion-hybrid", "sage-hybrid", "hybrid-embed-sage-no-instant",
                       "hybrid-embed-sage-code-compat"],
    "embedding-dilemma": ["sinkgd-pure", "sinkgd-hybrid", "sage-pure", "sage-hybrid"],
    "bf16-momentum": ["sage-hybrid", "sage-hybrid-bf16"],
    "int8-momentum": ["sage-hybrid", "sage-hybrid-bf16", "sage-hybrid-int8"],
}

_EXTRA = 'pip install "sage-optim[baselines]"'
_PACKAGE_OF = {"apollo_torch": "apollo-torch", "adam_mini": "adam-mini"}


def available_optimizers(include_ablations: bool = False) -> list[str]:
    """Registry names, in a stable order (the ablation-only configurations when ``include_ablations``)."""
    return [name for name, entry in REGISTRY.items() if include_ablations or not entry.ablation]


def default_lr(name: str) -> float:
    return _entry(name).default_lr


def unavailable_reason(name: str) -> Optional[str]:
    """Why optimizer ``name`` cannot be built here (an optional package is missing), or ``None`` if it can.

    Only looks the packages up (``importlib.util.find_spec``); nothing is imported.
    """
    missing = [_PACKAGE_OF.get(m, m) for m in _entry(name).requires if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return f"needs the optional package{'s' if len(missing) > 1 else ''} {', '.join(missing)}: {_EXTRA}"


def _optional_module(name: str, module: str) -> Any:
    reason = unavailable_reason(name)
    if reason is not None:
        raise ImportError(f"optimizer {name!r} is not available: {reason}")
    return importlib.import_module(module, __package__)


def _entry(name: str) -> RegistryEntry:
    if name not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {available_optimizers(include_ablations=True)}")
    return REGISTRY[name]


def create_optimizer(name: str, model: nn.Module, *, lr: Optional[float] = None, weight_decay: float = 0.01,
                     **overrides: Any) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model`` (paper lr unless ``lr``; weight decay 0.01 on every parameter).

    ``overrides`` go to the optimizer's constructor (e.g. ``state_dtype="bfloat16"``, ``foreach=True``).
    """
    entry = _entry(name)
    return entry.factory(model, lr=entry.default_lr if lr is None else lr, weight_decay=weight_decay, **overrides)
