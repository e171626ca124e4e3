"""Data parallelism on CPU: `trainer.strategy: ddp` with 2 gloo processes, launched through the
CLI exactly as a user would, against one process with the global batch.

With Lightning's DistributedSampler (seeded by `seed_everything`), step t of 2 ranks x batch b
sees the same 2b examples as step t of 1 rank x batch 2b, and DDP averages the gradients: the
loss trajectories and the final weights must agree up to float rounding.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from ppo_fixtures import make_parity_policy, make_parity_reward_model
from preference_fixtures import separable_pairs, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SGD = '{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}'
CSV_ONLY = '[{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": ".", "name": "csv"}}]'

pytestmark = pytest.mark.slow


def run_cli(*args: str, timeout: int = 600) -> None:
    """`python -m lit_rlhf ...` in a fresh process (DDP relaunches it once per extra rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "lit_rlhf", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]


def ddp(devices: int) -> list[str]:
    return [
        "--trainer.accelerator",
        "cpu",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        str(devices),
        "--trainer.logger",
        CSV_ONLY,
        "--trainer.enable_progress_bar",
        "false",
    ]


def metrics(root: Path) -> pd.DataFrame:
    return pd.read_csv(sorted(root.glob("csv/version_*/metrics.csv"))[-1])


def state_dict(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_training(one: Path, two: Path, column: str = "train/loss", atol: float = 1e-4) -> float:
    """Same loss at every logged step and the same final weights; returns the largest loss gap."""
    a, b = metrics(one)[["step", column]].dropna(), metrics(two)[["step", column]].dropna()
    assert a["step"].tolist() == b["step"].tolist() and len(a) >= 3
    gap = (a[column].to_numpy() - b[column].to_numpy()).__abs__().max()
    assert gap < atol, (a[column].tolist(), b[column].tolist())
    w1, w2 = state_dict(one / "checkpoints" / "last.ckpt"), state_dict(two / "checkpoints" / "last.ckpt")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=atol, rtol=1e-3, msg=name)
    print(f"largest {column} gap between 1x2b and 2xb: {gap:.2e}")
    return gap


def test_tinygpt_two_ranks_match_one_rank_with_the_global_batch(tmp_path):
    common = [
        "fit",
        "--config",
        "configs/tinygpt/pretrain.yaml",
        "--data.path",
        "builtin:pydoc-topics",
        "--data.train_chars",
        "20000",
        "--data.val_chars",
        "4000",
        "--data.block_size",
        "32",
        "--model.init_args.block_size",
        "32",
        "--model.init_args.n_embd",
        "32",
        "--trainer.max_steps",
        "12",
        "--trainer.val_check_interval",
        "12",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.log_every_n_steps",
        "2",
    ]
    run_cli(*common, *ddp(1), "--data.batch_size", "16", "--trainer.default_root_dir", str(tmp_path / "one"))
    run_cli(*common, *ddp(2), "--data.batch_size", "8", "--trainer.default_root_dir", str(tmp_path / "two"))
    assert_same_training(tmp_path / "one", tmp_path / "two")
    assert (
        metrics(tmp_path / "one")["train/loss"].dropna().iloc[-1]
        < metrics(tmp_path / "one")["train/loss"].dropna().iloc[0]
    )


def test_reward_model_two_ranks_match_one_rank_with_the_global_batch(tmp_path, tiny_llama_dir):
    """SGD: ranks pad their pairs to different widths, which changes float rounding; Adam's first
    updates (~ lr * sign(g)) turn that noise on near-zero gradients into lr-sized steps."""
    pairs = separable_pairs(48)
    write_jsonl(tmp_path / "pairs" / "train.jsonl", pairs[:32])
    write_jsonl(tmp_path / "pairs" / "validation.jsonl", pairs[32:])
    common = [
        "fit",
        "--config",
        "configs/rlhf/reward_model.yaml",
        "--data.path",
        str(tmp_path / "pairs"),
        "--data.max_length",
        "64",
        "--data.min_prompt_tokens",
        "16",
        "--model.model_name_or_path",
        str(tiny_llama_dir),
        "--model.optimizer",
        SGD,
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "3",  # full global batches only
        "--trainer.log_every_n_steps",
        "1",
    ]
    run_cli(*common, *ddp(1), "--data.batch_size", "8", "--trainer.default_root_dir", str(tmp_path / "one"))
    run_cli(*common, *ddp(2), "--data.batch_size", "4", "--trainer.default_root_dir", str(tmp_path / "two"))
    assert_same_training(tmp_path / "one", tmp_path / "two")
    # the exported frozen reward model is written once, by rank 0
    assert (tmp_path / "two" / "reward_model" / "model.safetensors").is_file()


