"""ODIN's length-disentangling terms against hand-computed values."""

import math

import torch

from lit_rlhf.rl.odin import length_disentangle_loss, orthogonality_loss, pearson_correlation


def test_pearson_correlation_by_hand():
    x, y = torch.tensor([1.0, 3.0, 2.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    # centred: x [-1.5, .5, -.5, 1.5], y [-1.5, -.5, .5, 1.5]; sum xy = 4, sum x^2 = sum y^2 = 5
    assert pearson_correlation(x, y).item() == pytest_approx(0.8)
    assert pearson_correlation(y, 3 * y + 1).item() == pytest_approx(1.0)
    assert pearson_correlation(y, -y).item() == pytest_approx(-1.0)


def test_pearson_gradient_by_hand_and_zero_without_variance():
    x = torch.tensor([1.0, 3.0, 2.0, 4.0], requires_grad=True)
    y = torch.tensor([1.0, 2.0, 3.0, 4.0])
    pearson_correlation(x, y).backward()
    # d rho / d x = y_c / (|x_c| |y_c|) - rho x_c / |x_c|^2 = ([-1.5, -.5, .5, 1.5] - .8 [-1.5, .5, -.5, 1.5]) / 5
    torch.testing.assert_close(x.grad, torch.tensor([-0.06, -0.18, 0.18, 0.06]))
    flat = torch.full((4,), 2.0, requires_grad=True)  # all replies as long, or a constant reward
    rho = pearson_correlation(flat, y)
    rho.backward()
    assert rho.item() == 0.0 and torch.equal(flat.grad, torch.zeros(4))
    assert pearson_correlation(y, torch.ones(4)).item() == 0.0


def test_length_term_by_hand_and_its_gradient_signs():
    lengths = torch.tensor([1.0, 2.0, 3.0, 4.0])
    quality = torch.tensor([1.0, 3.0, 2.0, 4.0], requires_grad=True)
    length_reward = torch.tensor([2.0, 1.0, 4.0, 3.0], requires_grad=True)  # rho 0.6 with the lengths
    loss = length_disentangle_loss(quality, length_reward, lengths)
    assert loss.item() == pytest_approx(0.8 - 0.6)
    loss.backward()
    # a gradient step lowers the quality reward's |correlation| and raises the length reward's correlation
    with torch.no_grad():
        assert pearson_correlation(quality - 0.1 * quality.grad, lengths) < 0.8
        assert pearson_correlation(length_reward - 0.1 * length_reward.grad, lengths) > 0.6
    # a negative correlation of the quality reward is penalised as much as a positive one: its step raises it
    negative = torch.tensor([4.0, 2.0, 3.0, 1.0], requires_grad=True)
    assert length_disentangle_loss(negative, length_reward, lengths).item() == pytest_approx(0.8 - 0.6)
    length_disentangle_loss(negative, length_reward, lengths).backward()
    with torch.no_grad():
        assert pearson_correlation(negative - 0.1 * negative.grad, lengths) > -0.8
    # the ideal: quality uncorrelated with length, the length reward a linear function of it
    best = length_disentangle_loss(torch.tensor([1.0, 2.0, 2.0, 1.0]), 2 * lengths, lengths)
    assert best.item() == pytest_approx(-1.0)


def test_orthogonality_by_hand():
    assert orthogonality_loss(torch.tensor([[1.0, 0.0], [1.0, 1.0]])).item() == pytest_approx(1 / math.sqrt(2))
    assert orthogonality_loss(torch.tensor([[1.0, 0.0], [0.0, -3.0]])).item() == pytest_approx(0.0)
    assert orthogonality_loss(torch.tensor([[1.0, 2.0], [-2.0, -4.0]])).item() == pytest_approx(1.0)
    weight = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    orthogonality_loss(weight).backward()
    with torch.no_grad():  # a step makes the heads more orthogonal
        assert orthogonality_loss(weight - 0.1 * weight.grad) < 1 / math.sqrt(2)


def pytest_approx(value: float):
    import pytest

    return pytest.approx(value, abs=1e-6)
