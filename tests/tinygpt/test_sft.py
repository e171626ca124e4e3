"""SFT through the CLI and configs/tinygpt/sft.yaml, from a TinyGPT checkpoint, on a text whose
answers are learnable in a few dozen steps (the alphabet: each answer continues its instruction)."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from lit_rlhf.cli import main
from lit_rlhf.tinygpt.pretrain import read_tinygpt_checkpoint
from lit_rlhf.tinygpt.sft import SFTTinyGPTModule
from lit_rlhf.tinygpt.tokenizer import UNK

REPO = Path(__file__).resolve().parents[2]
TEXT = "".join(chr(ord("a") + i % 26) for i in range(6000))
VOCAB = [UNK, *sorted(set(TEXT + "Instruction: \nAnswer: "))]


@pytest.mark.usefixtures("one_thread")
def test_sft_learns_answers_from_a_checkpoint(tmp_path, monkeypatch, tinygpt_checkpoint):
    monkeypatch.chdir(REPO)
    ckpt = tinygpt_checkpoint(VOCAB, block_size=32, n_embd=32, n_head=2)
    (tmp_path / "train.txt").write_text(TEXT)
    root = tmp_path / "sft"
    main(
        [
            "fit",
            "--config",
            "configs/tinygpt/sft.yaml",
            "--model.init_args.init_from",
            str(ckpt),
            "--data.path",
            str(tmp_path / "train.txt"),
            "--data.k",
            "16",
            "--data.stride",
            "32",
            "--data.batch_size",
            "16",
            "--trainer.max_steps",
            "60",
            "--trainer.val_check_interval",
            "30",
            "--trainer.limit_val_batches",
            "2",
            "--trainer.log_every_n_steps",
            "5",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(root),
        ]
    )
    metrics = pd.read_csv(root / "csv" / "version_0" / "metrics.csv")
    val_loss = metrics["val/loss"].dropna()
    assert len(val_loss) == 2 and val_loss.iloc[-1] < val_loss.iloc[0] < math.log(len(VOCAB)) + 0.5
    assert metrics["val/ppl"].dropna().iloc[-1] == pytest.approx(math.exp(val_loss.iloc[-1]), rel=1e-4)
    for key in ("val/bleu_char", "val/bleu_word", "val/chrf"):
        assert 0 <= metrics[key].dropna().iloc[-1] <= 1
    assert metrics["val/chrf"].dropna().iloc[-1] > 0.3  # the alphabet is easy to continue

    examples = [json.loads(line) for line in (root / "samples" / "samples_sft.jsonl").read_text().splitlines()]
    assert len(examples) == 2 * 3 and all(len(e["generated"]) == 16 for e in examples)
    assert all(len(e["instruction"]) == len(e["target"]) == 16 for e in examples)

    # the SFT checkpoint reloads on its own and can start the next stage (RL-lite)
    last = root / "checkpoints" / "last.ckpt"
    ckpt.unlink()  # reloading must not need the pretraining checkpoint any more
    model = SFTTinyGPTModule.load_from_checkpoint(last, weights_only=True)
    assert model.hparams.vocab == VOCAB and model.hparams.block_size == 32
    vocab, architecture, state = read_tinygpt_checkpoint(str(last))
    assert vocab == VOCAB and architecture["n_embd"] == 32
    torch.testing.assert_close(state["wte.weight"], model.model.wte.weight)


def test_loss_ignores_instruction_and_template(tinygpt_checkpoint):
    """Changing the targets outside the answer (where they are -100) leaves the loss unchanged;
    the loss equals the cross-entropy of the answer positions alone."""
    model = SFTTinyGPTModule(init_from=str(tinygpt_checkpoint(VOCAB, block_size=32, n_embd=32, n_head=2)))
    x = torch.randint(1, len(VOCAB), (2, 50))
    y = torch.randint(1, len(VOCAB), (2, 50))
    y[:, :30] = -100
    loss = model._loss((x, y))
    logits = model.model.sliding_logits(x, 16)[:, 30:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, len(VOCAB)), y[:, 30:].reshape(-1))
    torch.testing.assert_close(loss, expected)
