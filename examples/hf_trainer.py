"""Train the ``cpu-tiny`` Llama with Hugging Face ``Trainer`` and a sage-optim optimizer.

    python examples/hf_trainer.py --steps 50 --optimizer sage-hybrid

Trainer takes any ``torch.optim.Optimizer`` and scheduler through ``optimizers=(optimizer, scheduler)``;
SinkSAGE needs nothing special. Needs ``transformers`` and ``accelerate``.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from sage_optim.optim.registry import available_optimizers, create_optimizer
from sage_optim.train.data import load_corpus
from sage_optim.train.model import build_model, round_vocab
from sage_optim.train.presets import get_preset
from sage_optim.train.schedule import warmup_cosine_scheduler

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cc0-slice.jsonl.gz"


class Windows(Dataset):
    """Non-overlapping windows of ``seq_len`` tokens; Trainer's model shifts ``labels`` itself."""

    def __init__(self, tokens, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.tokens[i * self.seq_len:(i + 1) * self.seq_len].astype("int64"))
        return {"input_ids": ids, "labels": ids.clone()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--optimizer", default="sage-hybrid", choices=available_optimizers())
    parser.add_argument("--data", default=str(FIXTURE) if FIXTURE.exists() else "embedded")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    cfg = get_preset("cpu-tiny")
    torch.manual_seed(cfg.seed)
    corpus = load_corpus(args.data, vocab_size=cfg.data.tokenizer_vocab_size, cache_dir=args.cache_dir)
    model = build_model(cfg.model, vocab_size=round_vocab(corpus.vocab_size), max_seq_len=cfg.data.seq_len)
    optimizer = create_optimizer(args.optimizer, model)
    scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=max(1, args.steps // 10), total_steps=args.steps,
                                        floor_fraction=0.1)
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=cfg.train.micro_batch_size,
            per_device_eval_batch_size=cfg.eval.batch_size, gradient_accumulation_steps=cfg.train.grad_accum_steps,
            max_grad_norm=1.0, logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=[],
            use_cpu=True, seed=cfg.seed, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=training_args,
                          train_dataset=Windows(corpus.train, cfg.data.seq_len),
                          eval_dataset=Windows(corpus.val[: 64 * cfg.data.seq_len], cfg.data.seq_len),
                          optimizers=(optimizer, scheduler))
        result = trainer.train()
        metrics = trainer.evaluate()
    print(f"{args.optimizer}: train loss {result.training_loss:.4f}, eval loss {metrics['eval_loss']:.4f}")
    return {"train_loss": result.training_loss, "eval_loss": metrics["eval_loss"]}


if __name__ == "__main__":
    main()
