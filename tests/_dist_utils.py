"""Launch CPU/gloo process groups from pytest, and the scenarios they run.

``launch(world_size, scenarios, out_dir)`` starts ``world_size`` copies of this file (one per rank, a
file store for rendezvous, so no ports), each running the named scenarios in order and writing
``rank<r>.json``: ``{scenario: result}`` or ``{scenario: {"error": traceback}}``. The tests assert on
the results. Every scenario is deterministic and feeds identical gradients to every rank, so the
single-process run computed inside the same worker is the reference.
"""
from __future__ import annotations

import copy
import faulthandler
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

THIS = Path(__file__).resolve()
TOLERANCE = 1e-6  # relative, float32, after five steps


# ---------------------------------------------------------------------------------------- launcher
def launch(world_size: int, scenarios: list[str], out_dir: Path, *, timeout: float = 240,
           args: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """Run ``scenarios`` on ``world_size`` ranks; return each rank's results (raises on crash or hang)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "filestore"
    if store.exists():
        store.unlink()
    env_base = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                "PYTHONWARNINGS": "ignore"}
    spec = json.dumps({"scenarios": scenarios, "out": str(out_dir), "store": str(store), "args": args or {},
                       "timeout": timeout})
    procs = []
    for rank in range(world_size):
        env = {**env_base, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)}
        log = open(out_dir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(THIS), spec], env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other, _ in procs:
                if other.poll() is None:
                    other.kill()
            failed.append(f"rank {rank} timed out after {timeout}s")
        finally:
            log.close()
        if proc.returncode not in (0, None) and not failed:
            failed.append(f"rank {rank} exited with {proc.returncode}")
    if failed:
        logs = "\n".join(f"--- rank {r} ---\n" + (out_dir / f"rank{r}.log").read_text()[-4000:]
                         for r in range(world_size))
        raise RuntimeError("; ".join(failed) + "\n" + logs)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]


def result(results: list[dict[str, Any]], scenario: str, rank: int = 0) -> dict[str, Any]:
    """One scenario's result on one rank; a worker-side exception becomes a test failure with its traceback."""
    value = results[rank][scenario]
    if isinstance(value, dict) and "error" in value:
        raise AssertionError(f"scenario {scenario!r} failed on rank {rank}:\n{value['error']}")
    return value


# ---------------------------------------------------------------------------------------- helpers (worker side)
def _rel_err(actual: Any, expected: Any) -> float:
    a, b = actual.detach().double(), expected.detach().double()
    scale = b.abs().max().item() if b.numel() else 0.0
    return float((a - b).abs().max().item() / max(scale, 1e-30)) if b.numel() else 0.0


_MESHES_2D: dict[int, Any] = {}


def _mesh_2d() -> Any:
    """One 2 × (w/2) ("replicate", "shard") mesh per process. note: DTensor caches layouts under meshes that
    compare equal, so a second, equal mesh (with new process groups) would hand some tensors the first one's
    groups and others its own."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world not in _MESHES_2D:
        _MESHES_2D[world] = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    return _MESHES_2D[world]


def _mesh() -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


# Raw shapes with uneven and empty shards on 2 and 4 ranks (torch.chunk: ceil(n/w) rows per rank, the
# last ranks get fewer or none). Three equal (3, 3) matrices make the per-rank local sizes differ, which
# once made ranks chunk the batched SinkGD differently (mismatched collectives).
MATRIX_SHAPES = [(5, 3), (1, 4), (3, 3), (3, 3), (3, 3), (6, 2, 2), (7, 2), (2, 7)]
VECTOR_SHAPES = [(7,), (1,), (4,), (3,)]


def _raw_tensors(shapes: list[tuple[int, ...]], seed: int) -> list[Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


def _raw_grads(shapes: list[tuple[int, ...]], step: int, *, zero_rows: bool) -> list[Any]:
    import torch

    gen = torch.Generator().manual_seed(1000 + step)
    grads = []
    for shape in shapes:
        g = torch.randn(shape, generator=gen) * (1 + step)
        if zero_rows and len(shape) >= 2 and shape[0] > 2:
            g[1] = 0  # a token absent from the batch: a zero row
        grads.append(g)
    return grads


def _make_optimizer(kind: str, params: Any, **extra: Any) -> Any:
    from sage_optim import SAGE, SinkGD, Lion

    if kind == "sage":
        return SAGE(params, lr=1e-2, **extra)
    if kind == "sage-code-compat":
        return SAGE(params, lr=1e-2, code_compat=True, **extra)
    if kind == "sinkgd-uniform":
        return SinkGD(params, lr=1e-2, normalization="uniform", **extra)
    if kind == "sinkgd-sr":
        return SinkGD(params, lr=1e-3, normalization="sr", **extra)
    if kind == "lion":
        return Lion(params, lr=1e-2, **extra)
    if kind == "muon":
        from sage_optim import SinkSAGE

        extra.pop("fused", None)  # torch's Muon has no fused path
        return SinkSAGE([{"params": list(params), "rule": "muon"}], lr=1e-2, **extra)
    raise ValueError(kind)


def _raw_parity(kind: str, shapes: list[tuple[int, ...]], *, foreach: Optional[bool], steps: int = 5,
                verify: bool = False, fused: Optional[bool] = None, **extra: Any) -> dict[str, Any]:
    """Raw DTensor parameters ``distribute_tensor(..., [Shard(0)])`` against plain tensors."""
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    from sage_optim.distributed import record_collectives, verify_step

    mesh = _mesh()
    init = _raw_tensors(shapes, seed=0)
    plain = [torch.nn.Parameter(t.clone()) for t in init]
    sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in init]
    names = [f"p{i}{tuple(s)}" for i, s in enumerate(shapes)]
    # the reference is the plain for-loop/foreach path; ``fused`` selects the sharded run's path
    ref_opt = _make_optimizer(kind, list(zip(names, plain)), foreach=foreach, fused=False, **extra)
    opt = _make_optimizer(kind, list(zip(names, sharded)), foreach=foreach, fused=fused, **extra)
    verifier = verify_step(opt, every=1) if verify else None
    collectives = []
    for step in range(steps):
        grads = _raw_grads(shapes, step, zero_rows=not kind.startswith("sinkgd"))
        for p, q, g in zip(plain, sharded, grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        ref_opt.step()
        with record_collectives() as log:
            opt.step()
        collectives.append([(c.op, c.numel, str(c.dtype)) for c in log])
    errors = {n: _rel_err(q.full_tensor(), p) for n, p, q in zip(names, plain, sharded)}
    state_errors = {}
    for n, p, q in zip(names, plain, sharded):
        for key, value in ref_opt.state[p].items():
            other = opt.state[q][key]
            other = other.full_tensor() if hasattr(other, "full_tensor") else other
            state_errors[f"{n}.{key}"] = _rel_err(other, value)
    out = {"param_rel_err": errors, "state_rel_err": state_errors, "collectives": collectives,
           "planned": _planned(opt, foreach)}
    if verifier is not None:
        out["verified"] = verifier.checked
    return out


def _planned(opt: Any, foreach: Optional[bool]) -> list[Any]:
    from sage_optim.distributed import plan_collectives

    return [[c.op, c.numel, str(c.dtype)] for c in plan_collectives(opt, foreach=foreach)]


def _llama(tied: bool, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=tied, use_cache=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # RMSNorm gains start at 1: perturb them so the vector path is exercised
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _llama_batch(step: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(500 + step)
    return torch.randint(0, 80, (2, 12), generator=gen)  # ids ≥ 80 never occur: zero embedding rows


def _llama_loss(model: Any, ids: Any) -> Any:
    import torch.nn.functional as F

    logits = model(input_ids=ids[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


def _full(t: Any) -> Any:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _llama_parity(*, tied: bool, steps: int = 5, verify: bool = False, hsdp: bool = False,
                  **opt_kwargs: Any) -> dict[str, Any]:
    """Tiny LlamaForCausalLM under FSDP2 (fully_shard per layer + root) against the same model unsharded;
    ``hsdp``: on a 2 × (w/2) mesh, replicated across the first dimension and sharded along the second."""
    from sage_optim import SinkSAGE
    from sage_optim.distributed import apply_fsdp2, record_collectives

    reference = _llama(tied)
    model = copy.deepcopy(reference)
    mesh = _mesh_2d() if hsdp else _mesh()
    apply_fsdp2(model, mesh=mesh)
    opt_kwargs.setdefault("lr", 3e-3)
    ref_opt = SinkSAGE(reference, **opt_kwargs)
    opt = SinkSAGE(model, **opt_kwargs, verify_every=1 if verify else None)  # the constructor's self-check
    verifier = opt.verifier
    collectives = []
    for step in range(steps):
        ids = _llama_batch(step)
        _llama_loss(reference, ids).backward()
        _llama_loss(model, ids).backward()  # same data on every rank: FSDP2's averaged gradient = reference's
        ref_opt.step()
        with record_collectives() as log:
            opt.step()
        collectives.append([(c.op, c.numel, str(c.dtype)) for c in log])
        ref_opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
    ref_params = dict(reference.named_parameters())
    errors = {n: _rel_err(_full(p), ref_params[n]) for n, p in model.named_parameters()}
    groups = [{"role": g["role"], "rule": g["rule"], "n": len(g["params"])} for g in opt.param_groups]
    out = {"param_rel_err": errors, "collectives": collectives, "groups": groups,
           "planned": _planned(opt, opt_kwargs.get("foreach")),
           "moved": max(_rel_err(ref_params[n], p) for n, p in _llama(tied).named_parameters())}
    if verifier is not None:
        out["verified"] = verifier.checked
    return out


# ---------------------------------------------------------------------------------------- scenarios
SCENARIOS: dict[str, Callable[[dict[str, Any]], Any]] = {}


def scenario(fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario
def raw_sage(args: dict[str, Any]) -> Any:
    return {f"foreach={fe}": _raw_parity("sage", MATRIX_SHAPES + VECTOR_SHAPES, foreach=fe) for fe in (None, False)}


@scenario
def raw_sage_code_compat(args: dict[str, Any]) -> Any:
    return _raw_parity("sage-code-compat", MATRIX_SHAPES + VECTOR_SHAPES, foreach=None)


@scenario
def raw_sinkgd(args: dict[str, Any]) -> Any:
    return {f"{kind} foreach={fe}": _raw_parity(kind, MATRIX_SHAPES, foreach=fe)
            for kind in ("sinkgd-uniform", "sinkgd-sr") for fe in (None, False)}


@scenario
def raw_fused(args: dict[str, Any]) -> Any:
    """fused=True on Shard(0) DTensors, both backends: C, and Triton run by its interpreter on these CPU ranks."""
    import importlib.util
    import os

    backends = {"c": "0", **({"triton": "1"} if importlib.util.find_spec("triton") is not None else {})}
    out = {}
    before = os.environ.get("TRITON_INTERPRET")
    try:
        for backend, interpret in backends.items():
            os.environ["TRITON_INTERPRET"] = interpret  # CPU tensors: "1" → Triton's interpreter, "0" → C
            out[f"{backend} sage"] = _raw_parity("sage", MATRIX_SHAPES + VECTOR_SHAPES, foreach=None, fused=True,
                                                 steps=3)
            for kind in ("sinkgd-uniform", "sinkgd-sr"):
                out[f"{backend} {kind}"] = _raw_parity(kind, MATRIX_SHAPES, foreach=None, fused=True, steps=3)
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
    return out


# 8-bit momentum blocks are 256 elements of a row: (5, 300) and (3, 513) have several per row, and (700,)
# is one row of three blocks whose middle one, [256, 512), the 2-rank split at 350 cuts in two.
INT8_SHAPES = MATRIX_SHAPES + VECTOR_SHAPES + [(5, 300), (700,), (3, 513)]


@scenario
def raw_int8(args: dict[str, Any]) -> Any:
    """state_dtype="int8" on Shard(0) DTensors: the same codes, block maxima and parameters as one process."""
    import os

    import torch

    torch.manual_seed(0)  # the momenta's rounding seeds derive from torch's seed: alike on every rank
    out = {}
    for kind in ("sage", "lion"):
        for foreach in (None, False):
            out[f"{kind} foreach={foreach}"] = _raw_parity(kind, INT8_SHAPES, foreach=foreach, state_dtype="int8")
        before = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "0"  # CPU tensors: the C kernel (its shard's index offset)
        try:
            out[f"{kind} fused"] = _raw_parity(kind, INT8_SHAPES, foreach=None, fused=True, steps=3,
                                               state_dtype="int8")
        finally:
            os.environ.pop("TRITON_INTERPRET") if before is None else os.environ.update(TRITON_INTERPRET=before)
    return out


@scenario
def muon_sharded(args: dict[str, Any]) -> Any:
    """torch's Muon (rule "muon") on Shard(0) matrices and as muon-hybrid's hidden rule on a FSDP2 Llama:
    each matrix gathered whole for Newton-Schulz, its rows applied by their shard."""
    shapes = [s for s in MATRIX_SHAPES if len(s) == 2] + [(9, 4), (4, 9)]
    return {"raw foreach=None": _raw_parity("muon", shapes, foreach=None),
            "llama untied": _llama_parity(tied=False, rules={"hidden": "muon", "embedding": "adamw",
                                                             "head": "adamw", "vector": "adamw"}),
            "llama tied verified": _llama_parity(tied=True, steps=3, verify=True, rules={"hidden": "muon"})}


@scenario
def llama_int8(args: dict[str, Any]) -> Any:
    """SinkSAGE with an 8-bit momentum on a FSDP2 Llama (its norm gains are sharded vectors), checked by
    verify_step too."""
    return {"untied": _llama_parity(tied=False, state_dtype="int8"),
            "tied verified": _llama_parity(tied=True, steps=3, verify=True, state_dtype="int8")}


@scenario
def llama_sinksage(args: dict[str, Any]) -> Any:
    return {"tied": _llama_parity(tied=True), "untied": _llama_parity(tied=False),
            # sr is sqrt(rows) × uniform: a 10× smaller lr keeps the steps comparable
            "sr for-loop": _llama_parity(tied=False, lr=3e-4, normalization="sr", foreach=False)}


@scenario
def llama_hsdp(args: dict[str, Any]) -> Any:
    return {"untied": _llama_parity(tied=False, hsdp=True),
            "untied int8": _llama_parity(tied=False, hsdp=True, state_dtype="int8")}


@scenario
def llama_verify_step(args: dict[str, Any]) -> Any:
    return _llama_parity(tied=True, steps=3, verify=True)


@scenario
def reduction_skipped(args: dict[str, Any]) -> Any:
    """The same parity checks with the sum all-reduce turned into a no-op: they must fail."""
    from sage_optim.distributed import _collectives

    real = _collectives._all_reduce

    def skip_sums(tensor: Any, group: Any, op: Any = None) -> None:
        if op is None:
            _collectives._record("skipped", tensor, group)
            return
        real(tensor, group, op)  # keep the finite-flag reduction, so only the maths is broken

    _collectives._all_reduce = skip_sums
    try:
        out = {"sage": _raw_parity("sage", MATRIX_SHAPES + VECTOR_SHAPES, foreach=None),
               "sinkgd": _raw_parity("sinkgd-uniform", MATRIX_SHAPES, foreach=None),
               "llama": _llama_parity(tied=False, steps=3)}
        try:
            _llama_parity(tied=False, steps=2, verify=True)
            out["verify_error"] = None
        except RuntimeError as err:
            out["verify_error"] = str(err)
        return out
    finally:
        _collectives._all_reduce = real


@scenario
def tp_refused(args: dict[str, Any]) -> Any:
    """Shard(1) (a tensor-parallel layout) must be refused by SAGE and SinkGD, and is exact for Lion (not with
    an 8-bit momentum)."""
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _mesh()
    out: dict[str, Any] = {}
    for kind in ("sage", "sinkgd-uniform", "lion"):
        weight = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
        plain = torch.nn.Parameter(weight.full_tensor().clone())
        opt = _make_optimizer(kind, [("blocks.0.attn.q_proj.weight", weight)])
        ref = _make_optimizer(kind, [("blocks.0.attn.q_proj.weight", plain)])
        g = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
        weight.grad = distribute_tensor(g.clone(), mesh, [Shard(1)])
        plain.grad = g.clone()
        try:
            opt.step()
            ref.step()
            out[kind] = {"error": None, "rel_err": _rel_err(weight.full_tensor(), plain)}
        except ValueError as err:
            out[kind] = {"error": str(err), "unchanged": _rel_err(weight.full_tensor(), plain)}
    # an 8-bit momentum keeps blocks along rows, so even Lion needs whole rows: refused when it is built
    weight = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    try:
        _make_optimizer("lion", [("blocks.0.attn.q_proj.weight", weight)], state_dtype="int8")
        out["lion int8"] = {"error": None}
    except ValueError as err:
        out["lion int8"] = {"error": str(err)}
    return out


@scenario
def two_shard_groups_refused(args: dict[str, Any]) -> Any:
    """One param group sharded over two different process groups cannot share one collective."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    # a (w, 1) mesh: its second dimension is a size-1 group per rank, a process group other than WORLD
    other = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("world", "solo"))["solo"]
    a = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), _mesh(), [Shard(0)]))
    b = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), other, [Shard(0)]))
    opt = _make_optimizer("sage", [("a", a), ("b", b)])
    a.grad = distribute_tensor(torch.ones(4, 2), a.device_mesh, [Shard(0)])
    b.grad = distribute_tensor(torch.ones(4, 2), other, [Shard(0)])
    try:
        opt.step()
        return {"error": None}
    except ValueError as err:
        return {"message": str(err)}


