"""Adam-mini (Zhang et al. 2024, arXiv:2406.16793) from the optional ``adam-mini`` package.

Imported only by the registry's ``adam-mini`` factory, after it has checked the package is installed
(``pip install "sage-optim[baselines]"``). The update is the package's; this module takes the model
shape it needs from the model's Hugging Face config, checks it, and counts and tabulates the state.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from adam_mini import Adam_mini
from torch import Tensor, nn

from ..routing import PartitionReport, PartitionRow, classify
from ._base import StateBytes

__all__ = ["AdamMini", "model_shape"]

_log = logging.getLogger("sage_optim.optim")


def model_shape(model: nn.Module, *, dim: Optional[int] = None, n_heads: Optional[int] = None,
                n_kv_heads: Optional[int] = None) -> tuple[int, int, int]:
    """(dim, n_heads, n_kv_heads) for Adam-mini: the given values, else the model's Hugging Face config
    (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, as in ``LlamaConfig``)."""
    config = getattr(model, "config", None)
    dim = dim if dim is not None else getattr(config, "hidden_size", None)
    n_heads = n_heads if n_heads is not None else getattr(config, "num_attention_heads", None)
    if dim is None or n_heads is None:
        raise ValueError(f"adam-mini needs the model's hidden size and number of attention heads, and "
                         f"{type(model).__name__} has no Hugging Face config with hidden_size and "
                         "num_attention_heads: pass dim=, n_heads= and n_kv_heads= (CLI: --opt.dim=... "
                         "--opt.n_heads=... --opt.n_kv_heads=...)")
    if n_kv_heads is None:
        n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    for key, value in (("dim", dim), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"adam-mini: {key} must be a positive int, got {value!r}")
    if n_heads % n_kv_heads:
        raise ValueError(f"adam-mini: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    head_dim = getattr(config, "head_dim", None) or dim // n_heads
    if dim % n_heads or head_dim * n_heads != dim:
        raise ValueError(f"adam-mini takes a q/k head to be dim²/n_heads weights, so it needs head_dim × n_heads "
                         f"== dim; got head_dim {head_dim}, n_heads {n_heads}, dim {dim}")
    return dim, n_heads, n_kv_heads


class AdamMini(Adam_mini):
    r"""Adam-mini as its authors ship it in ``adam-mini`` 1.1.1: Adam's first moment for every
    parameter, but one second-moment value per *block* instead of per coordinate.

    Blocks are chosen by parameter name (the package's rule, shown by ``print(opt.partition)``):

    | rule               | parameters (name contains)                              | v kept            |
    |--------------------|---------------------------------------------------------|-------------------|
    | ``adam-mini/head`` | ``q_proj``, ``k_proj`` (and ``wq``, ``wk``, ...)        | one per head      |
    | ``adam-mini/row``  | ``embed``, ``lm_head``, ``v_proj``, ``o_proj``, ``mlp`` | one per row       |
    | ``adam-mini/tensor`` | anything else (norm gains)                            | one per tensor    |
    | ``adam``           | ``bias``                                                | one per element   |

    .. code-block:: text

        m_t = β₁ m_{t-1} + (1-β₁) g_t
        v_t = β₂ v_{t-1} + (1-β₂) mean_{block}(g_t²)
        W  ← W (1 − η λ) − η m_t / ((1-β₁ᵗ) (√(v_t / (1-β₂ᵗ)) + ε))

    Args:
        model (nn.Module): the model (its ``named_parameters()`` give the names the blocks come from).
        lr (float): Default ``1e-4``: the package recommends AdamW's values, and this registry's AdamW
            lr is the paper's 1e-4 (SPEC §5).
        betas (tuple[float, float]): Default ``(0.9, 0.999)`` (AdamW's here).
        eps (float): Default ``1e-8`` (AdamW's here).
        weight_decay (float): Default ``1e-2``; the package exempts parameters whose name contains
            ``norm``, ``ln`` or ``bias`` (its rule, kept).
        dim, n_heads, n_kv_heads (int | None): the hidden size and (key/value) head counts; default
            from ``model.config`` (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``).

    State (per parameter, at the parameter's dtype; ``step`` and the block sizes are Python numbers):
        ``m`` (shape of the parameter) and ``vmean``: heads × 1 (``head``), rows × 1 (``row``),
        0-D (``tensor``); ``adam`` blocks keep ``m`` and ``v`` of the parameter's shape.

    Example:
        >>> from sage_optim.optim.registry import create_optimizer
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...                                      num_hidden_layers=1, num_attention_heads=2))
        >>> opt = create_optimizer("adam-mini", model)
        >>> sorted({row.rule for row in opt.partition.rows})
        ['adam-mini/head', 'adam-mini/row', 'adam-mini/tensor']
    """

    def __init__(self, model: nn.Module, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, dim: Optional[int] = None,
                 n_heads: Optional[int] = None, n_kv_heads: Optional[int] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"AdamMini needs the model (an nn.Module) for its parameter names, got "
                            f"{type(model).__name__}")
        dim, n_heads, n_kv_heads = model_shape(model, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        super().__init__(named, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, dim=dim, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, verbose=False)
        # note: the package sets world_size to torch.cuda.device_count() and all-gathers when it is > 1,
        # which fails in a single process on a multi-GPU machine; the process group's size is what it means.
        self.world_size = (torch.distributed.get_world_size()
                           if torch.distributed.is_available() and torch.distributed.is_initialized() else 1)
        roles = classify(model)
        self._names = {id(p): n for n, p in named}
        self._roles = {id(p): str(roles.get(n, "-")) for n, p in named}
        for group in self.param_groups:
            block = self._block(group["name"])
            for p in group["params"]:
                if block in ("adam-mini/head", "adam-mini/row") and p.ndim != 2:
                    raise ValueError(f"Adam-mini treats {self._names[id(p)]!r} as a matrix ({block}), but its "
                                     f"shape is {tuple(p.shape)}")
                if block == "adam-mini/head" and p.numel() % self.head_numel:
                    raise ValueError(f"Adam-mini splits {self._names[id(p)]!r} into heads of {self.head_numel} "
                                     f"weights (dim²/n_heads), but it has {p.numel()}")
        counts: dict[str, int] = {}
        for row in self.partition.rows:
            counts[row.rule] = counts.get(row.rule, 0) + 1
        _log.info("Adam-mini (dim %d, %d heads, %d kv heads) blocks: %s", dim, n_heads, n_kv_heads,
                  ", ".join(f"{rule} ×{n}" for rule, n in counts.items()))

    def _block(self, name: str) -> str:
        """The branch of ``Adam_mini.step`` a parameter named ``name`` (lower-cased) takes."""
        if any(k in name for k in self.adam_block_names):
            return "adam"
        if any(k in name for k in self.wqk_names):
            return "adam-mini/head"
        if any(k in name for names in (self.embd_names, self.output_names, self.wv_names, self.mlp_names,
                                       self.attn_proj_names) for k in names):
            return "adam-mini/row"
        return "adam-mini/tensor"

    def _param_state_nbytes(self, param: Tensor, block: str) -> int:
        second = {"adam": param.numel(), "adam-mini/head": param.numel() // self.head_numel,
                  "adam-mini/row": param.shape[0], "adam-mini/tensor": 1}[block]
        return (param.numel() + second) * param.element_size()

    def state_nbytes(self) -> StateBytes:
        """Bytes of optimizer state kept between steps, from the shapes (exact before step 1; meta models too)."""
        return StateBytes.from_report(self.partition)

    @property
    def partition(self) -> PartitionReport:
        """Table of name, shape, role, Adam-mini block and state bytes of every parameter."""
        rows = []
        for group in self.param_groups:
            block = self._block(group["name"])
            for p in group["params"]:
                rows.append(PartitionRow(self._names[id(p)], tuple(p.shape), self._roles[id(p)], block,
                                         self._param_state_nbytes(p, block)))
        return PartitionReport(rows)
