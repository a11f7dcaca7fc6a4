"""sage-optim: memory-efficient LLM optimizers (SAGE, SinkGD, SinkSAGE)."""
__version__ = "0.1.0"
__all__: list[str] = ["__version__"]