def _mesh_2d_parity(kind: str, placements: str, **extra: Any) -> dict[str, Any]:
    """HSDP-style (Replicate, Shard(0)) and doubly split (Shard(0), Shard(0)) layouts on a 2 × (w/2) mesh."""
    import torch
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh_2d()
    layout = [Replicate(), Shard(0)] if placements == "replicate,shard" else [Shard(0), Shard(0)]
    shapes = MATRIX_SHAPES + (VECTOR_SHAPES if kind.startswith("sage") else [])
    if extra.get("state_dtype") == "int8":
        shapes = INT8_SHAPES
        torch.manual_seed(0)  # the rounding seeds: alike on every rank
    init = _raw_tensors(shapes, seed=0)
    plain = [torch.nn.Parameter(t.clone()) for t in init]
    sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, layout)) for t in init]
    names = [f"p{i}{tuple(s)}" for i, s in enumerate(shapes)]
    ref_opt = _make_optimizer(kind, list(zip(names, plain)), **extra)
    opt = _make_optimizer(kind, list(zip(names, sharded)), **extra)
    for step in range(5):
        for p, q, g in zip(plain, sharded, _raw_grads(shapes, step, zero_rows=not kind.startswith("sinkgd"))):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, layout)
        ref_opt.step()
        opt.step()
    state_errors = {f"{n}.{key}": _rel_err(_full(opt.state[q][key]), value)
                    for n, p, q in zip(names, plain, sharded) for key, value in ref_opt.state[p].items()}
    return {"param_rel_err": {n: _rel_err(q.full_tensor(), p) for n, p, q in zip(names, plain, sharded)},
            "state_rel_err": state_errors}


