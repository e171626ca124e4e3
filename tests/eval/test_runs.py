"""Reading runs: a run resumed with `--ckpt_path last` (a new csv/version_N) is read whole."""

import pandas as pd
import pytest
import torch
from test_resume import REPO, every_n_steps, tinygpt_args

from lit_rlhf.cli import LitRLHFCLI
from lit_rlhf.eval.kl_monitor import KL_COLUMN, ppo_curves
from lit_rlhf.eval.runs import read_metrics


def write_version(run, version: int, rows: list[dict]) -> None:
    """Rows as Lightning's CSVLogger writes them: one per log call, other metrics' columns empty."""
    folder = run / "csv" / f"version_{version}"
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)


def test_a_later_version_replaces_the_redone_steps_metric_by_metric(tmp_path):
    # killed after step 4 with its checkpoint at step 3: the resumed version logs steps 3.. again
    write_version(
        tmp_path,
        0,
        [
            *({"epoch": 0, "step": s, KL_COLUMN: 0.01 * s, "kl_coef": 0.05} for s in range(5)),
            {"epoch": 0, "step": 4, "objective/scores": 0.4},
        ],
    )
    write_version(tmp_path, 1, [{"epoch": 0, "step": s, KL_COLUMN: 0.1 * s, "kl_coef": 0.06} for s in range(3, 7)])
    write_version(tmp_path, 10, [{"epoch": 1, "step": 7, KL_COLUMN: 0.7, "kl_coef": 0.07}])  # versions sort by number

    metrics = read_metrics(tmp_path)
    kl = metrics.dropna(subset=[KL_COLUMN])
    assert kl.step.tolist() == list(range(8))
    assert kl[KL_COLUMN].tolist() == pytest.approx([0.0, 0.01, 0.02, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert kl.kl_coef.tolist() == pytest.approx([0.05] * 3 + [0.06] * 4 + [0.07])
    # the score logged at step 4 only before the resume is kept, in its own row
    assert metrics.dropna(subset=["objective/scores"])[["step", "objective/scores"]].values.tolist() == [[4, 0.4]]

    curves = ppo_curves(tmp_path)
    assert curves.step.tolist() == list(range(8)) and curves[KL_COLUMN].iloc[3] == pytest.approx(0.3)


def test_a_resumed_tinygpt_run_is_read_whole(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.chdir(REPO)

    def args(steps: int) -> list[str]:
        return [every_n_steps(3) if a == every_n_steps(5) else a for a in tinygpt_args(tmp_path, steps)]

    LitRLHFCLI(args=args(5))  # logs steps 0-4, last.ckpt at step 3
    LitRLHFCLI(args=[*args(8), "--ckpt_path", "last"])  # csv/version_1: steps 3-7
    first, resumed = (pd.read_csv(tmp_path / f"csv/version_{v}/metrics.csv") for v in (0, 1))
    assert resumed.step.min() == 3 and first.step.max() == 4

    loss = read_metrics(tmp_path).dropna(subset=["train/loss"]).set_index("step")["train/loss"]
    assert loss.index.tolist() == list(range(8))
    expected = pd.concat([first[first.step < 3], resumed]).dropna(subset=["train/loss"]).set_index("step")["train/loss"]
    pd.testing.assert_series_equal(loss, expected)
