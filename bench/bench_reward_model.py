"""Training pairs/s and held-out accuracy of lit_rlhf's RewardModel (+ SHPDataModule) against
`trl.RewardTrainer` (trl 1.16, a project dependency), in one process, on the same backbone, the
same encoded pairs (TRL takes our `chosen_ids`/`rejected_ids`), batch size, learning rate,
trainable blocks and head initialisation. Goal: lit_rlhf pairs/s >= 1.3x RewardTrainer's.

    python bench/bench_reward_model.py --pairs <folder of train/validation/test.jsonl> --out bench_rm.json
    python bench/bench_reward_model.py --oasst1 $LIT_RLHF_DATA/oasst1   # pairs built by scripts/oasst1_to_pairs.py

Both libraries are used at their defaults except where the settings must match: TRL's default
gradient checkpointing is switched off (lit_rlhf's is off) and its learning rate is constant.
pairs/s counts the training steps after the first one (`--warmup`), data loading excluded on both
sides. Accuracy is measured on the test pairs by the same function for both trained models.
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from transformers import TrainerCallback
from trl import RewardConfig, RewardTrainer

from lit_rlhf.data.preference import SHPDataModule, collate_pairs
from lit_rlhf.models.hf import load_sequence_scorer, load_tokenizer, resolve_model_path
from lit_rlhf.modules.reward_model import RewardModel, train_only_top_blocks

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def pair_accuracy(model, dataset, pad_token_id: int, batch_size: int) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        batch = collate_pairs([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad_token_id)
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        chosen, rejected = rewards.chunk(2)
        correct += int((chosen > rejected).sum())
    return correct / len(dataset)


class StepTimes:
    def __init__(self, warmup: int):
        self.warmup, self.durations, self.pairs, self.start = warmup, [], 0, None

    def begin(self):
        self.start = time.perf_counter()

    def end(self, pairs: int):
        if len(self.durations) >= self.warmup or self.warmup == 0:
            self.pairs += pairs
        self.durations.append(time.perf_counter() - self.start)

    def pairs_per_sec(self) -> float:
        return self.pairs / sum(self.durations[self.warmup :])


def run_lit(args, data: SHPDataModule, policy: str) -> tuple[float, float, float]:
    seed_everything(args.seed)
    module = RewardModel(
        model_name_or_path=policy,
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.0, fused=True),
        trainable_top_blocks=args.trainable_top_blocks,
    )
    times = StepTimes(args.warmup)

    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            times.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.end(batch["margin"].numel())

    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(
            accelerator="cpu", devices=1, precision="32-true", max_epochs=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Timer()], default_root_dir=root,
        )
        started = time.perf_counter()
        trainer.fit(module, train_dataloaders=data.train_dataloader())
        wall = time.perf_counter() - started
    accuracy = pair_accuracy(module.model, data.datasets["test"], module.tokenizer.pad_token_id, args.batch_size)
    return times.pairs_per_sec(), accuracy, wall


def run_trl(args, data: SHPDataModule, policy: str) -> tuple[float, float, float]:
    seed_everything(args.seed)
    tokenizer = load_tokenizer(policy)
    model = load_sequence_scorer(policy, tokenizer.pad_token_id)  # the same seeded head as lit_rlhf's
    if args.trainable_top_blocks is not None:
        train_only_top_blocks(model, args.trainable_top_blocks)
    train = data.datasets["train"].select_columns(["chosen_ids", "rejected_ids"])
    times = StepTimes(args.warmup)

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            times.begin()

        def on_step_end(self, *_, **__):
            times.end(args.batch_size)

    with tempfile.TemporaryDirectory() as output_dir:
        config = RewardConfig(
            output_dir=output_dir, per_device_train_batch_size=args.batch_size, num_train_epochs=1,
            learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, gradient_checkpointing=False,
            max_length=None, report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True,
            use_cpu=True, bf16=False, seed=args.seed,
        )
        trainer = RewardTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer, callbacks=[Timer()])
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    # the last batch may be short: count the pairs actually trained on
    times.pairs = len(train) - args.batch_size * args.warmup
    accuracy = pair_accuracy(model, data.datasets["test"], tokenizer.pad_token_id, args.batch_size)
    return times.pairs_per_sec(), accuracy, wall


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="embedded:smollm2")
    parser.add_argument("--pairs", default=None, help="folder with train/validation/test JSONL pairs")
    parser.add_argument("--oasst1", default=None, help="oasst1 rows to build the pairs from (if no --pairs)")
    parser.add_argument("--train-pairs", type=int, default=96)
    parser.add_argument("--test-pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--trainable-top-blocks", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_reward_model.json")
    args = parser.parse_args(argv)
    if args.pairs is None:
        if args.oasst1 is None:
            parser.error("give --pairs or --oasst1")
        args.pairs = tempfile.mkdtemp(prefix="bench_rm_pairs-")
        subprocess.check_call([sys.executable, str(ROOT / "scripts" / "oasst1_to_pairs.py"), args.oasst1, args.pairs,
                               "--split", "0.7", "0.15", "0.15", "--seed", str(args.seed)])

    policy = resolve_model_path(args.policy)
    data = SHPDataModule(
        path=args.pairs, tokenizer_name_or_path=policy, max_length=args.max_length, min_prompt_tokens=48,
        max_train_pairs=args.train_pairs, max_eval_pairs=args.test_pairs, batch_size=args.batch_size,
        preview_rows=0, seed=args.seed,
    )
    data.setup("fit")
    data.setup("test")
    padding = {}
    for name, grouped in (("lit_rlhf", True), ("unsorted", False)):
        data.hparams.group_by_length = grouped
        batches = list(data.train_dataloader())
        padding[name] = sum(int((b["attention_mask"] == 0).sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches)
    data.hparams.group_by_length = True

    lit_pairs_s, lit_acc, lit_wall = run_lit(args, data, policy)
    trl_pairs_s, trl_acc, trl_wall = run_trl(args, data, policy)
    result = {
        "lit_rlhf": {"pairs_per_sec": lit_pairs_s, "test_accuracy": lit_acc, "fit_wall_s": lit_wall},
        "trl_1.16_RewardTrainer": {"pairs_per_sec": trl_pairs_s, "test_accuracy": trl_acc, "fit_wall_s": trl_wall},
        "pairs_per_sec_ratio": lit_pairs_s / trl_pairs_s,
        "padding_fraction": {"lit_rlhf_length_grouped": padding["lit_rlhf"], "random_batches": padding["unsorted"]},
        "train_pairs": len(data.datasets["train"]),
        "test_pairs": len(data.datasets["test"]),
        "config": vars(args),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"lit_rlhf RewardModel : {lit_pairs_s:.2f} pairs/s, test accuracy {lit_acc:.3f} ({len(data.datasets['test'])} pairs)")
    print(f"trl RewardTrainer    : {trl_pairs_s:.2f} pairs/s, test accuracy {trl_acc:.3f}")
    print(f"ratio lit_rlhf / TRL = {result['pairs_per_sec_ratio']:.2f} (goal >= 1.3); padded share of batch tokens "
          f"{padding['lit_rlhf']:.2f} length-grouped vs {padding['unsorted']:.2f} random -> {args.out}")
    return result


if __name__ == "__main__":
    main()
