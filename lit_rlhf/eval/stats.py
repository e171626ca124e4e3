"""Bootstrap intervals, win rates and text statistics for reward evaluation."""

from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap


@dataclass
class Interval:
    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def bootstrap_mean_ci(values, confidence: float = 0.95, n_resamples: int = 10000, seed: int = 0) -> Interval:
    """Percentile-bootstrap interval of the mean."""
    values = np.asarray(values, dtype=float)
    if values.size < 2 or np.all(values == values[0]):
        return Interval(float(values.mean()), float(values.mean()), float(values.mean()))
    result = bootstrap(
        (values,),
        np.mean,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return Interval(float(values.mean()), float(result.confidence_interval.low), float(result.confidence_interval.high))


def paired_gain_ci(treated, base, confidence: float = 0.95, n_resamples: int = 10000, seed: int = 0) -> Interval:
    """Interval of mean(treated - base) resampling prompts (both models answered the same prompts)."""
    treated, base = np.asarray(treated, dtype=float), np.asarray(base, dtype=float)
    if treated.shape != base.shape:
        raise ValueError("paired bootstrap needs one score per prompt for both models")
    return bootstrap_mean_ci(treated - base, confidence, n_resamples, seed)


def win_rate(treated, base) -> float:
    """Fraction of prompts where `treated` scores higher; ties count one half."""
    treated, base = np.asarray(treated, dtype=float), np.asarray(base, dtype=float)
    return float(((treated > base) + 0.5 * (treated == base)).mean())


def repetition_rate(token_ids: list[int], n: int = 3) -> float:
    """Share of repeated n-grams in a response (0 = no n-gram repeats; 1 - distinct-n)."""
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)
