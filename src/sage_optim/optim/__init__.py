"""Optimizer classes (torch.optim's layer 2): validate, create state lazily, dispatch to functional."""
from ._base import NonFiniteGradientError, RuleOptimizer, StateBytes
from .hybrid import SinkSAGE
from .sage import SAGE, Lion
from .sinkgd import SinkGD

__all__ = ["SAGE", "Lion", "SinkGD", "SinkSAGE", "RuleOptimizer", "StateBytes", "NonFiniteGradientError"]
