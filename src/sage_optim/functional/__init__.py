"""Pure functional update rules: lists of tensors in, in-place updates out (torch.optim's layer 1)."""
from .sage import column_abs_mean, sage
from .sinkgd import NORMALIZATIONS, sinkgd, sinkhorn_scalings

__all__ = ["sage", "sinkgd", "column_abs_mean", "sinkhorn_scalings", "NORMALIZATIONS"]
