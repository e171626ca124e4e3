"""The main commands as a new user runs them: no W&B account, no WANDB_*/HF_* variables, an empty HOME.

The rest of the suite runs inside pytest's process with fixtures; these tests run the commands in a
subprocess whose environment holds none of that, so a login prompt or a hub call shows up here first."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_RUN

from lit_rlhf.models.hf import cache_dir

REPO = Path(__file__).resolve().parents[1]


def user_env(home: Path, **extra: str) -> dict:
    """This process's environment less every WANDB_*/HF_* variable, with a fresh empty HOME (no ~/.netrc,
    no W&B settings, no cached login). It keeps LIT_RLHF_CACHE, the embedded model's converted folder."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_"))}
    return {**env, "HOME": str(home), "LIT_RLHF_CACHE": str(cache_dir()), "PYTHONPATH": str(REPO), **extra}


def run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def offline_runs(folder: Path) -> list[Path]:
    return list((folder / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_fit_runs_offline_with_no_wandb_account_and_no_variables(tmp_path):
    """Before: `wandb.errors.UsageError: No API key configured` at the first logged step (wandb 0.31
    reads Lightning's WANDB_MODE=dryrun as online)."""
    result = run(
        [
            "lit_rlhf",
            "fit",
            "--config",
            "configs/tinygpt/pretrain.yaml",
            *TINY_RUN,
            "--trainer.default_root_dir",
            "runs/tiny",
        ],
        tmp_path,
        user_env(tmp_path / "home"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert offline_runs(tmp_path / "runs/tiny")
    assert not (tmp_path / "home" / ".netrc").exists()


@pytest.mark.slow
def test_the_pipeline_runs_offline_with_no_wandb_account_and_no_variables(tmp_path, tiny_llama_dir):
    """The quickstart's first stages as `make quickstart` runs them (a tiny model keeps it short)."""
    root = tmp_path / "runs" / "quickstart"
    result = run(
        [
            "lit_rlhf.pipeline",
            "--setting",
            "quickstart",
            "--root",
            str(root),
            "--model",
            str(tiny_llama_dir),
            "--stages",
            "pairs,reward_model",
        ],
        tmp_path,
        user_env(tmp_path / "home"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / "reward_model" / "reward_model" / "config.json").exists()
    assert offline_runs(root / "reward_model")


@pytest.mark.slow
def test_wandb_mode_online_still_asks_for_the_account(tmp_path):
    """WANDB_MODE=online is the user's choice over the configs' offline: true: with no key, W&B says so."""
    env = user_env(tmp_path / "home", WANDB_MODE="online", WANDB_INIT_TIMEOUT="30")
    result = run(
        [
            "lit_rlhf",
            "fit",
            "--config",
            "configs/tinygpt/pretrain.yaml",
            *TINY_RUN,
            "--trainer.default_root_dir",
            "runs/tiny",
        ],
        tmp_path,
        env,
    )
    assert result.returncode != 0
    assert "API key" in result.stderr or "wandb login" in result.stderr, result.stderr[-2000:]
    assert not offline_runs(tmp_path / "runs/tiny")


@pytest.mark.slow
def test_converting_the_embedded_model_leaves_the_seeded_stream_alone(tmp_path, monkeypatch):
    """A new user's first run converts the GGUF after `seed_everything`: its random initial weights drew
    from the seeded stream, so the first quickstart's reward head (and every number after it) differed
    from every later run's (reward model val/loss 0.736 vs 0.626 at the first validation)."""
    import torch

    from lit_rlhf.models import hf

    monkeypatch.setenv("LIT_RLHF_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    folder = hf.embedded_smollm2_folder()
    assert (folder / "config.json").exists() and folder.is_relative_to(tmp_path)
    assert torch.equal(torch.rand(3), expected)
