"""PPO maths for RLHF, as pure functions of tensors (no models, no Lightning).

Shapes: `(B, T)` over response tokens; `mask` is 1 on real response tokens (up to and including
the first EOS) and 0 on padding. Names follow TRL's PPO trainer so curves compare one-to-one.
"""

from collections.abc import Callable
from dataclasses import dataclass

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


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1/k3).

    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, >= 0).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
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


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (0 for an all-padding row)."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return (positions * mask.long()).max(dim=1).values


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL on every response token, plus the score on the last one.

    Returns (rewards, non_score_reward), both (B, T) and zero on padding.
    """
    non_score_reward = -kl_coef * kl * mask
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores * (mask.sum(1) > 0)
    return rewards, non_score_reward


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    Values after the last real token are treated as 0 (the episode has ended).
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    T = rewards.size(1)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def _token_normalised(values: torch.Tensor, mask: torch.Tensor, n_tokens) -> torch.Tensor:
    return masked_mean(values, mask) if n_tokens is None else masked_sum(values, mask) / n_tokens


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approxkl: torch.Tensor
    ratio: torch.Tensor


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    n_tokens: torch.Tensor | float | None = None,
) -> PolicyLossOutput:
    """Clipped surrogate: sum over tokens of max(-A r, -A clip(r, 1±ε)) / n_tokens.

    `n_tokens` defaults to this mask's token count (a token mean). A micro-batch passes its
    mini-batch's count, so every token of the mini-batch weighs the same whatever micro-batch it
    falls in; the statistics stay means over this mask.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = _token_normalised(torch.max(unclipped, clipped), mask, n_tokens)
    return PolicyLossOutput(
        loss=loss,
        clipfrac=masked_mean((clipped > unclipped).float(), mask),
        approxkl=0.5 * masked_mean(log_ratio**2, mask),
        ratio=masked_mean(ratio, mask),
    )


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
    n_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * sum(max((V - R)^2, (clip(V, V_old ± ε) - R)^2)) / n_tokens (as the
    policy loss); returns (loss, clipfrac)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * _token_normalised(torch.max(unclipped_loss, clipped_loss), mask, n_tokens)
    return loss, masked_mean((clipped_loss > unclipped_loss).float(), mask)
