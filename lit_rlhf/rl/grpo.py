"""Critic-free policy-gradient maths (GRPO, RLOO), as pure functions of tensors.

k responses are sampled per prompt and laid out group by group: rows [g*k, (g+1)*k) answer prompt
g. A response's advantage is its reward against the other responses to the same prompt, so no
value network is needed. Conventions and defaults follow TRL's GRPOTrainer and RLOOTrainer
(`epsilon_low/high`, `beta`, `loss_type`, `scale_rewards`) so results compare one-to-one.
"""

from dataclasses import dataclass

import torch

from lit_rlhf.rl.common import k3_kl, masked_mean


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards cannot form groups of {group_size} (at least 2 per prompt)")
    return rewards.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO: (r - mean of the prompt's group) / (std + 1e-4); std of the group, of the batch, or 1 ("none")."""
    grouped = _grouped(rewards, group_size)
    advantages = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        return advantages / (grouped.std(1).repeat_interleave(group_size) + 1e-4)
    if scale_rewards == "batch":
        return advantages / (rewards.std() + 1e-4)
    if scale_rewards == "none":
        return advantages
    raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', not '{scale_rewards}'")


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int, normalize: bool = False) -> torch.Tensor:
    """RLOO: r_i minus the mean reward of the other k-1 responses to the same prompt (Ahmadian et al., 2024);
    `normalize` then whitens them over the batch, as TRL's `normalize_advantages`."""
    grouped = _grouped(rewards, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    advantages = (grouped - baseline).view(-1)
    return (advantages - advantages.mean()) / (advantages.std() + 1e-4) if normalize else advantages


@dataclass
class GroupLossOutput:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    kl: torch.Tensor


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: str = "grpo",
    n_sequences: torch.Tensor | float | None = None,
    n_tokens: torch.Tensor | float | None = None,
) -> GroupLossOutput:
    """Clipped per-token surrogate with one advantage per sequence, plus `beta` x k3 KL.

    loss_type "grpo": mean over each sequence's tokens, then over sequences; "bnpo": mean over all
    tokens. `n_sequences` / `n_tokens` replace the batch's own counts when a mini-batch is split
    into micro-batches, so the sum of the micro-batch losses is the mini-batch's loss.
    """
    if loss_type not in {"grpo", "bnpo"}:
        raise ValueError(f"loss_type must be 'grpo' or 'bnpo', not '{loss_type}'")
    ratio = torch.exp(logprobs - old_logprobs)
    advantages = advantages.unsqueeze(1)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
    kl = k3_kl(logprobs, ref_logprobs) if beta else torch.zeros_like(per_token)
    per_token = per_token + beta * kl
    if loss_type == "grpo":
        per_sequence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        loss = per_sequence.sum() / (n_sequences if n_sequences is not None else per_sequence.numel())
    else:
        loss = (per_token * mask).sum() / (n_tokens if n_tokens is not None else mask.sum().clamp(min=1))
    clipped = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return GroupLossOutput(loss, masked_mean(clipped.float(), mask), masked_mean(kl, mask))


def rloo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    n_sequences: torch.Tensor | float | None = None,
) -> GroupLossOutput:
    """RLOO's clipped surrogate on whole-sequence ratios (TRL's RLOOTrainer): the ratio is
    exp(sum of the response's token log-prob changes), the loss a mean over sequences."""
    ratio = torch.exp(((logprobs - old_logprobs) * mask).sum(1))
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_sequence = -torch.min(ratio * advantages, clipped_ratio * advantages)
    loss = per_sequence.sum() / (n_sequences if n_sequences is not None else per_sequence.numel())
    clipped = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return GroupLossOutput(loss, clipped.float().mean(), torch.zeros(()))
