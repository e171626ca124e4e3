"""PPO maths for RLHF, as pure functions of tensors (no models, no Lightning).

Shapes: `(B, T)` over response tokens; `mask` is 1 on real response tokens (up to and including
the first EOS) and 0 on padding. Names follow TRL's PPO trainer so curves compare one-to-one.
"""

from dataclasses import dataclass

import torch

from lit_rlhf.rl.common import masked_mean, masked_sum


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
