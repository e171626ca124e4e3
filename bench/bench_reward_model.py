"""A whole CPU-setting reward-model run of lit_rlhf (RewardModel + PreferenceDataModule, frozen-trunk cache
included) against `trl.RewardTrainer` (trl 1.16, a project dependency) at the same settings:
training pairs/s over the whole multi-epoch run and test accuracy of both. Goal: lit_rlhf >= 3x.

    python bench/bench_reward_model.py --pairs runs/pairs --out bench_rm.json

The settings (trainable top blocks, learning rate, epochs, batch size, max_length, min_prompt_tokens,
margin, reward centring) are read from configs/rlhf/reward_model.yaml + configs/cpu/reward_model.yaml,
so the bench follows the CPU setting; `--train-pairs`, `--test-pairs` and `--epochs` shorten it.
Both sides train on the same encoded pairs (TRL takes our `chosen_ids`/`rejected_ids`), from the
same seeded head, with a constant learning rate and gradient checkpointing off. pairs/s =
epochs x train pairs / wall time of the fit (lit_rlhf: cache pre-pass included, no validation;
TRL: `trainer.train()`). Both trained models are scored on the test pairs by the same function.
`--device cuda` runs both sides in bf16 and fine-tunes the whole model (no frozen trunk) unless
`--trainable-top-blocks` is given.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from trl import RewardConfig, RewardTrainer

from lit_rlhf.data.preference import PreferenceDataModule, collate_pairs
from lit_rlhf.models.hf import load_sequence_scorer, load_tokenizer, resolve_model_path
from lit_rlhf.modules.reward_model import RewardModel, train_only_top_blocks

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (ROOT / "configs" / "rlhf" / "reward_model.yaml", ROOT / "configs" / "cpu" / "reward_model.yaml")


def cpu_setting() -> dict:
    """The CPU setting's values: the stage config with the CPU override on top."""
    merged: dict = {}

    def merge(into: dict, update: dict) -> None:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    for config in CONFIGS:
        merge(merged, yaml.safe_load(config.read_text()))
    model, data = merged["model"]["init_args"], merged["data"]["init_args"]
    return {
        "policy": model["model_name_or_path"],
        "trainable_top_blocks": model["trainable_top_blocks"],
        "lr": float(model["optimizer"]["init_args"]["lr"]),
        "margin": float(model["margin"]),
        "center_rewards_coefficient": float(model["center_rewards_coefficient"]),
        "epochs": merged["trainer"]["max_epochs"],
        "batch_size": data["batch_size"],
        "max_length": data["max_length"],
        "min_prompt_tokens": data["min_prompt_tokens"],
    }


