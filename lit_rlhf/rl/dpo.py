"""DPO and IPO maths, as pure functions of tensors (no models, no Lightning).

A sequence's log-prob sums the log-probs of its *response* tokens only: the prompt is given, not
chosen, so it carries no preference (and is the same on both sides of a pair). The implicit reward
`beta * (log pi - log pi_ref)` and the metric names built from it follow TRL's DPOTrainer.
"""

import torch
import torch.nn.functional as F


def response_token_mask(attention_mask: torch.Tensor, prompt_tokens: torch.Tensor) -> torch.Tensor:
    """(B, T-1) mask over next-token predictions: 1 where the predicted token is a response token.

    Rows are right-padded prompt + response; prediction column j scores token j + 1, so a response
    starting at token `prompt_tokens` is scored in columns `prompt_tokens - 1` to `length - 2`.
    """
    predicted = torch.arange(1, attention_mask.size(1), device=attention_mask.device)
    return ((predicted >= prompt_tokens.unsqueeze(1)) & attention_mask[:, 1:].bool()).float()


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(response | prompt) per row: the sum of the masked token log-probs, (B, T) -> (B,)."""
    return (token_logps * mask).sum(-1)


def implicit_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's reward of a response, `beta * log(pi / pi_ref)` (TRL's `rewards/chosen`, `rewards/rejected`)."""
    return beta * (logps - ref_logps)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO loss `-log sigmoid(beta * (chosen log-ratio - rejected log-ratio))`.

    `label_smoothing` = eps treats each label as flipped with probability eps (conservative DPO):
    `(1 - eps) * loss(x) + eps * loss(-x)`, which keeps the margin from growing without bound.
    """
    logits = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair IPO loss (Azar et al. 2023, eq. 17) `(h - 1 / (2 beta))^2`, beta being IPO's tau.

    h is the difference of the *per-token* log-ratios (each divided by its response's token count),
    as in TRL and the IPO paper's experiments: with sums the squared target would depend on length.
    """
    chosen = (chosen_logps - ref_chosen_logps) / chosen_tokens.clamp(min=1)
    rejected = (rejected_logps - ref_rejected_logps) / rejected_tokens.clamp(min=1)
    return (chosen - rejected - 1 / (2 * beta)) ** 2
