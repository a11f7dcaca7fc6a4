"""``fused=True`` on CPU tensors: the C kernels of ``cpu_kernels.c``, built on first use and loaded with ctypes.

The build needs only a C compiler (``$CC``, else ``cc``/``gcc``/``clang``) — no Python or torch headers — and
takes about a second. The library is cached under ``$SAGE_OPTIM_CACHE`` (default ``~/.cache/sage-optim``)
/kernels, keyed by the source, the compiler, its flags and this CPU (it is built with ``-march=native``).
OpenMP comes from the runtime torch already loaded, and the thread count from ``torch.get_num_threads()``.

Same interface as :mod:`sage_optim.kernels.triton_kernels`. Sinkhorn's r and c are stored in float64; the
sweep over G runs in G's own precision on G/s (s = max |G|), as the for-loop path does.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .._device import cpu_info
from ..functional._common import as_rows

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu11"]
_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None

_P, _I64, _F64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
_SIGNATURES = {
    "sign_update": [_P, _P, _P, _P, _I64, _I64, _F64, _F64, _F64, _F64, _INT, _INT],
    "column_abs_sums": [_P, _P, _I64, _I64, _INT],  # returns nonzero when it could not allocate
    "sinkhorn_row_pass": [_P, _P, _P, _P, _I64, _I64, _F64, _F64, _F64, _F64, _INT],
    "sinkgd_apply": [_P, _P, _P, _P, _I64, _I64, _F64, _F64, _F64, _INT],
    "sinkgd_step": [_P, _P, _I64, _I64, _INT, _F64, _F64, _F64, _F64, _F64, _F64, _F64, _F64, _INT],
}
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
#: Results of a read (max |G|, column sums) are in host memory, so the optimizer's finite check can look at
#: them for free and skip its own read of those gradients (the Triton backend's would cost a device sync).
FIRST_PASS = True


def _cache_dir() -> Path:
    root = os.environ.get("SAGE_OPTIM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sage-optim")
    return Path(root) / "kernels"


def _cpu_signature() -> bytes:
    # -march=native code must never be loaded on another CPU model
    lines = [line for line in cpu_info().splitlines() if line.startswith(("model name", "flags"))]
    return ("\n".join(lines) if lines else platform.processor()).encode()


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    raise RuntimeError("fused=True on CPU tensors builds a small C kernel on first use, but no C compiler was "
                       "found; install gcc (or set CC), or pass fused=False")


def _build(path: Path, compiler: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
    errors = []
    for openmp in (["-fopenmp"], []):  # a compiler without OpenMP still gets a (single-threaded) library
        done = subprocess.run([compiler, *_FLAGS, *openmp, str(_SOURCE), "-o", str(tmp), "-lm"],
                              capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(tmp, path)  # atomic: concurrent builders never load a half-written file
            return
        errors.append(done.stderr.strip()[-1500:])
    raise RuntimeError(f"building the fused CPU kernels with {compiler} failed; pass fused=False. "
                       f"Compiler output:\n{errors[-1]}")


def library() -> ctypes.CDLL:
    """The compiled kernels (built and cached on first use)."""
    global _library
    with _lock:
        if _library is None:
            compiler = _compiler()
            key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), " ".join([compiler, *_FLAGS]).encode(),
                                              _cpu_signature()])).hexdigest()[:16]
            path = _cache_dir() / f"cpu_kernels-{key}.so"
            if not path.exists():
                _build(path, compiler)
            lib = ctypes.CDLL(str(path))
            for name, argtypes in _SIGNATURES.items():
                for suffix in ("f32", "f64"):
                    getattr(lib, f"{name}_{suffix}").argtypes = argtypes
            lib.sign_update_f32_bf16m.argtypes = _SIGNATURES["sign_update"]
            lib.sign_update_q8_f32.argtypes = [_P, _P, _P, _P, _P, _I64, _I64, _F64, _F64, _F64, _F64, _INT, _I64, _I64,
                                              _INT]
            for suffix in ("f32", "f64"):
                getattr(lib, f"max_abs_{suffix}").argtypes = [_P, _I64, _INT]
                getattr(lib, f"max_abs_{suffix}").restype = _F64
            _library = lib
    return _library


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def supports_update(param: Tensor, grad: Tensor, exp_avg: Tensor) -> bool:
    """Parameter, gradient and momentum dtypes the C update handles (else the caller's blocked torch path)."""
    return (grad.dtype in _SUFFIX and param.dtype == grad.dtype
            and (exp_avg.dtype == grad.dtype or (exp_avg.dtype == torch.bfloat16 and grad.dtype == torch.float32)))


def scaling_dtype(grad_dtype: torch.dtype) -> torch.dtype:
    """Sinkhorn's r and c are stored in float64 here (the sweep itself runs in the gradient's dtype)."""
    del grad_dtype
    return torch.float64


def cap_dtype(grad_dtype: torch.dtype) -> torch.dtype:
    """The dtype whose range bounds r and c: the sweep's arithmetic is in the gradient's dtype."""
    return grad_dtype


def sign_update(param: Tensor, grad: Tensor, exp_avg: Tensor, damper: Optional[Tensor], *, lr: float,
                weight_decay: float, beta1: float, beta2: float, code_compat: bool) -> None:
    """SAGE's (``damper=None``: Lion's) element-wise step of one contiguous tensor, in place."""
    if grad.numel() == 0:
        return
    rows, cols = as_rows(grad).shape
    suffix = "f32_bf16m" if exp_avg.dtype == torch.bfloat16 else _SUFFIX[grad.dtype]
    h = None if damper is None else damper.reshape(-1).to(grad.dtype).contiguous()
    getattr(library(), f"sign_update_{suffix}")(
        _ptr(param), _ptr(grad), _ptr(exp_avg), _ptr(h), rows, cols, lr, 1.0 - lr * weight_decay, 1.0 - beta1,
        1.0 - beta2, int(code_compat), _threads())


def first_pass_ok(grad: Tensor) -> bool:
    """Whether the kernels read ``grad`` as it is (no widening or contiguous copy first)."""
    return grad.dtype in _SUFFIX and grad.is_contiguous() and grad.device.type == "cpu"


def max_abs(tensor: Tensor) -> float:
    """max |tensor| of a contiguous tensor in one threaded read: NaN if any element is NaN, 0 if all are 0."""
    return float(getattr(library(), f"max_abs_{_SUFFIX[tensor.dtype]}")(_ptr(tensor), tensor.numel(), _threads()))


def grad_scale(largest: float) -> float:
    """SinkGD's s from :func:`max_abs`, as ``functional.sinkgd.max_abs`` defines it: 1 for 0 or NaN."""
    return largest if largest > 0 else 1.0


def supports_q8(param: Tensor, grad: Tensor, codes: Tensor, absmax: Tensor) -> bool:
    """Whether :func:`sign_update_q8` takes these tensors (float32, contiguous, int8 codes)."""
    return (param.dtype == grad.dtype == absmax.dtype == torch.float32 and codes.dtype == torch.int8
            and all(t.is_contiguous() for t in (param, grad, codes, absmax)))


def sign_update_q8(param: Tensor, grad: Tensor, codes: Tensor, absmax: Tensor, damper: Optional[Tensor], *,
                   lr: float, weight_decay: float, beta1: float, beta2: float, code_compat: bool, key: int,
                   first_index: int = 0) -> None:
    """SAGE's (``damper=None``: Lion's) step with an 8-bit momentum (``functional/_quant.py``) in one pass:
    decode, step and stochastic-rounding encode of each 256-block while it is in cache. ``first_index``: the
    flat index of ``param``'s first element in its whole tensor (a dim-0 shard's), which the rounding follows."""
    if grad.numel() == 0:
        return
    rows, cols = as_rows(grad).shape
    h = (torch.ones(cols, dtype=grad.dtype) if damper is None else damper.reshape(-1).to(grad.dtype).contiguous())
    library().sign_update_q8_f32(_ptr(param), _ptr(grad), _ptr(codes), _ptr(absmax), _ptr(h), rows, cols, lr,
                                 1.0 - lr * weight_decay, 1.0 - beta1, 1.0 - beta2, int(code_compat), key,
                                 first_index, _threads())


def column_abs_sums(matrix: Tensor, divisor: int) -> Tensor:
    """Σ_rows |matrix| / ``divisor`` per column of a contiguous (n, m) matrix, as a float64 m-vector."""
    rows, cols = matrix.shape
    out = torch.zeros(cols, dtype=torch.float64)
    if matrix.numel() and getattr(library(), f"column_abs_sums_{_SUFFIX[matrix.dtype]}")(
            _ptr(matrix), _ptr(out), rows, cols, _threads()):
        raise MemoryError(f"the fused column statistic could not allocate its O(m) buffers ({rows} x {cols})")
    return out.div_(divisor)


def _needs_float64(grad: Tensor, scale: float) -> bool:
    """The float32 kernels take G/s as G · (1/s), which needs 1/s to be a normal float32 (s in [2⁻¹²⁶, 2¹²⁶]):
    outside that (|G| near float32's max, or subnormal) a float64 copy of G goes to the float64 kernels."""
    return grad.dtype == torch.float32 and not 2.0 ** -126 <= scale <= 2.0 ** 126


def sinkhorn_row_pass(grad: Tensor, rows: Tensor, col_squares: Tensor, hparams: Tensor) -> Tensor:
    """r ← min(r / (r ⊙ sqrt((G/s)² (c²)) + ε) · target, cap) in place; return Σ_i r_i² (G_ij/s)² (float64).

    ``rows``, ``col_squares`` (= c²) and ``hparams`` = [s, ε, target, cap] are float64.
    """
    n_rows, n_cols = grad.shape
    out = torch.zeros(n_cols, dtype=torch.float64)
    if grad.numel():
        scale, eps, target, cap = hparams.tolist()
        if _needs_float64(grad, scale):
            grad = grad.double()
        if getattr(library(), f"sinkhorn_row_pass_{_SUFFIX[grad.dtype]}")(
                _ptr(grad), _ptr(rows), _ptr(col_squares), _ptr(out), n_rows, n_cols, scale, eps, target, cap,
                _threads()):
            raise MemoryError(f"the fused Sinkhorn sweep could not allocate its O(m) buffers ({n_rows} x {n_cols})")
    return out


def sinkgd_apply(param: Tensor, grad: Tensor, rows: Tensor, cols: Tensor, hparams: Tensor) -> None:
    """θ ← θ·decay + step·r_i·(G_ij/s)·c_j in place; ``hparams`` = [decay, step, s]; ``cols`` in G's dtype."""
    if grad.numel() == 0:
        return
    decay, step, scale = hparams.tolist()
    if _needs_float64(grad, scale):
        grad, cols = grad.double(), cols.double()
    if param.dtype != grad.dtype:  # e.g. bf16 θ: the product in G's dtype, then one rounding into θ
        wide = param.to(grad.dtype)
        sinkgd_apply(wide, grad, rows, cols, hparams)
        param.copy_(wide)
        return
    n_rows, n_cols = grad.shape
    getattr(library(), f"sinkgd_apply_{_SUFFIX[grad.dtype]}")(
        _ptr(param), _ptr(grad), _ptr(rows), _ptr(cols), n_rows, n_cols, decay, step, scale, _threads())


def sinkgd_step(param: Tensor, grad: Tensor, *, iters: int, eps: float, row_target: float, col_target: float,
                row_cap: float, col_cap: float, decay: float, step: float, largest: Optional[float] = None) -> None:
    """A whole SinkGD step of one unsharded contiguous (n, m) matrix in one call (Sinkhorn loop, column steps
    and apply in C): the per-iteration path costs ~1 ms of Python calls per matrix, more than its arithmetic.
    ``largest``: :func:`max_abs` of ``grad`` when the caller already read it (else it is read here)."""
    if grad.numel() == 0:
        return
    scale = grad_scale(max_abs(grad) if largest is None else largest)
    if _needs_float64(grad, scale):
        grad = grad.double()
    if param.dtype != grad.dtype:
        wide = param.to(grad.dtype)
        sinkgd_step(wide, grad, iters=iters, eps=eps, row_target=row_target, col_target=col_target,
                    row_cap=row_cap, col_cap=col_cap, decay=decay, step=step, largest=scale)
        param.copy_(wide)
        return
    n_rows, n_cols = grad.shape
    failed = getattr(library(), f"sinkgd_step_{_SUFFIX[grad.dtype]}")(
        _ptr(param), _ptr(grad), n_rows, n_cols, iters, scale, eps, row_target, col_target, row_cap, col_cap,
        decay, step, _threads())
    if failed:
        raise MemoryError(f"the fused SinkGD step could not allocate its O(n + m) vectors for a {n_rows} x {n_cols} "
                          "matrix")
