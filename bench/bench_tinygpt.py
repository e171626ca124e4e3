"""Training throughput of TinyGPTModule under Lightning vs a plain PyTorch loop on the same model,
data, batch size and optimizer, in one process. Goal: Lightning / plain >= 0.95.

    python bench/bench_tinygpt.py --data-path ../shared/data/wikitext-2-raw --steps 100 --out bench_tinygpt.json

The two loops alternate `--repeats` times and the medians are compared, so load from other
processes hits both alike. Each measurement skips `--warmup` steps, then times `--steps` steps
(data loading included in both).
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer

from lit_rlhf.tinygpt.pretrain import TinyGPTModule
from lit_rlhf.tinygpt.wikitext import WikiText2DataModule


def make_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def plain_tokens_per_sec(module: TinyGPTModule, data: WikiText2DataModule, warmup: int, steps: int) -> float:
    model = module.model.train()
    optimizer = make_optimizer(model.parameters())
    batches = iter(data.train_dataloader())
    start = None
    tokens = 0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        x, y = next(batches)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            tokens += x.numel()
    return tokens / (time.perf_counter() - start)


class StepTimer(Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.tokens = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.tokens += batch[0].numel()
            self.end = time.perf_counter()


def lightning_tokens_per_sec(module: TinyGPTModule, data: WikiText2DataModule, warmup: int, steps: int) -> float:
    timer = StepTimer(warmup)
    trainer = Trainer(
        max_steps=warmup + steps,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    return timer.tokens / (timer.end - timer.start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", default="builtin:pydoc-topics")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default="bench_tinygpt.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = WikiText2DataModule(path=args.data_path, block_size=args.block_size, batch_size=args.batch_size)
    data.setup("fit")

    def fresh_module() -> TinyGPTModule:
        torch.manual_seed(0)
        return TinyGPTModule(vocab=data.vocab, block_size=args.block_size, optimizer=make_optimizer)

    plain, lightning = [], []
    for _ in range(args.repeats):
        plain.append(plain_tokens_per_sec(fresh_module(), data, args.warmup, args.steps))
        lightning.append(lightning_tokens_per_sec(fresh_module(), data, args.warmup, args.steps))
    result = {
        "plain_tokens_per_sec": statistics.median(plain),
        "lightning_tokens_per_sec": statistics.median(lightning),
        "ratio": statistics.median(lightning) / statistics.median(plain),
        # each Lightning run against the plain run just before it: robust to slow drifts in load
        "paired_ratio_median": statistics.median(lit / p for lit, p in zip(lightning, plain)),
        "plain_runs": plain,
        "lightning_runs": lightning,
        "config": {**vars(args), "torch_threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"plain PyTorch : {result['plain_tokens_per_sec']:.0f} tokens/s  (runs {[round(v) for v in plain]})")
    print(f"Lightning     : {result['lightning_tokens_per_sec']:.0f} tokens/s  (runs {[round(v) for v in lightning]})")
    print(
        f"ratio Lightning / plain = {result['ratio']:.3f} (paired median {result['paired_ratio_median']:.3f}; "
        f"goal >= 0.95) -> {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