@scenario
def mesh_2d(args: dict[str, Any]) -> Any:
    out = {f"{kind} {pl}": _mesh_2d_parity(kind, pl) for kind in ("sage", "sinkgd-uniform")
           for pl in ("replicate,shard", "shard,shard")}
    out.update({f"sage int8 {pl}": _mesh_2d_parity("sage", pl, state_dtype="int8")
                for pl in ("replicate,shard", "shard,shard")})
    return out


@scenario
def nonfinite_agree(args: dict[str, Any]) -> Any:
    """A NaN in one rank's shard only: every rank must skip (or raise) together."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from sage_optim import SAGE
    from sage_optim.optim import NonFiniteGradientError

    mesh = _mesh()
    out = {}
    for policy in ("skip", "raise"):
        w = torch.nn.Parameter(distribute_tensor(torch.ones(6, 3), mesh, [Shard(0)]))
        opt = SAGE([("w", w)], nonfinite=policy)
        local = torch.ones(3, 3)
        if dist.get_rank() == dist.get_world_size() - 1:
            local[0, 0] = float("nan")
        w.grad = DTensor.from_local(local, mesh, [Shard(0)], shape=torch.Size((6, 3)), stride=(3, 1))
        try:
            opt.step()
            out[policy] = {"raised": None, "skipped": opt.skipped_steps,
                           "unchanged": bool(torch.equal(w.full_tensor(), torch.ones(6, 3)))}
        except NonFiniteGradientError as err:
            out[policy] = {"raised": str(err), "skipped": opt.skipped_steps,
                           "unchanged": bool(torch.equal(w.full_tensor(), torch.ones(6, 3)))}
    return out


@scenario
def ddp_plain(args: dict[str, Any]) -> Any:
    """DDP: plain tensors, gradients averaged by DDP; the optimizer issues no collective of its own."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sage_optim import SinkSAGE
    from sage_optim.distributed import record_collectives

    reference = _llama(tied=False)
    model = DDP(copy.deepcopy(reference))
    ref_opt = SinkSAGE(reference, lr=3e-3)
    opt = SinkSAGE(model.module, lr=3e-3)
    issued = 0
    for step in range(5):
        ids = _llama_batch(step)
        _llama_loss(reference, ids).backward()
        _llama_loss(model, ids).backward()
        ref_opt.step()
        with record_collectives() as log:
            opt.step()
        issued += len(log)
        ref_opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
    ref_params = dict(reference.named_parameters())
    errors = {n: _rel_err(p, ref_params[n]) for n, p in model.module.named_parameters()}
    return {"param_rel_err": errors, "collectives": issued}