def test_ppo_two_ranks_share_kl_coef_and_save_once(tmp_path, smol_tokenizer_dir, data_root):
    """Each rank rolls out its own prompts; the KL controller sees the global per-token KL, so the
    coefficient every rank holds (saved in the checkpoint) follows the logged global KL exactly."""
    policy = make_parity_policy(tmp_path / "policy", smol_tokenizer_dir)
    reward = make_parity_reward_model(tmp_path / "rm", smol_tokenizer_dir)
    root = tmp_path / "run"
    run_cli(
        "fit",
        "--config",
        "configs/rlhf/ppo.yaml",
        *ddp(2),
        "--trainer.default_root_dir",
        str(root),
        "--model.model_name_or_path",
        str(policy),
        "--model.reward_model_path",
        str(reward),
        "--model.forward_batch_size",
        "8",
        "--model.max_new_tokens",
        "8",
        "--model.temperature",
        "1.0",
        "--model.ppo_epochs",
        "2",
        "--model.kl_horizon_fraction",
        "0.5",
        "--data.path",
        str(data_root / "oasst1"),
        "--data.num_train_prompts",
        "32",
        "--data.num_eval_prompts",
        "8",
        "--data.max_prompt_length",
        "48",
        "--data.batch_size",
        "8",
        "--trainer.max_epochs",
        "1",
    )
    df = metrics(root)
    assert len(df) == 2  # 32 prompts / (2 ranks x 8)
    kl, coef = df["objective/kl_per_token"].tolist(), df["kl_coef"].tolist()
    # global batch of 16; horizon 0.5 x 32 rollout samples = 16
    expected = coef[-1] * (1 + min(max(kl[-1] / 0.05 - 1, -0.2), 0.2) * 16 / 16)
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["kl_controller"]["value"] == pytest.approx(expected, rel=1e-5)
    assert len(checkpoint["callbacks"]) >= 1 and (root / "policy" / "config.json").is_file()
    assert len(list((root / "checkpoints").glob("*.ckpt"))) == 1
    assert len(json.loads((root / "eval_prompts.jsonl").read_text().splitlines()[0])["prompt"]) > 0


def test_ppo_nan_score_on_one_rank_stops_every_rank(tmp_path, smol_tokenizer_dir, data_root):
    """Rank 1's reward model returns NaN: both ranks must stop with the one-paragraph error (the
    non-finite count is all-reduced before raising) instead of rank 0 waiting for rank 1 forever."""
    policy = make_parity_policy(tmp_path / "policy", smol_tokenizer_dir)
    reward = make_parity_reward_model(tmp_path / "rm", smol_tokenizer_dir)
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(
        "import math, sys\n"
        "from lit_rlhf.cli import main\n"
        "from lit_rlhf.modules.ppo import PPOModule\n"
        "real = PPOModule.score\n"
        "def score(self, prompts, responses, ended):\n"
        "    scores = real(self, prompts, responses, ended)\n"
        "    return scores.fill_(math.nan) if self.global_rank == 1 else scores\n"
        "PPOModule.score = score\n"
        "main(sys.argv[1:])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "fit",
            "--config",
            "configs/rlhf/ppo.yaml",
            *ddp(2),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--model.model_name_or_path",
            str(policy),
            "--model.reward_model_path",
            str(reward),
            "--model.forward_batch_size",
            "8",
            "--model.max_new_tokens",
            "4",
            "--model.ppo_epochs",
            "1",
            "--data.path",
            str(data_root / "oasst1"),
            "--data.num_train_prompts",
            "16",
            "--data.num_eval_prompts",
            "8",
            "--data.max_prompt_length",
            "48",
            "--data.batch_size",
            "8",
            "--trainer.max_epochs",
            "1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "non-finite scores" in result.stderr
    assert not (tmp_path / "run" / "policy").exists()


def test_dcgan_two_ranks(tmp_path):
    """Ranks draw different noise (seed + rank), so this is the same training, not the same numbers.
    BatchNorm statistics stay per rank here: SyncBatchNorm (`trainer.sync_batchnorm: true`) needs GPUs."""
    from medmnist_helpers import write_tiny_medmnist

    write_tiny_medmnist(tmp_path / "data", "dermamnist", n_train=64)
    root = tmp_path / "two"
    run_cli(
        "fit",
        "--config",
        "configs/dcgan/dcgan.yaml",
        *ddp(2),
        "--data.root",
        str(tmp_path / "data"),
        "--data.batch_size",
        "8",
        "--trainer.max_epochs",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.strategy",
        "ddp_find_unused_parameters_true",
        "--model.latent_dim",
        "16",
        "--model.ngf",
        "8",
        "--model.ndf",
        "8",
        "--model.sample_every_n_epochs",
        "1",
        "--model.plot_first_epochs",
        "1",
        "--trainer.default_root_dir",
        str(root),
    )
    df = metrics(root)
    assert df["train/loss_d"].notna().sum() == 8  # 64 images / (2 ranks x 8) per epoch, 2 epochs
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] > 0
    assert (root / "samples" / "grid_final.png").is_file()
