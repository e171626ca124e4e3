"""PPO maths against hand-computed values."""

import math

import pytest
import torch

from lit_rlhf.rl.common import AdaptiveKLController, kl_estimate, logprobs_from_logits, masked_mean, masked_whiten
from lit_rlhf.rl.ppo import gae, ppo_policy_loss, ppo_value_loss, token_rewards


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_kl_estimators():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -2.0])
    assert torch.allclose(kl_estimate(logp, ref, "k1"), t([0.5, 0.0]))
    assert torch.allclose(kl_estimate(logp, ref, "k3"), t([math.exp(-0.5) - 1 + 0.5, 0.0]))
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k2")


def test_adaptive_kl_controller_moves_towards_target_and_is_clipped():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, n_steps=100) == pytest.approx(0.1 * 1.002)  # error clipped to +0.2
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(3.0, n_steps=100) == pytest.approx(0.1 * 0.998)  # -0.5 clipped to -0.2
    ctl = AdaptiveKLController(0.1, target=0.05, horizon=100)
    assert ctl.update(0.055, n_steps=10) == pytest.approx(0.1 * (1 + 0.1 * 10 / 100))
    state = ctl.state_dict()
    other = AdaptiveKLController(1.0, 1.0, 1)
    other.load_state_dict(state)
    assert other.value == ctl.value and other.target == 0.05


def test_gae_matches_hand_computation():
    adv, ret = gae(t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7]), t([1.0, 1.0, 1.0]), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, t([0.225, 0.25, 0.3]))
    assert torch.allclose(ret, t([0.725, 0.85, 1.0]))


def test_gae_ignores_values_after_the_last_token():
    adv, _ = gae(t([0.0, 1.0, 0.0]), t([0.5, 0.6, 9.0]), t([1.0, 1.0, 0.0]), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, t([0.3, 0.4, 0.0]))


def test_gae_discount():
    adv, _ = gae(t([0.0, 1.0]), t([0.0, 0.0]), t([1.0, 1.0]), gamma=0.5, lam=1.0)
    assert torch.allclose(adv, t([0.5, 1.0]))


def test_token_rewards_put_score_on_last_real_token():
    rewards, non_score = token_rewards(torch.tensor([2.0]), t([0.1, 0.2, 0.3]), t([1.0, 1.0, 0.0]), kl_coef=0.5)
    assert torch.allclose(non_score, t([-0.05, -0.1, 0.0]))
    assert torch.allclose(rewards, t([-0.05, 1.9, 0.0]))


def test_masked_whiten_and_mean():
    x, mask = t([1.0, 2.0, 3.0, 4.0, 100.0]), t([1.0, 1.0, 1.0, 1.0, 0.0])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    std = math.sqrt(5 / 3)
    assert torch.allclose(masked_whiten(x, mask), t([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std, 0.0]), atol=1e-5)


def test_policy_loss_clipping():
    old = t([0.0, 0.0])
    new = t([math.log(1.5), math.log(1.5)])
    out = ppo_policy_loss(new, old, t([1.0, -1.0]), t([1.0, 1.0]), clip_range=0.2)
    assert out.loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert out.clipfrac.item() == pytest.approx(0.5)
    assert out.approxkl.item() == pytest.approx(0.5 * math.log(1.5) ** 2)
    assert out.ratio.item() == pytest.approx(1.5)


def test_value_loss_clipping():
    loss, clipfrac = ppo_value_loss(t([1.0, 0.6]), t([0.5, 0.5]), t([0.0, 1.0]), t([1.0, 1.0]), 0.2)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.16) / 2)
    assert clipfrac.item() == 0.0
    loss, clipfrac = ppo_value_loss(t([0.0]), t([0.5]), t([0.2]), t([1.0]), 0.2)
    # unclipped (0-0.2)^2 = 0.04; clipped (0.3-0.2)^2 = 0.01 -> max = 0.04
    assert loss.item() == pytest.approx(0.02)


def test_logprobs_from_logits():
    logits = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))
    assert torch.allclose(logprobs_from_logits(logits, torch.tensor([[1, 0]])), torch.log(t([0.75, 0.5])))


def test_kl_horizon_relative_to_the_run_lets_the_controller_steer():
    """Task scale: 2 000 prompts x 5 epochs in rollouts of 64. A KL at 3x the target must raise
    kl_coef enough to matter (here: by half) within the first 10% of the run; the fixed horizon of
    10 000 samples moved it by less than 4% there."""
    from lit_rlhf.rl.common import kl_horizon_for_run

    total, batch = 2000 * 5, 64
    iterations = total // batch
    relative = AdaptiveKLController(0.05, 0.05, kl_horizon_for_run(total, 0.04))
    fixed = AdaptiveKLController(0.05, 0.05, 10000)
    for _ in range(iterations // 10):
        relative.update(0.15, batch)
        fixed.update(0.15, batch)
    assert relative.value > 1.5 * 0.05
    assert fixed.value < 1.04 * 0.05
    assert kl_horizon_for_run(total, 0.04) == 400


def test_losses_divided_by_a_given_token_count_sum_to_the_whole_batch_loss():
    """Micro-batch losses normalised by the mini-batch's token count add up to the mini-batch's
    token mean, whatever the split (hand-split of a batch with rows of 1 and 4 tokens)."""
    torch.manual_seed(0)
    new, old, adv = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    values, old_values, returns = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1]])
    whole = ppo_policy_loss(new, old, adv, mask, 0.2).loss
    parts = sum(
        ppo_policy_loss(new[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], 0.2, 5.0).loss
        for i in range(2)
    )
    torch.testing.assert_close(parts, whole)
    row_weighted = sum(
        0.5 * ppo_policy_loss(new[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], 0.2).loss
        for i in range(2)
    )
    assert not torch.isclose(row_weighted, whole)  # the old per-micro-batch token mean
    whole_v = ppo_value_loss(values, old_values, returns, mask, 0.2)[0]
    parts_v = sum(
        ppo_value_loss(values[i : i + 1], old_values[i : i + 1], returns[i : i + 1], mask[i : i + 1], 0.2, 5.0)[0]
        for i in range(2)
    )
    torch.testing.assert_close(parts_v, whole_v)
