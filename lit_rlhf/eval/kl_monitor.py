"""KL-vs-step curves of PPO runs (from their metrics.csv) and a written reading of them."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lit_rlhf.errors import UserInputError  # noqa: E402
from lit_rlhf.eval.runs import read_metrics  # noqa: E402

KL_COLUMN = "objective/kl_per_token"


def ppo_curves(run_dir: str | Path) -> pd.DataFrame:
    """One row per PPO step: per-token KL, kl_coef and score."""
    frame = read_metrics(run_dir)
    frame = frame.groupby("step", as_index=False).first()
    if KL_COLUMN not in frame:
        raise UserInputError(f"'{run_dir}' has no {KL_COLUMN} column: is it a PPO run?")
    return frame[["step", KL_COLUMN, "kl_coef", "objective/scores"]].dropna(subset=[KL_COLUMN])


def interpret_kl(kl: list[float], low: float = 0.02, high: float = 0.1, name: str = "the policy") -> str:
    """A reading of a KL-per-token series against the target band, from its last third."""
    if not len(kl):
        return f"{name}: no KL values were logged."
    tail = kl[-max(1, len(kl) // 3) :]
    final = sum(tail) / len(tail)
    inside = sum(low <= v <= high for v in kl) / len(kl)
    trend = "rising" if kl[-1] > kl[0] else "falling or flat"
    summary = (
        f"{name}: mean per-token KL over the last {len(tail)} of {len(kl)} steps is {final:.4f} "
        f"({inside:.0%} of steps inside the {low}-{high} band; started at {kl[0]:.4f}, {trend})."
    )
    if final > high:
        return summary + (
            " That is above the band: the policy drifted far from the base LM, so its reward gains may come "
            "from exploiting the reward model (check length/repetition) rather than better answers; raise "
            "the KL coefficient/target or lower the learning rate."
        )
    if final < low:
        return summary + (
            " That is below the band: the policy stayed very close to the base LM and probably did not learn "
            "enough; train longer, raise the learning rate or lower the KL coefficient."
        )
    return summary + " That is inside the band: a moderate move away from the base LM, as intended."


def plot_kl(runs: dict[str, pd.DataFrame], out_png: Path, low: float = 0.02, high: float = 0.1) -> Path:
    """Per-token KL vs PPO step for each run with the target band, and kl_coef beside it."""
    fig, (ax_kl, ax_coef) = plt.subplots(1, 2, figsize=(11, 4))
    ax_kl.axhspan(low, high, color="tab:green", alpha=0.15, label=f"target band {low}-{high}")
    for name, curves in runs.items():
        ax_kl.plot(curves["step"], curves[KL_COLUMN], marker=".", label=name)
        ax_coef.plot(curves["step"], curves["kl_coef"], marker=".", label=name)
    ax_kl.set(xlabel="PPO step", ylabel="KL per token (policy || reference)", title="KL divergence vs step")
    ax_coef.set(xlabel="PPO step", ylabel="kl_coef", title="Adaptive KL coefficient")
    ax_kl.legend()
    ax_coef.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
