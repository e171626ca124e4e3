"""The maths every RL method here shares, as pure functions of tensors: masked statistics (also
across data-parallel ranks), token log-probabilities and entropies, KL estimates and KL-coefficient
controllers. Method-specific losses live in `ppo.py`, `grpo.py`, `dpo.py` and `reinforce.py`.

Shapes: `(B, T)` over response tokens; `mask` is 1 on real response tokens and 0 on padding.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


# Sums a tensor over data-parallel ranks (an all-reduce); the identity on one device. Batch
# statistics taken through it are those of the global batch, the same on every rank.
SumAcrossRanks = Callable[[torch.Tensor], torch.Tensor]


def _local(total: torch.Tensor) -> torch.Tensor:
    return total


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, sum_across: SumAcrossRanks = _local
) -> torch.Tensor:
    if dim is None:
        return sum_across(masked_sum(values, mask)) / sum_across(mask.sum()).clamp(min=1)
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(
    values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, sum_across: SumAcrossRanks = _local
) -> torch.Tensor:
    mean = masked_mean(values, mask, sum_across=sum_across)
    var = masked_mean((values - mean) ** 2, mask, sum_across=sum_across)
    n = sum_across(mask.sum())
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, sum_across: SumAcrossRanks = _local
) -> torch.Tensor:
    """(x - mean) / std over the masked entries; padding stays 0 so it never leaks into losses."""
    mean, var = masked_mean(values, mask, sum_across=sum_across), masked_var(values, mask, sum_across=sum_across)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) for each position: logits (B, T, V), tokens (B, T) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token exp(q - p) - (q - p) - 1 >= 0 (Schulman's k3): GRPO's KL term and PPO's `kl_estimator: k3`."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1/k3).

    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, >= 0).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return k3_kl(logprobs, ref_logprobs)
    raise ValueError(f"unknown KL estimator '{estimator}' (use 'k1' or 'k3')")


def kl_horizon_for_run(total_samples: int, fraction: float) -> int:
    """The controller's horizon as a share of the run's rollout samples.

    With the error clipped at ±0.2, a KL held above (below) target for a share x of the run scales
    `kl_coef` by about exp(±0.2 x / fraction): at `fraction` 0.04 it doubles within 14% of the run,
    whatever the run's length. A fixed horizon (Ziegler et al.'s 10 000 samples) moves it by
    ±20% over a 10 000-sample run and by less than 1% over a CPU run: it could not steer.
    """
    return max(1, round(fraction * total_samples))


class AdaptiveKLController:
    """Ziegler et al. (2019): kl_coef *= 1 + clip(KL/target - 1, ±0.2) * n_steps / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


class FixedKLController(AdaptiveKLController):
    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value
