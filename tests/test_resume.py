"""Resume after a crash: `last.ckpt` is written atomically, and `--ckpt_path last` continues step
counters, optimizer states, random states, data order and the PPO KL controller."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import config_args
from ppo_fixtures import make_parity_policy, make_parity_reward_model

from lit_rlhf.checkpoint_io import StreamingCheckpointIO
from lit_rlhf.cli import LitRLHFCLI

REPO = Path(__file__).resolve().parents[1]
CSV_ONLY = '[{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": ".", "name": "csv"}}]'


def every_n_steps(n: int) -> str:
    return (
        '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "checkpoints", '
        f'"save_last": true, "save_top_k": 0, "every_n_train_steps": {n}}}}}]'
    )


def tinygpt_args(root: Path, steps: int) -> list[str]:
    return [
        "fit",
        "--config",
        "configs/tinygpt/pretrain.yaml",
        "--data.path",
        "builtin:pydoc-topics",
        "--data.train_chars",
        "30000",
        "--data.val_chars",
        "4000",
        "--data.block_size",
        "32",
        "--model.init_args.block_size",
        "32",
        "--model.init_args.n_embd",
        "32",
        "--model.init_args.dropout",
        "0.1",
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        "1000",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger",
        CSV_ONLY,
        "--trainer.callbacks",
        every_n_steps(5),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
    ]


def cli(args: list[str], *paths: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(map(str, [REPO, *paths]))}
    return subprocess.Popen(
        [sys.executable, "-m", "lit_rlhf", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]


def losses(root: Path) -> pd.Series:
    frames = [pd.read_csv(f) for f in sorted(root.glob("csv/version_*/metrics.csv"))]
    rows = pd.concat(frames)[["step", "train/loss"]].dropna()
    return rows.drop_duplicates("step", keep="last").set_index("step")["train/loss"]


def weights(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_tinygpt_killed_mid_run_resumes_to_the_same_weights(tmp_path):
    steps = 400
    finish(cli(tinygpt_args(tmp_path / "straight", steps)))

    killed = tmp_path / "killed"
    process = cli(tinygpt_args(killed, steps))
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed; raise `steps`"
    step_at_kill = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step_at_kill < steps

    finish(cli([*tinygpt_args(killed, steps), "--ckpt_path", "last"]))
    straight, resumed = losses(tmp_path / "straight"), losses(killed)
    assert resumed.index.max() == straight.index.max() == steps - 1
    after = straight.index[straight.index >= step_at_kill]
    gap = (straight[after] - resumed[after]).abs().max()
    print(f"killed at step {step_at_kill}; largest train/loss gap after resuming: {gap:.2e}")
    assert gap < 1e-4
    final_straight, final_resumed = weights(tmp_path / "straight"), weights(killed)
    for name in final_straight:
        torch.testing.assert_close(final_resumed[name], final_straight[name], atol=1e-5, rtol=1e-4, msg=name)


# Per online method: its config, its own options, and optimizer steps per iteration (Lightning's
# trainer.max_steps counts them: PPO 2 optimizers x 2 epochs; GRPO/RLOO 1 optimizer x 1 iteration).
ONLINE_METHODS = {
    "ppo_lora": (["--model.ppo_epochs", "2", "--model.policy_optimizer.init_args.lr", "1e-2"], 4, "loss/policy_avg"),
    "grpo": (["--model.num_generations", "2", "--model.optimizer.init_args.lr", "1e-2"], 1, "loss"),
    "rloo": (["--model.num_generations", "2", "--model.optimizer.init_args.lr", "1e-2"], 1, "loss"),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(ONLINE_METHODS))
def test_online_rl_resume_continues_kl_controller_rollouts_and_data_order(
    method, tmp_path, smol_tokenizer_dir, data_root
):
    policy = make_parity_policy(tmp_path / "policy", smol_tokenizer_dir)
    reward = make_parity_reward_model(tmp_path / "rm", smol_tokenizer_dir)
    options, steps_per_iteration, loss_column = ONLINE_METHODS[method]

    def args(root: Path, callbacks: str = every_n_steps(1)) -> list[str]:
        return [
            "fit",
            *config_args(method),
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger",
            CSV_ONLY,
            "--trainer.callbacks",
            callbacks,
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.max_steps",
            str(4 * steps_per_iteration),
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
            "--model.kl_target",
            "0.05",
            "--model.kl_horizon_fraction",
            "0.5",
            *options,
            "--data.path",
            str(data_root / "oasst1"),
            "--data.num_train_prompts",
            "24",
            "--data.num_eval_prompts",
            "8",
            "--data.max_prompt_length",
            "48",
            "--data.batch_size",
            "8",
        ]

    # a crash at the start of the third iteration (same run settings: the KL horizon is relative to the run)
    (tmp_path / "crash_callback.py").write_text(
        "from lightning.pytorch.callbacks import Callback\n"
        "class CrashAtIteration(Callback):\n"
        "    def on_train_batch_start(self, trainer, *args):\n"
        "        if trainer.fit_loop.total_batch_idx == 2:\n"
        "            raise RuntimeError('simulated crash')\n"
    )
    crash = every_n_steps(1)[:-1] + ', {"class_path": "crash_callback.CrashAtIteration"}]'
    finish(cli(args(tmp_path / "straight")))  # 4 iterations: 3 in epoch 0, 1 in epoch 1
    crashed = cli(args(tmp_path / "resumed", crash), tmp_path)  # stops after 2 of the 3 iterations of epoch 0
    _, stderr = crashed.communicate(timeout=600)
    assert crashed.returncode != 0 and "simulated crash" in stderr, stderr[-2000:]
    finish(cli([*args(tmp_path / "resumed"), "--ckpt_path", "last"]))

    def series(root: Path) -> pd.DataFrame:
        frames = pd.concat([pd.read_csv(f) for f in sorted(root.glob("csv/version_*/metrics.csv"))])
        return frames.dropna(subset=["kl_coef"]).drop_duplicates("step", keep="last").set_index("step")

    straight, resumed = series(tmp_path / "straight"), series(tmp_path / "resumed")
    assert straight.index.tolist() == resumed.index.tolist() and len(straight) == 4
    for column in ("kl_coef", "objective/scores", "objective/kl_per_token", loss_column):
        torch.testing.assert_close(
            torch.tensor(resumed[column].to_numpy()),
            torch.tensor(straight[column].to_numpy()),
            atol=1e-4,
            rtol=1e-3,
            msg=column,
        )


def test_interrupted_save_leaves_the_previous_last_ckpt_intact(tmp_path, monkeypatch):
    """Every stage writes checkpoints through lit_rlhf's StreamingCheckpointIO (temp file, then rename);
    a crash in the middle of writing must not leave a truncated last.ckpt behind."""
    torch.set_num_threads(1)
    monkeypatch.chdir(REPO)
    args = tinygpt_args(tmp_path, 5)
    cli_run = LitRLHFCLI(args=args[1:], run=False)
    cli_run.trainer.fit(cli_run.model, cli_run.datamodule)
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="simulated"):
        cli_run.trainer.save_checkpoint(last)
    assert isinstance(cli_run.trainer.strategy.checkpoint_io, StreamingCheckpointIO)
    assert last.read_bytes() == before and os.listdir(last.parent) == ["last.ckpt"]
    assert torch.load(last, weights_only=True)["global_step"] == 5