# ---------------------------------------------------------------------------------------- checkpoints (DCP)
def _dcp_model(sharded: bool, state_dtype: str) -> tuple[Any, Any]:
    from sage_optim import SinkSAGE
    from sage_optim.distributed import apply_fsdp2

    model = _llama(tied=True)
    if sharded:
        apply_fsdp2(model, mesh=_mesh())
    # bf16 momentum: torch's load_state_dict would cast it to the parameter's fp32; ours keeps it. int8: codes,
    # block maxima sharded by rows (matrices) or replicated (vectors), and the rounding seed
    return model, SinkSAGE(model, lr=3e-3, state_dtype=state_dtype)


def _dcp_load(model: Any, opt: Any, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    from sage_optim.distributed import init_optimizer_state

    init_optimizer_state(opt)  # else DCP creates state with a zero-gradient step (see checkpoint.py)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def _dcp_save(model: Any, opt: Any, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)


def _train(model: Any, opt: Any, steps: range) -> None:
    for step in steps:
        _llama_loss(model, _llama_batch(step)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _snapshot(model: Any, opt: Any) -> dict[str, Any]:
    params = {n: _full(p).tolist() for n, p in model.named_parameters()}
    groups = [{k: (v if not hasattr(v, "tolist") else v.tolist()) for k, v in g.items() if k != "params"}
              for g in opt.param_groups]
    states = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, s in opt.state.items():
        states[names[id(p)]] = {k: [str(v.dtype), list(v.shape), _full(v).double().sum().item()]
                                for k, v in s.items()}
    return {"params": params, "groups": json.loads(json.dumps(groups, default=str)), "state_layout": states}


@scenario
def dcp_save_sharded(args: dict[str, Any]) -> Any:
    """2 ranks: train 3 steps, save with DCP, then take step 4 (the reference next step)."""
    model, opt = _dcp_model(sharded=True, state_dtype=args["state_dtype"])
    _train(model, opt, range(3))
    _dcp_save(model, opt, args["ckpt_a"])
    _train(model, opt, range(3, 4))
    return _snapshot(model, opt)


@scenario
def dcp_load_single(args: dict[str, Any]) -> Any:
    """1 rank, plain model: load the 2-rank checkpoint, save it again, take step 4."""
    model, opt = _dcp_model(sharded=False, state_dtype=args["state_dtype"])
    _dcp_load(model, opt, args["ckpt_a"])
    _dcp_save(model, opt, args["ckpt_b"])
    _train(model, opt, range(3, 4))
    return _snapshot(model, opt)


@scenario
def dcp_load_sharded(args: dict[str, Any]) -> Any:
    """2 ranks again: load the 1-rank checkpoint, take step 4."""
    model, opt = _dcp_model(sharded=True, state_dtype=args["state_dtype"])
    _dcp_load(model, opt, args["ckpt_b"])
    _train(model, opt, range(3, 4))
    return _snapshot(model, opt)


# ---------------------------------------------------------------------------------------- worker entry point
def _worker(spec: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    # note: a hung collective dumps every thread's stack into the rank's log before the launcher kills it
    faulthandler.dump_traceback_later(max(spec["timeout"] - 10, 5), exit=True)
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"file://{spec['store']}", rank=rank, world_size=world)
    results: dict[str, Any] = {}
    try:
        for name in spec["scenarios"]:
            try:
                results[name] = SCENARIOS[name](spec["args"])
            except Exception:  # recorded, so one broken scenario does not hide the others
                results[name] = {"error": traceback.format_exc()}
                print(f"scenario {name} failed:\n{results[name]['error']}", file=sys.stderr, flush=True)
            dist.barrier()
    finally:
        Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(THIS.parent))
    _worker(json.loads(sys.argv[1]))
