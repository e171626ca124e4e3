import math

import pandas as pd
import pytest
import yaml

from lit_rlhf.errors import UserInputError
from lit_rlhf.tinygpt.results import COLUMNS, main, results_table
from lit_rlhf.tinygpt.sft import answer_metrics


def scores(generated: str, target: str) -> dict[str, float]:
    metrics = answer_metrics(prefix="")
    metrics.update([generated], [[target]])
    return {k: v.item() for k, v in metrics.compute().items()}


def test_bleu_and_chrf_on_known_strings():
    same = "the cat sat on the mat"
    assert scores(same, same) == pytest.approx({"bleu_char": 1, "bleu_word": 1, "chrf": 1})
    assert scores("xyz uvw rst opq", "abc def ghi jkl") == pytest.approx({"bleu_char": 0, "bleu_word": 0, "chrf": 0})
    # characters a b c d e vs a b c d f: n-gram precisions 4/5, 3/4, 2/3, 1/2, same length
    assert scores("abcde", "abcdf")["bleu_char"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-4)
    # words: precisions 5/6, 3/5, 2/4, 1/3, same length
    word = scores("the cat sat on the mat", "the cat sat on a mat")["bleu_word"]
    assert word == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-4)
    assert 0 < scores("the cat sat on a hat", "the cat sat on a mat")["chrf"] < 1


def fake_run(root, rows: list[dict], hparams: dict | None = None, version: int = 0):
    folder = root / "csv" / f"version_{version}"
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    (folder / "hparams.yaml").write_text(yaml.safe_dump(hparams or {}))
    return root


def test_table_from_fake_runs(tmp_path):
    pretrain = fake_run(
        tmp_path / "pretrain",
        [
            {"step": 0, "train/loss": 5.0, "train/tokens_per_sec": 1000.0},
            {"step": 99, "train/loss": 2.0, "train/tokens_per_sec": 3000.0},
            {"step": 99, "val/loss": 2.1, "val/bpc": 2.1 / math.log(2)},
        ],
    )
    # an earlier version in the same folder (before a resume): its steps join, the last values come from the newest
    fake_run(tmp_path / "sft", [{"step": 0, "train/loss": 9.0}], version=0)
    sft = fake_run(
        tmp_path / "sft",
        [
            {"step": 49, "train/loss": 1.5},
            {"step": 49, "val/loss": 1.7, "val/bleu_char": 0.31, "val/bleu_word": 0.02, "val/chrf": 0.25},
        ],
        version=1,
    )
    rl = fake_run(
        tmp_path / "rl",
        [
            {
                "step": s,
                "train/keyword_rate": rate,
                "train/reward": rate - 0.02,
                "train/kl": 0.01 * s,
                "train/distinct_char_frac": 0.4,
            }
            for s, rate in enumerate([0.0, 0.1, 0.0, 0.1, 0.5, 0.6, 0.7, 0.8])
        ],
        hparams={"init_from": str(tmp_path / "sft" / "checkpoints" / "last.ckpt")},
    )
    out = tmp_path / "out"
    table = main(["--pretrain", str(pretrain), "--sft", str(sft), "--rl", str(rl), "--out", str(out), "--window", "2"])
    assert list(table.columns) == COLUMNS
    assert list(table["Method"]) == ["Pre-training", "SFT", "RL-lite (REINFORCE)"]
    pre, sft_row, rl_row = (table.iloc[i] for i in range(3))
    assert (pre.Final_Train_Loss, pre.Val_Loss) == (2.0, 2.1)
    assert pre.Perplexity == pytest.approx(math.exp(2.1)) and math.isnan(pre.BLEU) and math.isnan(pre.Keyword_Rate)
    assert "2000 tokens/s" in pre.Notes and "val bpc 3.030" in pre.Notes
    assert (sft_row.Final_Train_Loss, sft_row.Val_Loss, sft_row.BLEU) == (1.5, 1.7, 0.31)
    assert sft_row.Perplexity == pytest.approx(math.exp(1.7)) and "chrF 0.250" in sft_row.Notes
    assert sft_row.Keyword_Rate == pytest.approx(0.05)  # RL-lite started from the SFT run: its first 2 steps
    assert rl_row.Keyword_Rate == pytest.approx(0.75)
    assert "0.050 -> 0.750" in rl_row.Notes and math.isnan(rl_row.Val_Loss)

    markdown = (out / "tinygpt_results.md").read_text()
    assert markdown.startswith("| Method | Final_Train_Loss | Val_Loss | Perplexity | BLEU | Keyword_Rate | Notes |")
    assert "| Pre-training | 2.0000 | 2.1000 | 8.1662 | n/a | n/a |" in markdown
    pd.testing.assert_frame_equal(pd.read_csv(out / "tinygpt_results.csv"), table)


def test_wandb_table_in_an_offline_run(tmp_path):
    run = fake_run(tmp_path / "pretrain", [{"step": 0, "train/loss": 3.0}, {"step": 0, "val/loss": 2.5}])
    main(["--pretrain", str(run), "--out", str(tmp_path / "out"), "--wandb"])
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))


def test_errors(tmp_path):
    with pytest.raises(UserInputError, match="at least one run"):
        results_table()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="metrics.csv"):
        results_table(pretrain=tmp_path / "empty")
