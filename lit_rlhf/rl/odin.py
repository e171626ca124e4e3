"""ODIN's length-disentangled reward (Chen et al., ICML 2024, "ODIN: Disentangled Reward Mitigates
Hacking in RLHF", arXiv 2402.07319).

The reward model has two linear heads on the same features: a quality reward r_Q and a length reward
r_L. Their sum is what the pairwise (Bradley-Terry) loss sees, and two terms share it out:

    L = L_rank(r_Q + r_L) + lambda_L * (|rho(r_Q, L)| - rho(r_L, L)) + lambda_O * |cos(w_Q, w_L)|

rho is the Pearson correlation over the replies of a batch with their lengths L, so the length head
absorbs what length explains of the preference and the quality head is left with the rest; the head
weight vectors w_Q, w_L are pushed orthogonal. Policies then optimise r_Q alone. (The paper writes the
last term |w_Q^T w_L| on normalised weights: the cosine.)
"""

import torch


def pearson_correlation(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Differentiable Pearson correlation of two 1-D tensors; 0 (with zero gradient) when either
    has no variance, e.g. a batch whose replies are all as long."""
    xc, yc = x - x.mean(), y - y.mean()
    variances = xc.square().sum() * yc.square().sum()
    rho = (xc * yc).sum() / variances.clamp_min(eps).sqrt()  # clamped: no infinite gradient of sqrt at 0
    return torch.where(variances > eps, rho, torch.zeros_like(rho))


def length_disentangle_loss(quality: torch.Tensor, length_reward: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """|rho(r_Q, L)| - rho(r_L, L): lowest (-1) when the quality reward is uncorrelated with length
    and the length reward is a linear function of it."""
    lengths = lengths.to(quality.dtype)
    return pearson_correlation(quality, lengths).abs() - pearson_correlation(length_reward, lengths)


def orthogonality_loss(weight: torch.Tensor) -> torch.Tensor:
    """|cos| between the two heads' weight vectors (rows 0 and 1 of a [2, hidden] weight)."""
    return torch.nn.functional.cosine_similarity(weight[0], weight[1], dim=0).abs()
