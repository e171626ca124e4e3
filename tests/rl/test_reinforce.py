import math

import pytest
import torch

from lit_rlhf.rl.common import masked_mean
from lit_rlhf.rl.reinforce import (
    keyword_length_reward,
    keyword_progress,
    reinforce_loss,
    token_statistics,
    update_baseline,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("x" * 60, 0.0),  # target length, no keyword
        ("DATA" + "x" * 56, 1.0),  # case-insensitive keyword, target length
        ("", -0.25),  # empty: -0.25 * (60/60)^2
        ("x" * 120, -0.25),  # twice the target
        ("some data" + "x" * 21, 1.0 - 0.25 * (30 / 60) ** 2),  # 30 chars: 0.9375
        ("x" * 45, -0.25 * (15 / 60) ** 2),  # the report's typical completion: -0.015625
    ],
)
def test_report_reward_values(text, expected):
    assert keyword_length_reward(text) == pytest.approx(expected, abs=1e-6)


def test_reward_is_configurable():
    assert keyword_length_reward("a cat", keyword="CAT", target_len=5) == pytest.approx(1.0)
    assert keyword_length_reward("x" * 10, target_len=20, length_weight=1.0) == pytest.approx(-0.25)


def test_partial_credit_for_keyword_prefixes():
    assert [keyword_progress(t, "data") for t in ("xyz", "Dx", "a dance", "dated", "DATA")] == [0, 1, 2, 3, 4]
    assert keyword_length_reward("a date" + "x" * 54, partial_credit=0.5) == pytest.approx(0.5 * 3 / 4)
    assert keyword_length_reward("big data" + "x" * 52, partial_credit=0.5) == pytest.approx(1.0)
    assert keyword_length_reward("a date" + "x" * 54) == 0.0  # the report's reward: no partial credit


def test_token_statistics_by_hand():
    logits = torch.tensor([[[0.0, 0.0]]])  # p = (0.5, 0.5)
    ref = torch.tensor([[[math.log(3.0), 0.0]]])  # q = (0.75, 0.25)
    logp, entropy, kl = token_statistics(logits, ref, torch.tensor([[1]]))
    assert logp.item() == pytest.approx(math.log(0.5))
    assert entropy.item() == pytest.approx(math.log(2))
    assert kl.item() == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert token_statistics(ref, ref, torch.tensor([[0]]))[2].item() == pytest.approx(0.0, abs=1e-7)


def test_baseline_moving_average():
    assert update_baseline(None, torch.tensor([1.0, 3.0]), 0.9) == 2.0
    assert update_baseline(2.0, torch.tensor([12.0]), 0.9) == pytest.approx(0.9 * 2 + 0.1 * 12)


def test_reinforce_loss_maths():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # the third token of the first completion is padding
    advantages = torch.tensor([2.0, -1.0])
    entropy = torch.full((2, 3), 0.7)
    kl = torch.tensor([[0.1, 0.3, 100.0], [0.2, 0.2, 0.2]])
    pg = -(2 * (-1 - 2) + -1 * (-1.5)) / 5  # token-level mean over the 5 real tokens = 0.9
    assert reinforce_loss(logprobs, advantages, mask).item() == pytest.approx(pg)
    full = reinforce_loss(logprobs, advantages, mask, entropy, kl, entropy_coef=0.1, kl_coef=0.5)
    assert full.item() == pytest.approx(pg - 0.1 * 0.7 + 0.5 * (1.0 / 5))
    full.backward()
    # the gradient raises the log-probability of positively rewarded tokens, lowers the others
    expected = torch.tensor([[-2 / 5, -2 / 5, 0.0], [1 / 5, 1 / 5, 1 / 5]])
    torch.testing.assert_close(logprobs.grad, expected)
    assert masked_mean(kl, mask).item() == pytest.approx(0.2)
