"""REINFORCE on a tiny TinyGPT over a 4-character vocabulary: the keyword is in ~8% of the first
completions, and the keyword rate must rise within a few dozen steps."""

import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lit_rlhf.tinygpt.pretrain import read_tinygpt_checkpoint
from lit_rlhf.tinygpt.prompts import PromptsDataModule
from lit_rlhf.tinygpt.rl_lite import RLLiteModule, distinct_char_fraction
from lit_rlhf.tinygpt.tokenizer import UNK

VOCAB = [UNK, "a", "d", "t"]


@pytest.mark.usefixtures("one_thread")
def test_keyword_rate_rises(tmp_path, tinygpt_checkpoint):
    ckpt = tinygpt_checkpoint(VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = RLLiteModule(
        init_from=str(ckpt),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        keyword="data",
        target_len=12,
        partial_credit=0.5,
        samples_per_prompt=64,
        max_new_chars=12,
        entropy_coef=0.01,
        kl_coef=0.01,
        log_samples_every_n_steps=10,
    )
    trainer = Trainer(
        max_steps=40,
        logger=CSVLogger(tmp_path, name="csv"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, PromptsDataModule(prompts=["a", "t"], steps_per_epoch=40))
    metrics = pd.read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    rate = metrics["train/keyword_rate"].dropna()
    assert len(rate) == 40
    start, end = rate.iloc[:5].mean(), rate.iloc[-5:].mean()
    assert 0 < start < 0.2 and end > start + 0.4, (start, end)
    assert metrics["train/kl"].dropna().iloc[0] < 1e-6  # the policy starts as the reference
    assert metrics["train/kl"].dropna().iloc[-1] > 0
    assert (tmp_path / "samples" / "samples_rl_lite.jsonl").is_file()

    # RL-lite checkpoints reload and can start another TinyGPT stage
    trainer.save_checkpoint(tmp_path / "rl.ckpt")
    reloaded = RLLiteModule.load_from_checkpoint(tmp_path / "rl.ckpt", weights_only=True)
    assert reloaded.baselines.keys() == {"a", "t"}
    vocab, _, state = read_tinygpt_checkpoint(str(tmp_path / "rl.ckpt"))
    assert vocab == VOCAB and set(state) == set(model.model.state_dict())
    torch.testing.assert_close(reloaded.ref_model.wte.weight, model.ref_model.wte.weight)


def test_completions_stop_at_stop_char(tinygpt_checkpoint):
    ckpt = tinygpt_checkpoint([UNK, "a", "b", "\n"], block_size=8, n_layer=1, n_head=1, n_embd=8)
    model = RLLiteModule(init_from=str(ckpt), samples_per_prompt=64, max_new_chars=12, stop_char="\n")
    seqs, mask, texts = model.sample_completions("ab")
    assert seqs.shape == (64, 14) and mask.shape == (64, 12)
    stop = model.tokenizer.index["\n"]
    assert (seqs[:, 2:] == stop).any(1).sum() > 10  # enough stopped completions to test
    for row, row_mask, text in zip(seqs[:, 2:], mask, texts):
        end = row.tolist().index(stop) if stop in row else 12
        assert text == model.tokenizer.decode(row[:end]) and "\n" not in text
        assert row_mask.tolist() == [True] * min(end + 1, 12) + [False] * (11 - end)  # the stop is an action too


def test_distinct_char_fraction():
    assert distinct_char_fraction("ssss") == 0.25
    assert distinct_char_fraction("") == 0.0
    assert distinct_char_fraction("abc") == 1.0
