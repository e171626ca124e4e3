"""End to end through the CLI and the stage's YAML, on a small real text (Python's own docs)."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from lit_rlhf.cli import main
from lit_rlhf.errors import UserInputError
from lit_rlhf.tinygpt.pretrain import TinyGPTModule, read_tinygpt_checkpoint

REPO = Path(__file__).resolve().parents[2]


def fit(root, steps: int) -> None:
    main(
        [
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
            str(steps),
            "--trainer.val_check_interval",
            "40",
            "--trainer.limit_val_batches",
            "4",
            "--trainer.log_every_n_steps",
            "5",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(root),
        ]
    )


@pytest.mark.usefixtures("one_thread")
def test_fit_learns_reloads_samples_and_reruns(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    root = tmp_path / "run"
    fit(root, 80)
    metrics = pd.read_csv(root / "csv" / "version_0" / "metrics.csv")
    losses = metrics["train/loss"].dropna()
    assert losses.iloc[-3:].mean() < losses.iloc[:3].mean() - 0.5
    val_loss = metrics["val/loss"].dropna().iloc[-1]
    val_ppl = metrics["val/ppl"].dropna().iloc[-1]
    assert val_ppl == pytest.approx(math.exp(val_loss), rel=1e-4) and val_ppl > 1
    assert (root / "samples" / "samples_tinygpt.jsonl").is_file()

    ckpt = root / "checkpoints" / "last.ckpt"
    model = TinyGPTModule.load_from_checkpoint(ckpt, weights_only=True)
    assert model.hparams.block_size == 32 and len(model.hparams.vocab) > 50
    completion = model.sample(["The "], max_new_chars=20)[0]
    assert 0 < len(completion) <= 20

    # a later stage starting from this checkpoint gets the same network
    started = TinyGPTModule(init_from=str(ckpt))
    idx = model.tokenizer.encode("The function ").unsqueeze(0)
    torch.testing.assert_close(started(idx), model.eval()(idx))

    fit(root, 5)  # a second run in the same folder
    assert (root / "csv" / "version_1" / "metrics.csv").is_file()


def test_init_from_a_file_that_is_no_tinygpt_checkpoint(tmp_path):
    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, bad)
    with pytest.raises(UserInputError, match="not a TinyGPT checkpoint"):
        read_tinygpt_checkpoint(str(bad))
    with pytest.raises(UserInputError, match="does not exist"):
        TinyGPTModule(init_from=str(tmp_path / "missing.ckpt"))
