"""Pretrain a tiny Llama with SinkSAGE (SinkGD for hidden matrices, SAGE elsewhere) in a plain PyTorch loop.

    python examples/torch_loop.py --steps 200
    python examples/torch_loop.py --steps 20 --data path/to/corpus.jsonl.gz

SinkSAGE is an ordinary ``torch.optim.Optimizer``: build it from the model (it routes parameters
by role from the module tree), then step / schedule / zero_grad as with AdamW.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from sage_optim import SinkSAGE
from sage_optim.train.data import WindowSampler, fixed_batches, load_corpus
from sage_optim.train.schedule import warmup_cosine_scheduler

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cc0-slice.jsonl.gz"


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--data", default=str(FIXTURE) if FIXTURE.exists() else "embedded",
                        help="a corpus path or 'embedded' (default: the test fixture in a source checkout)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    corpus = load_corpus(args.data, vocab_size=512, cache_dir=args.cache_dir)
    vocab = -(-corpus.vocab_size // 64) * 64
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=args.seq_len, tie_word_embeddings=False, use_cache=False))

    optimizer = SinkSAGE(model, lr=2e-3, weight_decay=0.01)  # the paper's hyperparameters
    print(optimizer.partition)
    scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=max(1, args.steps // 10), total_steps=args.steps,
                                        floor_fraction=0.1)
    sampler = WindowSampler(corpus.train, seq_len=args.seq_len, batch_size=args.batch_size, seed=0)
    val = fixed_batches(corpus.val, seq_len=args.seq_len, batch_size=args.batch_size, n_batches=4)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()) for x, y in val]
        model.train()
        return float(torch.stack(losses).mean())

    print(f"step 0: val loss {val_loss():.4f}")
    for step in range(1, args.steps + 1):
        x, y = sampler.next_batch()
        loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.4f} lr {scheduler.get_last_lr()[0]:.2e}")
    final = val_loss()
    print(f"final val loss {final:.4f} (ppl {math.exp(final):.1f}); optimizer state "
          f"{int(optimizer.state_nbytes()):,} bytes")
    return final


if __name__ == "__main__":
    main()