@torch.no_grad()
def pair_accuracy(model, dataset, pad_token_id: int, batch_size: int) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(dataset), batch_size):
        batch = collate_pairs([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad_token_id)
        rewards = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        rewards = rewards.squeeze(-1)
        chosen, rejected = rewards.chunk(2)
        correct += int((chosen > rejected).sum())
    return correct / len(dataset)


def run_lit(s: dict, data: PreferenceDataModule, policy: str, cache_path: Path) -> tuple[float, float]:
    cuda = s["device"] == "cuda"
    seed_everything(s["seed"])
    module = RewardModel(
        model_name_or_path=policy,
        optimizer=lambda p: torch.optim.AdamW(p, lr=s["lr"], weight_decay=0.0, fused=True),
        margin=s["margin"],
        center_rewards_coefficient=s["center_rewards_coefficient"],
        trainable_top_blocks=s["trainable_top_blocks"],
        trunk_cache_path=str(cache_path),
    )
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(
            accelerator=s["device"],
            devices=1,
            precision="bf16-mixed" if cuda else "32-true",
            max_epochs=s["epochs"],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            default_root_dir=root,
        )
        started = time.perf_counter()
        trainer.fit(module, datamodule=data)
        wall = time.perf_counter() - started
    accuracy = pair_accuracy(module.model, data.datasets["test"], module.tokenizer.pad_token_id, s["batch_size"])
    return wall, accuracy


def run_trl(s: dict, data: PreferenceDataModule, policy: str) -> tuple[float, float]:
    seed_everything(s["seed"])
    tokenizer = load_tokenizer(policy)
    model = load_sequence_scorer(policy, tokenizer.pad_token_id)  # the same seeded head as lit_rlhf's
    if s["trainable_top_blocks"] is not None:
        train_only_top_blocks(model, s["trainable_top_blocks"])
    train = data.datasets["train"].select_columns(["chosen_ids", "rejected_ids", "margin"])
    if s["margin"]:
        train = train.map(lambda row: {"margin": row["margin"] + s["margin"]})
    with tempfile.TemporaryDirectory() as output_dir:
        config = RewardConfig(
            output_dir=output_dir,
            per_device_train_batch_size=s["batch_size"],
            num_train_epochs=s["epochs"],
            learning_rate=s["lr"],
            lr_scheduler_type="constant",
            weight_decay=0.0,
            gradient_checkpointing=False,
            center_rewards_coefficient=s["center_rewards_coefficient"] or None,
            max_length=None,
            report_to=[],
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            use_cpu=s["device"] == "cpu",
            bf16=s["device"] == "cuda",
            seed=s["seed"],
        )
        trainer = RewardTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    accuracy = pair_accuracy(model, data.datasets["test"], tokenizer.pad_token_id, s["batch_size"])
    return wall, accuracy


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", required=True, help="folder with train/validation/test JSONL pairs")
    parser.add_argument("--policy", default=None, help="default: the CPU setting's model")
    parser.add_argument("--train-pairs", type=int, default=None, help="default: all")
    parser.add_argument("--test-pairs", type=int, default=None, help="default: all")
    parser.add_argument("--epochs", type=int, default=None, help="default: the CPU setting's max_epochs")
    parser.add_argument("--max-length", type=int, default=None, help="default: the CPU setting's")
    parser.add_argument(
        "--trainable-top-blocks", type=int, default=None, help="default: the CPU setting's on cpu, all on cuda"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_reward_model.json")
    args = parser.parse_args(argv)
    s = cpu_setting()
    if args.device == "cuda":
        s["trainable_top_blocks"] = None
    for key in ("policy", "epochs", "max_length", "trainable_top_blocks"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    s["seed"], s["device"] = args.seed, args.device

    policy = resolve_model_path(s["policy"])
    data = PreferenceDataModule(
        path=args.pairs,
        tokenizer_name_or_path=policy,
        max_length=s["max_length"],
        min_prompt_tokens=s["min_prompt_tokens"],
        min_score_ratio=None,
        max_train_pairs=args.train_pairs,
        max_eval_pairs=args.test_pairs,
        batch_size=s["batch_size"],
        preview_rows=0,
        seed=args.seed,
    )
    data.setup("fit")
    data.setup("test")
    pairs = s["epochs"] * len(data.datasets["train"])
    with tempfile.TemporaryDirectory() as cache_dir:  # a fresh cache: its build is part of the run
        lit_wall, lit_acc = run_lit(s, data, policy, Path(cache_dir) / "trunk.safetensors")
    trl_wall, trl_acc = run_trl(s, data, policy)
    result = {
        "lit_rlhf": {"pairs_per_sec": pairs / lit_wall, "test_accuracy": lit_acc, "fit_wall_s": lit_wall},
        "trl_1.16_RewardTrainer": {"pairs_per_sec": pairs / trl_wall, "test_accuracy": trl_acc, "fit_wall_s": trl_wall},
        "pairs_per_sec_ratio": trl_wall / lit_wall,
        "train_pairs": len(data.datasets["train"]),
        "test_pairs": len(data.datasets["test"]),
        "setting": s,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"lit_rlhf RewardModel : {pairs / lit_wall:.2f} pairs/s over {s['epochs']} epochs ({lit_wall:.0f} s), "
        f"test accuracy {lit_acc:.3f} ({len(data.datasets['test'])} pairs)"
    )
    print(f"trl RewardTrainer    : {pairs / trl_wall:.2f} pairs/s ({trl_wall:.0f} s), test accuracy {trl_acc:.3f}")
    print(f"ratio lit_rlhf / TRL = {result['pairs_per_sec_ratio']:.2f} (goal >= 3) -> {args.out}")
    return result


if __name__ == "__main__":
    main()
