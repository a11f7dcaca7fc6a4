"""Train a tiny Llama with SinkSAGE under FSDP2 (``fully_shard`` per decoder layer + root).

    torchrun --nproc_per_node 2 examples/fsdp2_torchrun.py             # CPU: gloo
    torchrun --nproc_per_node 8 examples/fsdp2_torchrun.py --bf16      # GPUs: NCCL, bf16 compute
    torchrun --nproc_per_node 2 examples/fsdp2_torchrun.py --momentum int8   # 8-bit SAGE momentum
    python examples/fsdp2_torchrun.py                                  # one process, no sharding

The optimizer is built *after* sharding, from the sharded model: its parameters are DTensors split on
dim 0, and SinkSAGE all-reduces the few dim-0 statistics it needs (SAGE's column |g| sums, SinkGD's
column norms), so every step equals the single-process step. ``--momentum bf16|int8`` keeps SAGE's
momentum (embedding, head, norm gains) in 16 or 8 bits, sharded like the rest. ``--verify-every N`` re-checks one
sharded parameter against the single-process update every N steps; ``--checkpoint DIR`` saves model
and optimizer with torch.distributed.checkpoint at the end.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from sage_optim import SinkSAGE
from sage_optim.distributed import (apply_fsdp2, close_process_group, exit_rank, init_from_env, init_optimizer_state,
                                    verify_step)


def batch(step: int, rank: int, *, batch_size: int, seq_len: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Synthetic, learnable data: each sequence counts up in a stride from a random start (mod vocab).
    Every rank draws its own sequences (data parallel)."""
    gen = torch.Generator().manual_seed(10_000 * step + rank)
    start = torch.randint(0, vocab, (batch_size, 1), generator=gen)
    stride = torch.randint(1, 4, (batch_size, 1), generator=gen)
    return ((start + stride * torch.arange(seq_len + 1)) % vocab).to(device)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--bf16", action="store_true", help="FSDP2 mixed precision: bf16 compute, fp32 reductions")
    parser.add_argument("--momentum", choices=["fp32", "bf16", "int8"], default="fp32",
                        help="dtype of SAGE's momentum (state_dtype): fp32, bf16, or 8-bit blocks")
    parser.add_argument("--verify-every", type=int, default=0, help="self-check one sharded update every N steps")
    parser.add_argument("--checkpoint", default=None, help="directory for a DCP checkpoint at the end")
    args = parser.parse_args(argv)

    env = init_from_env()
    torch.manual_seed(0)  # the same initial weights on every rank
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len,
                         tie_word_embeddings=False, use_cache=False)
    model = LlamaForCausalLM(config).to(env.device)
    if env.backend is not None:  # under torchrun (even with one rank): shard
        mp_policy = None
        if args.bf16:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        apply_fsdp2(model, mp_policy=mp_policy)  # fully_shard(each LlamaDecoderLayer); fully_shard(model)

    state_dtype = {"fp32": None, "bf16": torch.bfloat16, "int8": torch.int8}[args.momentum]
    optimizer = SinkSAGE(model, lr=args.lr, weight_decay=0.01, state_dtype=state_dtype)
    if env.is_main:
        print(optimizer.partition)
    verifier = verify_step(optimizer, every=args.verify_every) if args.verify_every else None

    loss_value = math.nan
    for step in range(1, args.steps + 1):
        ids = batch(step, env.rank, batch_size=args.batch_size, seq_len=args.seq_len, vocab=config.vocab_size,
                    device=env.device)
        logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # DTensor-aware: a global norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.detach().float()
        if env.backend is not None:
            dist.all_reduce(loss_value)
            loss_value /= env.world_size
        loss_value = float(loss_value)
        if env.is_main and (step == 1 or step % max(1, args.steps // 5) == 0 or step == args.steps):
            print(f"step {step}: loss {loss_value:.4f}", flush=True)

    if env.is_main:
        checked = f"; verified {verifier.checks} sharded updates" if verifier is not None else ""
        print(f"final loss {loss_value:.4f} on {env.world_size} rank(s){checked}; optimizer state "
              f"{int(optimizer.state_nbytes()):,} bytes (global)")
    if args.checkpoint:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        init_optimizer_state(optimizer)  # no-op after a step; never lets DCP take a zero-gradient step
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=args.checkpoint)
        if env.is_main:
            print(f"saved {args.checkpoint}")
    if env.initialized:
        close_process_group()  # a barrier, then destroy: no rank tears down while a peer is in a collective
    return loss_value


if __name__ == "__main__":
    main()
    exit_rank(0)  # a clean rank skips interpreter teardown, where gloo's threads can abort it (see exit_rank)
