"""Crash-safe file writes, shared by the data cache, checkpoints and run outputs."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "atomic_write_text", "tmp_sibling"]


def tmp_sibling(path: Path) -> Path:
    """A unique temporary name in ``path``'s directory (same filesystem, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file so that ``path`` holds either its old content or all of the new: a temporary sibling,
    flushed and fsynced, then ``os.replace``. A failure (or an interrupt) removes the temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
