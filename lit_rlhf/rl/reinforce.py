"""REINFORCE maths for RL-lite: the reference report's reward and a token-level policy-gradient loss."""

import torch
import torch.nn.functional as F

from lit_rlhf.rl.common import masked_mean


def keyword_progress(text: str, keyword: str) -> int:
    """Length of the longest prefix of `keyword` that occurs in `text` (case-insensitive):
    len(keyword) when the keyword itself occurs."""
    text, keyword = text.lower(), keyword.lower()
    return next((n for n in range(len(keyword), 0, -1) if keyword[:n] in text), 0)


def keyword_length_reward(
    text: str,
    keyword: str = "data",
    target_len: int = 60,
    length_weight: float = 0.25,
    partial_credit: float = 0.0,
) -> float:
    """The report's reward: +1 if `keyword` occurs in `text` (case-insensitive), plus a gentle
    parabola in the length, -length_weight * ((len - target_len) / target_len)^2: 0 at the target,
    -length_weight for an empty text or one twice the target length.

    `partial_credit` > 0 (not in the report) adds partial_credit * k / len(keyword) when only the
    first k characters of the keyword occur: a denser signal for a keyword the start model almost
    never writes. With 0 the reward is exactly the report's."""
    progress = keyword_progress(text, keyword)
    if progress == len(keyword):
        r_keyword = 1.0
    else:
        r_keyword = partial_credit * progress / len(keyword)
    diff = len(text) - target_len
    return r_keyword - length_weight * diff * diff / (target_len * target_len + 1e-6)


def token_statistics(
    logits: torch.Tensor, ref_logits: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position (..., T): log-probability of the sampled token, entropy of the policy and
    KL(policy || reference), the last two exact over the vocabulary (cheap for characters, and
    without the variance of a sampled estimate)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    p = logp.exp()
    taken = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(p * logp).sum(-1)
    kl = (p * (logp - ref_logp)).sum(-1)
    return taken, entropy, kl


def update_baseline(baseline: float | None, rewards: torch.Tensor, momentum: float) -> float:
    """Exponential moving average of the mean reward (starts at the first batch's mean)."""
    mean = rewards.float().mean().item()
    return mean if baseline is None else momentum * baseline + (1 - momentum) * mean


def reinforce_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Token-level REINFORCE for (N, T) completions with one advantage (reward - baseline) each:
    -A * log pi(token) averaged over the completion tokens (`mask`), minus `entropy_coef` times
    the mean entropy, plus `kl_coef` times the mean KL to the starting model."""
    loss = -masked_mean(advantages.unsqueeze(-1) * logprobs, mask)
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * masked_mean(entropy, mask)
    if kl is not None and kl_coef:
        loss = loss + kl_coef * masked_mean(kl, mask)
    return loss
