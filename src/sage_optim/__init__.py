"""sage-optim: memory-efficient LLM optimizers — SAGE, SinkGD and the SinkGD+SAGE hybrid (arXiv:2604.07663)."""
from .optim import SAGE, Lion, NonFiniteGradientError, SinkGD, SinkSAGE, StateBytes
from .routing import PartitionReport, Role, classify, partition

__version__ = "0.1.0"

__all__ = [
    "SAGE",
    "Lion",
    "SinkGD",
    "SinkSAGE",
    "Role",
    "classify",
    "partition",
    "PartitionReport",
    "StateBytes",
    "NonFiniteGradientError",
    "__version__",
]
