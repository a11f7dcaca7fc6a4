"""Checkpoints: atomic writes, the last K kept, and one-line errors for bad files.

A checkpoint is one ``torch.save`` file ``ckpt-<step>.pt`` holding the model, optimizer and
scheduler state dicts, the step, the data sampler's position, the RNG states (torch, CUDA, numpy,
python) and the run config. It is written to a temporary file in the same directory, flushed and
fsynced, then moved into place with ``os.replace``: a crash leaves either the old set of
checkpoints or the new one, never a half-written file under a checkpoint's name. Older
checkpoints are pruned only after the new one is in place.

Files are read with ``torch.load(weights_only=True)``: no code runs from a checkpoint. A CRC-32 of
every tensor's bytes is stored with them and checked on load, because torch's zip reader notices a
truncated file but not flipped bytes inside a tensor.
"""
from __future__ import annotations

import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_write

__all__ = ["CheckpointError", "FORMAT", "checkpoint_path", "list_checkpoints", "latest_checkpoint",
           "save_checkpoint", "load_checkpoint"]

FORMAT = "sage-optim-checkpoint/1"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not belong to this run; the message is one line."""


def checkpoint_path(out_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(out_dir) / f"ckpt-{step:08d}.pt"


def list_checkpoints(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Checkpoints in ``out_dir``, oldest step first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def _encode(obj: Any) -> Any:
    """numpy arrays/scalars (numpy's RNG state) as tensors/Python numbers, so weights_only loading works."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(obj.copy())}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_encode(v) for v in obj)
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode(v) for v in obj)
    return obj


def _tensor_crc32(obj: Any, crc: int = 0) -> int:
    """CRC-32 over the bytes of every tensor in ``obj``, in a fixed traversal order."""
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().reshape(-1)
        return zlib.crc32(flat.view(torch.uint8).numpy(), crc) if flat.numel() else crc
    if isinstance(obj, dict):
        for key in sorted(obj, key=repr):
            crc = _tensor_crc32(obj[key], zlib.crc32(repr(key).encode(), crc))
        return crc
    if isinstance(obj, (list, tuple)):
        for item in obj:
            crc = _tensor_crc32(item, crc)
    return crc


def save_checkpoint(out_dir: str | os.PathLike[str], step: int, payload: dict[str, Any], *,
                    keep_last: int = 2) -> Path:
    """Write ``payload`` (plus format and step) as ``ckpt-<step>.pt`` atomically; keep the newest ``keep_last``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(out, step)
    data = _encode({"format": FORMAT, "step": step, **payload})
    data["tensor_crc32"] = _tensor_crc32(data)
    try:
        atomic_write(final, lambda f: torch.save(data, f))
    except OSError as exc:  # disk full, quota, permissions: the earlier checkpoints are untouched
        raise CheckpointError(f"could not write checkpoint {final} ({exc.strerror or exc}); earlier checkpoints "
                              f"in {out} are intact: free space or pick another --out, then --resume") from exc
    # the directory entry itself must reach the disk too, or a crash can lose the rename
    dir_fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(out)[:-keep_last]:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint; raise :class:`CheckpointError` (one line) if it is truncated, corrupt or foreign."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad bytes
        reason = " ".join(str(exc).split()).split(". ")[0][:160] or type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt: {reason}); "
                              "delete it to resume from an earlier one") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sage-optim checkpoint (expected format {FORMAT!r})")
    if data.pop("tensor_crc32", None) != _tensor_crc32(data):
        raise CheckpointError(f"checkpoint {path} is corrupt (tensor checksum mismatch); "
                              "delete it to resume from an earlier one")
    missing = [k for k in ("step", "model", "optimizer", "scheduler", "sampler", "rng", "config") if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return _decode(data)
