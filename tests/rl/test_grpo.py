"""GRPO / RLOO maths against hand-computed values and against TRL 1.16's own loss code."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lit_rlhf.rl.common import k3_kl
from lit_rlhf.rl.grpo import group_advantages, grpo_loss, leave_one_out_advantages, rloo_loss


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_group_advantages_by_hand():
    rewards = t(1.0, 3.0, 0.0, 0.0, 2.0, 4.0)  # groups of 2: (1, 3), (0, 0), (2, 4)
    std = math.sqrt(2.0)  # unbiased std of (1, 3) and of (2, 4)
    expected = t(-1 / (std + 1e-4), 1 / (std + 1e-4), 0.0, 0.0, -1 / (std + 1e-4), 1 / (std + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, 2), expected)
    torch.testing.assert_close(group_advantages(rewards, 2, "none"), t(-1.0, 1.0, 0.0, 0.0, -1.0, 1.0))
    torch.testing.assert_close(
        group_advantages(rewards, 2, "batch"), t(-1.0, 1.0, 0.0, 0.0, -1.0, 1.0) / (rewards.std() + 1e-4)
    )
    with pytest.raises(ValueError):
        group_advantages(rewards, 4)  # 6 rewards do not form groups of 4


def test_leave_one_out_advantages_by_hand():
    rewards = t(1.0, 2.0, 6.0)  # one group of 3: baselines (2+6)/2, (1+6)/2, (1+2)/2
    torch.testing.assert_close(leave_one_out_advantages(rewards, 3), t(1 - 4.0, 2 - 3.5, 6 - 1.5))
    whitened = leave_one_out_advantages(rewards, 3, normalize=True)
    assert abs(float(whitened.mean())) < 1e-6 and abs(float(whitened.std()) - 1) < 1e-3


def test_k3_kl_by_hand():
    logp, ref = t(-1.0, -2.0), t(-1.5, -2.0)
    torch.testing.assert_close(k3_kl(logp, ref), t(math.exp(-0.5) + 0.5 - 1, 0.0))


def test_grpo_loss_by_hand():
    """Ratio 1.5 with A=+1 is clipped at 1.2; ratio 0.5 with A=-1 at 0.8 (loss -A*min(rA, clip(r)A))."""
    old = t([0.0, 0.0], [0.0, 0.0])
    new = t([math.log(1.5), 0.0], [math.log(0.5), 0.0])
    adv = t(1.0, -1.0)
    mask = t([1.0, 1.0], [1.0, 0.0])
    # row 0 tokens: -min(1.5, 1.2) = -1.2 and -1.0 -> mean -1.1; row 1 token: -min(-0.5, -0.8) = 0.8
    out = grpo_loss(new, old, adv, mask, loss_type="grpo")
    assert out.loss.item() == pytest.approx((-1.1 + 0.8) / 2)
    assert out.clipfrac.item() == pytest.approx(2 / 3)
    bnpo = grpo_loss(new, old, adv, mask, loss_type="bnpo")
    assert bnpo.loss.item() == pytest.approx((-1.2 - 1.0 + 0.8) / 3)
    ref = t([0.0, 0.0], [0.0, 0.0])
    with_kl = grpo_loss(new, old, adv, mask, beta=0.1, ref_logprobs=ref, loss_type="bnpo")
    kl = k3_kl(new, ref)
    assert with_kl.loss.item() == pytest.approx(bnpo.loss.item() + 0.1 * float((kl * mask).sum() / 3))
    # micro-batches with the batch's counts add up to the batch's loss
    parts = sum(
        grpo_loss(new[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], n_sequences=2).loss for i in range(2)
    )
    assert parts.item() == pytest.approx(out.loss.item())


def test_rloo_loss_by_hand():
    old = t([0.0, 0.0], [0.0, 0.0])
    new = t([math.log(1.5), 0.0], [math.log(0.9), math.log(2.0)])  # sequence ratios 1.5 and 0.9 (masked 2.0)
    mask = t([1.0, 1.0], [1.0, 0.0])
    adv = t(2.0, 1.0)
    out = rloo_loss(new, old, adv, mask)
    assert out.loss.item() == pytest.approx((-1.2 * 2.0 - 0.9 * 1.0) / 2)
    assert out.clipfrac.item() == pytest.approx(0.5)


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_self(per_token_logps: torch.Tensor, **settings) -> SimpleNamespace:
    """The attributes TRL's `_compute_loss` reads, with the policy's log-probs given directly."""
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        use_vllm=False,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=_Accelerator(),
        _metrics=defaultdict(lambda: defaultdict(list)),
        **settings,
    )


def _rollout(seed: int = 0):
    torch.manual_seed(seed)
    b, prompt, width = 6, 3, 5
    lengths = torch.tensor([1, 5, 3, 2, 5, 4])
    mask = (torch.arange(width) < lengths.unsqueeze(1)).float()
    logps, old, ref = -torch.rand(b, width) * 2, -torch.rand(b, width) * 2, -torch.rand(b, width) * 2
    inputs = {
        "prompt_ids": torch.zeros(b, prompt, dtype=torch.long),
        "prompt_mask": torch.ones(b, prompt, dtype=torch.long),
        "completion_ids": torch.zeros(b, width, dtype=torch.long),
        "completion_mask": mask.long(),
    }
    return logps, old, ref, mask, inputs


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_grpo_loss_equals_trl(loss_type):
    from trl import GRPOTrainer

    logps, old, ref, mask, inputs = _rollout()
    rewards = torch.tensor([0.3, -1.2, 2.0, 0.5, 0.1, 0.1])
    advantages = group_advantages(rewards, 3)
    ours = grpo_loss(logps, old, advantages, mask, 0.2, 0.28, 0.04, ref, loss_type)
    trl_self = _trl_self(logps, loss_type=loss_type, beta=0.04, epsilon_low=0.2, epsilon_high=0.28)
    theirs = GRPOTrainer._compute_loss(
        trl_self, None, {**inputs, "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref}
    )
    assert abs(ours.loss.item() - theirs.item()) < 1e-6
    assert abs(ours.clipfrac.item() - trl_self._metrics["train"]["clip_ratio/region_mean"][0]) < 1e-6


def test_rloo_loss_equals_trl():
    from trl import RLOOTrainer

    logps, old, ref, mask, inputs = _rollout(1)
    rewards = torch.tensor([0.3, -1.2, 2.0, 0.5, 0.1, 0.9])
    kl = ((old - ref) * mask).sum(1)  # TRL: k1 KL of the sampling policy, summed, in the reward
    advantages = leave_one_out_advantages(rewards - 0.05 * kl, 3)
    ours = rloo_loss(logps, old, advantages, mask, 0.2, 0.2)
    trl_self = _trl_self(logps, epsilon_low=0.2, epsilon_high=0.2)
    theirs = RLOOTrainer._compute_loss(
        trl_self, None, {**inputs, "advantages": advantages, "old_logps": (old * mask).sum(1)}
    )
    assert abs(ours.loss.item() - theirs.item()) < 1e-6
