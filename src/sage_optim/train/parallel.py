"""Data parallelism for the harness: ``train.parallel`` = "none", "ddp" or "fsdp" (FSDP2).

Every rank builds the same model (same seed) and the same window sampler, draws the same global
micro-batch each step and keeps its own contiguous slice of rows (:meth:`Parallel.shard_rows`).
DDP and FSDP2 average the gradients over ranks, so each update equals the single-process update on
the global batch; the loss the harness logs is the mean over ranks (:meth:`Parallel.mean`).

Checkpoints keep the single-process format: full (unsharded) state dicts on CPU, the optimizer's
state keyed by parameter index, written by rank 0 only. A checkpoint from a 2-rank run therefore
loads in a 1-rank run and back (:meth:`Parallel.state_dicts`, :meth:`Parallel.load_state_dicts`).

Started without torchrun, "ddp"/"fsdp" run on a one-rank process group of their own (gloo or NCCL),
which is how the single-process path of the wrappers is tested.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .config import ConfigError

__all__ = ["Muted", "Parallel", "setup_parallel"]


@dataclass
class Parallel:
    """How this process takes part in the run: ``mode`` ("none", "ddp", "fsdp"), ``rank`` of ``world_size``."""

    mode: str
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    owns_group: bool = False  # this module created the process group, so :meth:`close` destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    # -- data -----------------------------------------------------------------------------------

    def shard_rows(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's contiguous rows of the global micro-batch ``(x, y)``."""
        if self.world_size == 1:
            return batch
        x, y = batch
        rows = x.shape[0] // self.world_size
        lo = self.rank * rows
        return x[lo:lo + rows], y[lo:lo + rows]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar tensor over ranks (every rank gets it); the tensor itself without ranks."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        total = value.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)  # gloo has no AVG
        return total / self.world_size

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. tokenizing into the cache), the other ranks after it."""
        if self.world_size > 1 and not self.is_main:
            self.barrier()
        yield
        if self.world_size > 1 and self.is_main:
            self.barrier()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    # -- model ----------------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP or FSDP2 around ``model``; build the optimizer from what this returns."""
        if self.mode == "fsdp":
            from ..distributed.fsdp import apply_fsdp2

            return apply_fsdp2(model)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            assert self.device is not None
            ids = [self.device] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        return model

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The model DDP wraps (FSDP2 shards in place, so an FSDP model is its own)."""
        return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model

    @staticmethod
    def scalar(value: torch.Tensor) -> float:
        """``value.item()``, for a DTensor too (clip_grad_norm_'s total norm under FSDP2)."""
        full = getattr(value, "full_tensor", None)
        return float(full() if full is not None else value)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Full model and optimizer state dicts in the single-process format, on rank 0; empty on the others.

        A collective under DDP/FSDP2: call it on every rank."""
        if not self.distributed:
            return model.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        _init_state(optimizer)  # get_state_dict would otherwise step a fresh optimizer with zero grads
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        if not self.is_main:  # cpu_offload gathers onto rank 0 only
            return {}, {}
        return model_sd, _optim_by_index(optim_sd, _param_fqns(model, optimizer))

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict,
                         optim_sd: dict) -> None:
        """Load full single-process state dicts (every rank holds them) into the wrapped model and optimizer."""
        if not self.distributed:
            model.load_state_dict(model_sd)
            optimizer.load_state_dict(optim_sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        _init_state(optimizer)  # set_state_dict would otherwise step a fresh optimizer with zero grads
        set_state_dict(model, optimizer, model_state_dict=model_sd,
                       optim_state_dict=_optim_by_fqn(optim_sd, _param_fqns(model, optimizer)),
                       options=StateDictOptions(full_state_dict=True))

    def close(self) -> None:
        if self.owns_group:
            from ..distributed import close_process_group

            close_process_group()
            self.owns_group = False


def setup_parallel(mode: str, device: torch.device, *, micro_batch_size: int) -> Parallel:
    """Join (or, for ddp/fsdp without torchrun, create) the process group; check the batch splits evenly."""
    in_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if mode == "none":
        if in_torchrun and int(os.environ["WORLD_SIZE"]) > 1:
            raise ConfigError("started by torchrun with several processes but without --fsdp or --ddp "
                              "(train.parallel); every rank would train the same model alone")
        return Parallel("none", device=device)
    import torch.distributed as dist

    from ..distributed.fsdp import init_from_env

    owns = False
    if in_torchrun:
        env = init_from_env(device=device.type)
        rank, world, dev, owns = env.rank, env.world_size, env.device, env.initialized
    else:  # one process: a process group of one, so DDP/FSDP2 run unchanged
        dev = device
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            owns = True
        rank, world = dist.get_rank(), dist.get_world_size()
    par = Parallel(mode, rank=rank, world_size=world, device=dev, owns_group=owns)
    atexit.register(par.close)  # also when the run ends in an error
    if micro_batch_size % world:
        par.close()
        raise ConfigError(f"train.micro_batch_size={micro_batch_size} does not split over {world} ranks "
                          f"(--{mode}); use a multiple of {world}")
    return par


def _init_state(optimizer: torch.optim.Optimizer) -> None:
    if hasattr(optimizer, "_init_state"):  # sage-optim optimizers; torch's state is made by its first step
        from ..distributed.checkpoint import init_optimizer_state

        init_optimizer_state(optimizer)


def _param_fqns(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name (as in the unwrapped model's state dict) of each optimizer parameter, in index order."""
    names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _optim_by_index(optim_sd: dict, fqns: list[str]) -> dict:
    """FQN-keyed optimizer state (``get_state_dict``) -> the index-keyed form of ``optimizer.state_dict()``."""
    index = {name: i for i, name in enumerate(fqns)}
    return {"state": {index[name]: s for name, s in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [index[name] for name in g["params"]]}
                             for g in optim_sd["param_groups"]]}


def _optim_by_fqn(optim_sd: dict, fqns: list[str]) -> dict:
    """The inverse of :func:`_optim_by_index`."""
    return {"state": {fqns[int(i)]: s for i, s in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]}
                             for g in optim_sd["param_groups"]]}


class Muted:
    """Stands in for the metrics log, progress bar and log function on ranks other than 0: does nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> "Muted":
        return self
