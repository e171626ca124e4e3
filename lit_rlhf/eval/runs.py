"""Reading finished runs: a run folder is a trainer.default_root_dir with csv/version_N/metrics.csv."""

from pathlib import Path

import pandas as pd

from lit_rlhf.errors import UserInputError, require_existing


def latest_version(run_dir: str | Path) -> Path:
    """The newest `csv/version_N` folder of a run (a second run in the same folder adds version_N+1)."""
    root = require_existing(str(run_dir), "run folder")
    versions = [v for v in (root / "csv").glob("version_*") if (v / "metrics.csv").is_file()]
    if not versions:
        raise UserInputError(f"'{run_dir}' has no csv/version_*/metrics.csv: is it a trainer.default_root_dir?")
    return max(versions, key=lambda v: int(v.name.split("_")[-1]))


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(latest_version(run_dir) / "metrics.csv")
