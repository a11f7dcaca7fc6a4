"""APOLLO / APOLLO-Mini (Zhu et al. 2024, arXiv:2412.05270) from the optional ``apollo-torch`` package.

Imported only by the registry's ``apollo`` factory, after it has checked the package is installed
(``pip install "sage-optim[baselines]"``). The update itself is the package's; this module routes the
parameters by role, makes the state dict loadable with ``torch.load(weights_only=True)`` and counts
the state.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator, Union

from torch import Tensor, nn


@contextlib.contextmanager
def _quiet_import(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


# note: apollo_torch/__init__.py also imports its 8-bit variants, hence bitsandbytes, which at import logs
# a warning about an unrelated optional kernel package and triggers torch.jit deprecation warnings; we use
# neither, so both are muted for this import only.
with _quiet_import("bitsandbytes"):
    from apollo_torch.apollo import AdamW as _ApolloAdamW

from ..routing import PartitionReport, PartitionRow, partition
from ._base import StateBytes

__all__ = ["Apollo"]

_log = logging.getLogger("sage_optim.optim")
_PROJ_TYPES = ("std", "reverse_std", "left", "right")
_SCALE_TYPES = ("tensor", "channel")


def _low_rank_numels(shape: tuple[int, ...], rank: int, proj_type: str) -> tuple[int, int]:
    """(elements of each moment, elements of the projection) for a ``shape`` matrix, as apollo-torch's
    ``GradientProjector`` builds them: G Pᵀ with P r×cols ("right"), or Pᵀ G with P rows×r ("left")."""
    rows, cols = shape
    right = {"std": rows >= cols, "reverse_std": rows < cols, "right": True, "left": False}[proj_type]
    return (rows * rank, rank * cols) if right else (rank * cols, rows * rank)


class Apollo(_ApolloAdamW):
    r"""APOLLO-Mini by default (APOLLO with ``rank`` > 1 and ``scale_type="channel"``), as its authors ship it
    in ``apollo-torch`` 1.0.3, for the attention and MLP matrices; AdamW for everything else.

    Routing is by role (:func:`sage_optim.routing.classify`): ``hidden`` matrices (attention and MLP
    projections of a Llama) get the low-rank auxiliary state; embeddings, the output head and vectors
    get apollo-torch's plain AdamW update, as in APOLLO's own training scripts. For a hidden W ∈ ℝ^{m×n}
    with m ≥ n (the left-hand product otherwise; ``proj_type``):

    .. code-block:: text

        P   = N(0, 1/r)^{r×n}, seeded per parameter, redrawn every update_proj_gap steps
        R_t = G_t Pᵀ                                    (m × r: the only moments kept)
        M_t = β₁ M_{t-1} + (1-β₁) R_t,   V_t = β₂ V_{t-1} + (1-β₂) R_t²
        s_t = ‖M_t / (√V_t + ε)‖ / (‖R_t‖ + 1e-8)       (tensor-wise; per channel with "channel")
        U_t = limiter(s_t G_t)                          (Fira's norm-growth limiter: ‖U_t‖ ≤ 1.01 ‖U_{t-1}‖)
        W  ← W − η √(1-β₂ᵗ)/(1-β₁ᵗ) · √scale · U_t − η λ W

    Args:
        model (nn.Module): the model; its hidden matrices must be 2-D.
        lr (float): η for every group. Default ``1e-4`` (SPEC §5, the SAGE paper's APOLLO lr).
        betas (tuple[float, float]): Default ``(0.9, 0.999)``.
        eps (float): Default ``1e-6`` (apollo-torch's).
        weight_decay (float): decoupled, on every parameter. Default ``1e-2``.
        rank (int): r, the rank of the auxiliary space. Default ``1`` (APOLLO-Mini).
        scale (float): the update is multiplied by √scale. Default ``128`` (APOLLO-Mini's, from the
            apollo-torch README: "128: Default value for APOLLO-Mini").
        scale_type ("tensor" | "channel"): Default ``"tensor"`` (APOLLO-Mini).
        proj_type ("std" | "reverse_std" | "left" | "right"): which side is projected. Default ``"std"``.
        update_proj_gap (int): steps between new random projections. Default ``200``.
        scale_front (bool): apply √scale before the norm-growth limiter. Default ``False``.
        disable_nl (bool): turn the norm-growth limiter off. Default ``False``.
        head (nn.Module | Parameter | None): the output layer, when ``get_output_embeddings()`` does not give it.

    State (per parameter; ``seed`` and ``step`` are Python ints, bytes at the parameter's dtype):
        hidden: ``exp_avg``, ``exp_avg_sq`` (m×r), ``projector_matrix`` (r×n), ``projector_seed``,
        ``scaled_grad`` (0-D, the limiter's last norm): (2·m·r + r·n + 1) elements for m ≥ n.
        others: ``exp_avg``, ``exp_avg_sq`` (shape of the parameter).
        In memory the projection lives in apollo-torch's ``GradientProjector`` object (``projector``);
        ``state_dict()`` stores it as ``projector_matrix`` + ``projector_seed`` and ``load_state_dict``
        rebuilds it, so checkpoints hold only tensors and numbers.

    ``print(opt.partition)`` lists which parameters are projected (rule ``apollo``) and which take AdamW;
    the same list is logged at INFO on the ``sage_optim.optim`` logger when the optimizer is built.

    Example:
        >>> from sage_optim.optim.registry import create_optimizer
        >>> model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 16))
        >>> opt = create_optimizer("apollo", model)
        >>> sorted({g["role"]: g["rule"] for g in opt.param_groups}.items())
        [('embedding', 'adamw'), ('hidden', 'apollo'), ('vector', 'adamw')]
    """

    def __init__(self, model: nn.Module, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 1e-2, *, rank: int = 1, scale: float = 128.0,
                 scale_type: str = "tensor", proj_type: str = "std", update_proj_gap: int = 200,
                 scale_front: bool = False, disable_nl: bool = False,
                 head: Union[nn.Module, Tensor, None] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Apollo needs the model (an nn.Module) to route by role, got {type(model).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        if scale_type not in _SCALE_TYPES:
            raise ValueError(f"scale_type must be one of {_SCALE_TYPES}, got {scale_type!r}")
        if proj_type not in _PROJ_TYPES:
            raise ValueError(f"proj_type must be one of {_PROJ_TYPES}, got {proj_type!r}")
        if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap < 1:
            raise ValueError(f"update_proj_gap must be a positive int, got {update_proj_gap!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        groups = partition(model, {"hidden": "apollo", "embedding": "adamw", "head": "adamw", "vector": "adamw"},
                           head=head).groups
        for group in groups:
            if group["rule"] != "apollo":
                continue
            for name, param in zip(group["param_names"], group["params"]):
                if param.ndim != 2:
                    raise ValueError(f"APOLLO projects 2-D matrices; hidden parameter {name!r} has shape "
                                     f"{tuple(param.shape)}")
            # note: apollo-torch takes a group as low-rank when it has "rank"; "proj" selects its random
            # projector (its SVD one is GaLore's, not APOLLO's).
            group.update(rank=rank, proj="random", scale_type=scale_type, scale=float(scale),
                         update_proj_gap=update_proj_gap, proj_type=proj_type)
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=True,
                         scale_front=scale_front, disable_nl=disable_nl)
        projected = [n for g in self.param_groups if g["rule"] == "apollo" for n in g["param_names"]]
        _log.info("APOLLO (rank %d, %s-wise scaling, scale %g) projects %d matrices: %s; AdamW for the other %d "
                  "parameters", rank, scale_type, scale, len(projected), ", ".join(projected),
                  sum(len(g["params"]) for g in self.param_groups) - len(projected))

    # ------------------------------------------------------------------------------ state
    def _param_state_nbytes(self, param: Tensor, group: dict[str, Any]) -> int:
        if "rank" not in group:
            return 2 * param.numel() * param.element_size()
        moment, projection = _low_rank_numels(tuple(param.shape), group["rank"], group["proj_type"])
        limiter = 0 if self.disable_nl else 1  # scaled_grad: the limiter's last norm, a 0-D tensor
        return (2 * moment + projection + limiter) * param.element_size()

    def state_nbytes(self) -> StateBytes:
        """Bytes of optimizer state kept between steps, from the shapes (exact before step 1; meta models too)."""
        return StateBytes.from_report(self.partition)

    @property
    def partition(self) -> PartitionReport:
        """Table of name, shape, role, rule ("apollo" = projected, or "adamw") and state bytes per parameter."""
        return PartitionReport([
            PartitionRow(name, tuple(p.shape), group["role"], group["rule"], self._param_state_nbytes(p, group))
            for group in self.param_groups for name, p in zip(group["param_names"], group["params"])])

    def state_dict(self) -> dict[str, Any]:
        """The state with each ``GradientProjector`` stored as ``projector_matrix`` and ``projector_seed``."""
        saved = super().state_dict()
        state = {}
        for index, per_param in saved["state"].items():
            per_param = dict(per_param)  # note: torch's state_dict shares these dicts with the live state
            projector = per_param.pop("projector", None)
            if projector is not None:
                per_param["projector_matrix"] = projector.ortho_matrix
                per_param["projector_seed"] = projector.seed
            state[index] = per_param
        return {**saved, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` and rebuild each parameter's ``GradientProjector``."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if "rank" not in group or not state or "projector_seed" not in state:
                    continue
                projector = self._initialize_projector(group, state)
                projector.ortho_matrix = state.pop("projector_matrix")
                projector.seed = state.pop("projector_seed")
                state["projector"] = projector
