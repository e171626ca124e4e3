"""Mistakes a new user makes on the command line, each refused with one paragraph (exit 2) before a
run folder, a metrics version or a W&B run is created, and without exporting an untrained model."""

import os
from types import SimpleNamespace

import pytest
from helpers import TINY_RUN, cli_error

from lit_rlhf import callbacks
from lit_rlhf.cli import main

TINY = ["--config", "configs/tinygpt/pretrain.yaml", *TINY_RUN]
pytestmark = pytest.mark.usefixtures("one_thread")


def refused(capsys, args: list[str]) -> str:
    return cli_error(capsys, lambda: main(args))


def test_a_checkpoint_file_that_does_not_exist_leaves_no_run_behind(tmp_path, capsys):
    """Before: a 40-line FileNotFoundError after csv/version_N and an offline W&B run were created."""
    root = tmp_path / "run"
    message = refused(
        capsys, ["fit", *TINY, "--trainer.default_root_dir", str(root), "--ckpt_path", str(tmp_path / "nothere.ckpt")]
    )
    assert "--ckpt_path" in message and "does not exist" in message and "--ckpt_path last" in message
    assert not root.exists()


def test_a_data_path_that_does_not_exist_leaves_no_csv_version_and_no_wandb_run(tmp_path, capsys):
    """The data module finds it in `setup`, after Lightning created the loggers' folders: they are removed."""
    root = tmp_path / "run"
    (root / "notes").mkdir(parents=True)  # what the user had there stays
    message = refused(
        capsys, ["fit", *TINY, "--data.path", str(tmp_path / "no_wiki"), "--trainer.default_root_dir", str(root)]
    )
    assert "no_wiki" in message and "does not exist" in message
    assert sorted(p.name for p in root.iterdir()) == ["notes"]


@pytest.mark.parametrize(
    "option",
    [
        ["--trainer.max_steps", "0"],
        ["--trainer.max_epochs", "0", "--trainer.max_steps", "-1"],
        ["--trainer.limit_train_batches", "0"],
    ],
    ids=["max_steps", "max_epochs", "no_batches"],
)
def test_a_run_that_would_train_nothing_is_refused(option, tmp_path, capsys):
    """Before: --trainer.max_steps 0 made the reward model export an untrained random head that PPO accepted."""
    root = tmp_path / "run"
    message = refused(capsys, ["fit", *TINY, *option, "--trainer.default_root_dir", str(root)])
    assert "no optimizer step" in message and "untrained" in message
    assert not root.exists()


@pytest.mark.parametrize("export", [callbacks.ExportPolicy(), callbacks.ExportBest(monitor="val/loss")])
def test_nothing_is_exported_from_a_run_that_took_no_step(export, capsys):
    """A run whose data gave no training batch ends without writing a policy or reward model."""
    module = SimpleNamespace(
        export_run=lambda best: pytest.fail("exported an untrained model"), hparams=SimpleNamespace(lora=None)
    )
    trainer = SimpleNamespace(
        global_step=0, is_global_zero=True, checkpoint_callbacks=[], strategy=SimpleNamespace(barrier=lambda: None)
    )
    export.on_fit_end(trainer, module)
    assert "nothing exported" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["16-mixed", "16"])
def test_fp16_on_a_cpu_is_refused_not_silently_bf16(precision, tmp_path, capsys):
    message = refused(
        capsys,
        [
            "fit",
            *TINY,
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            precision,
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ],
    )
    assert f"--trainer.precision {precision}" in message and "32-true" in message and "bf16" in message
    assert not (tmp_path / "run").exists()


def test_more_cpu_processes_than_cores_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    message = refused(
        capsys,
        [
            "fit",
            *TINY,
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "4",
            "--trainer.strategy",
            "ddp",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ],
    )
    assert "--trainer.devices 4" in message and "2 cores" in message and "--trainer.devices 1" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "config, where",
    [
        ("configs/rlhf/dpo.yaml", "--model.optimizer.init_args.lr"),
        ("configs/rlhf/ppo.yaml", "--model.policy_optimizer.init_args.lr"),
    ],
)
def test_model_lr_says_where_the_learning_rate_lives(config, where, capsys):
    message = refused(capsys, ["fit", "--config", config, "--model.lr", "3e-4"])
    assert "has no option 'lr'" in message and where in message


def test_a_learning_rate_that_is_no_number(capsys):
    """Before: 'unrecognized arguments: --optimizer.init_args.lr=fast' (or 'no such class')."""
    message = refused(capsys, ["fit", "--config", "configs/rlhf/dpo.yaml", "--model.optimizer.init_args.lr", "fast"])
    assert "--model.optimizer.init_args.lr fast: must be a number" in message


def test_a_mistyped_key_in_a_config_file_names_the_file_and_the_nearest_key(tmp_path, capsys):
    typo = tmp_path / "mine.yaml"
    typo.write_text("data:\n  init_args:\n    max_lenght: 128\n")
    message = refused(capsys, ["fit", "--config", "configs/rlhf/reward_model.yaml", "--config", str(typo)])
    assert str(typo) in message and "'max_lenght'" in message and "did you mean --data.max_length?" in message
