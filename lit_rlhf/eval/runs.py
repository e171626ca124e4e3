"""Reading finished runs: a run folder is a trainer.default_root_dir with csv/version_N/metrics.csv."""

from pathlib import Path

import pandas as pd

from lit_rlhf.errors import UserInputError, require_existing


def versions(run_dir: str | Path) -> list[Path]:
    """The `csv/version_N` folders of a run, oldest first (every start in the folder, a resume with
    `--ckpt_path last` included, adds version_N+1)."""
    root = require_existing(str(run_dir), "run folder")
    found = [v for v in (root / "csv").glob("version_*") if (v / "metrics.csv").is_file()]
    if not found:
        raise UserInputError(f"'{run_dir}' has no csv/version_*/metrics.csv: is it a trainer.default_root_dir?")
    return sorted(found, key=lambda v: int(v.name.split("_")[-1]))


def latest_version(run_dir: str | Path) -> Path:
    """The newest version: its hparams.yaml holds the configuration the run ended with."""
    return versions(run_dir)[-1]


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """All metrics of a run, in step order, from every version: a resumed run reads whole. The steps
    redone after a resume (from the checkpoint on) are in two versions; there a later version's value of
    a metric replaces the earlier ones, while the other metrics logged at that step are kept."""
    frame = pd.concat(
        [pd.read_csv(v / "metrics.csv").assign(_version=i) for i, v in enumerate(versions(run_dir))], ignore_index=True
    )
    metrics = [c for c in frame.columns if c not in ("step", "epoch", "_version")]
    for column in metrics:
        newest = frame["_version"].where(frame[column].notna()).groupby(frame["step"]).transform("max")
        frame.loc[frame["_version"] < newest, column] = float("nan")
    frame = frame.dropna(subset=metrics, how="all")  # rows whose every value was redone later
    return frame.sort_values("step", kind="stable").drop(columns="_version").reset_index(drop=True)
