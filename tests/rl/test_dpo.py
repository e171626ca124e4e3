"""DPO / IPO maths against hand-computed values and against TRL 1.16's DPOTrainer on the same
log-probs (the whole module on a tiny model against TRL: tests/modules/test_dpo.py)."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lit_rlhf.rl.dpo import dpo_loss, implicit_rewards, ipo_loss, response_token_mask, sequence_logps


def approx(value):
    return pytest.approx(value, rel=1e-6, abs=1e-7)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_response_token_mask_marks_the_predictions_of_response_tokens():
    # row 0: 4 tokens, response from token 2; row 1: 5 tokens, response from token 1
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    mask = response_token_mask(attention, torch.tensor([2, 1]))
    # column j predicts token j + 1: row 0 scores tokens 2 and 3, not the padding token 4
    assert mask.tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]]


def test_sequence_logps_sums_only_masked_tokens():
    token_logps = t([-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, -0.5, -0.5])
    mask = t([0, 1, 1, 0], [1, 1, 1, 1])
    assert sequence_logps(token_logps, mask).tolist() == [-5.0, -2.0]


def test_implicit_rewards():
    assert torch.allclose(implicit_rewards(t(-5.0, -7.0), t(-6.0, -6.0), beta=0.5), t(0.5, -0.5))


def test_dpo_loss_by_hand():
    # chosen log-ratio -5 - (-6) = 1, rejected -7 - (-6) = -1: beta * (1 - (-1)) = 1 with beta 0.5
    args = (t(-5.0), t(-7.0), t(-6.0), t(-6.0))
    assert dpo_loss(*args, beta=0.5).item() == approx(math.log(1 + math.exp(-1)))
    # equal log-ratios: log 2, whatever beta
    assert dpo_loss(t(-3.0), t(-4.0), t(-3.0), t(-4.0), beta=0.1).item() == approx(math.log(2))
    # label smoothing 0.1: 0.9 * softplus(-1) + 0.1 * softplus(1) = softplus(-1) + 0.1
    smoothed = dpo_loss(*args, beta=0.5, label_smoothing=0.1).item()
    assert smoothed == approx(math.log(1 + math.exp(-1)) + 0.1)


def test_dpo_loss_pushes_chosen_up_and_rejected_down():
    chosen, rejected = t(-5.0).requires_grad_(), t(-7.0).requires_grad_()
    dpo_loss(chosen, rejected, t(-6.0), t(-6.0), beta=0.5).backward()
    # d/dchosen = -beta * sigmoid(-1), d/drejected = +beta * sigmoid(-1)
    expected = 0.5 / (1 + math.e)
    assert chosen.grad.item() == approx(-expected) and rejected.grad.item() == approx(expected)


def test_ipo_loss_uses_per_token_log_ratios():
    # chosen: (-5 - -6) / 4 tokens = 0.25; rejected: (-7 - -6) / 2 tokens = -0.5; h = 0.75
    # beta 0.5: target 1 / (2 * 0.5) = 1, loss (0.75 - 1)^2
    loss = ipo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), t(4.0), t(2.0), beta=0.5)
    assert loss.item() == approx(0.0625)
    # h = 2 - (-2) = 4 is the target 1 / (2 * 0.125): the loss is 0, IPO stops pushing the margin
    # there (DPO never does)
    assert ipo_loss(t(-4.0), t(-8.0), t(-6.0), t(-6.0), t(1.0), t(1.0), beta=0.125).item() == 0.0


class FixedTokenLogProbs(torch.nn.Module):
    """Stands in for a model under TRL's fused LM head: returns given per-token log-probs, zero
    where the next-token label is -100 (what `trl.trainer.utils.add_fused_lm_head` returns)."""

    is_gradient_checkpointing = False

    def __init__(self, token_logps: torch.Tensor):
        super().__init__()
        self.token_logps = token_logps

    def forward(self, input_ids, attention_mask, labels, fused_lm_head, use_cache):
        scored = labels[:, 1:] != -100
        zeros = torch.zeros_like(self.token_logps)
        return SimpleNamespace(
            log_probs=self.token_logps.masked_fill(~scored, 0.0),
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros_like(scored),
        )


def trl_dpo_loss(loss_type: str, beta: float, label_smoothing: float, inputs: dict, policy, reference) -> float:
    """TRL 1.16's `DPOTrainer._compute_loss`, unbound, on a stand-in trainer holding what it reads."""
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = SimpleNamespace(
        model=policy,
        ref_model=reference,
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=label_smoothing,
        ld_alpha=None,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        use_weighting=False,
        aux_loss_enabled=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    return DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False).item()


def random_pairs(n_pairs: int, width: int, seed: int):
    """Right-padded chosen-then-rejected rows with random prompt/response lengths and token log-probs."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, width + 1, (2 * n_pairs,), generator=generator)
    prompt_tokens = (torch.rand(2 * n_pairs, generator=generator) * (lengths - 2)).long() + 1
    attention = (torch.arange(width) < lengths.unsqueeze(1)).long()
    completion = attention * (torch.arange(width) >= prompt_tokens.unsqueeze(1)).long()
    inputs = {
        "input_ids": torch.randint(0, 100, (2 * n_pairs, width), generator=generator),
        "attention_mask": attention,
        "completion_mask": completion,
    }
    policy, reference = (
        -5 * torch.rand(2 * n_pairs, width - 1, generator=generator, dtype=torch.float64) for _ in range(2)
    )
    return inputs, prompt_tokens, policy, reference


def ours(loss_type: str, beta: float, label_smoothing: float, inputs: dict, prompt_tokens, policy, reference) -> float:
    mask = response_token_mask(inputs["attention_mask"], prompt_tokens).double()
    chosen, rejected = sequence_logps(policy, mask).chunk(2)
    ref_chosen, ref_rejected = sequence_logps(reference, mask).chunk(2)
    if loss_type == "ipo":
        return ipo_loss(chosen, rejected, ref_chosen, ref_rejected, *mask.sum(1).chunk(2), beta).mean().item()
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing).mean().item()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_losses_equal_trl_on_the_same_log_probs(loss_type, beta):
    """Same per-token log-probs: our masks and losses give TRL's DPO/IPO loss (float64)."""
    inputs, prompt_tokens, policy, reference = random_pairs(n_pairs=5, width=12, seed=int(beta * 10))
    expected = trl_dpo_loss(loss_type, beta, 0.0, inputs, FixedTokenLogProbs(policy), FixedTokenLogProbs(reference))
    assert abs(ours(loss_type, beta, 0.0, inputs, prompt_tokens, policy, reference) - expected) < 1e-6
    assert expected > 0.01  # not a trivially small value


def test_label_smoothing_equals_trl_conservative_form():
    """TRL 1.16 keeps conservative DPO's `(1 - eps) loss(x) + eps loss(-x)` only inside its `aot`
    loss, which sorts log-ratios over the batch: on a single pair the sort changes nothing."""
    inputs, prompt_tokens, policy, reference = random_pairs(n_pairs=1, width=12, seed=3)
    expected = trl_dpo_loss("aot", 0.3, 0.2, inputs, FixedTokenLogProbs(policy), FixedTokenLogProbs(reference))
    assert abs(ours("sigmoid", 0.3, 0.2, inputs, prompt_tokens, policy, reference) - expected) < 1e-6
    assert abs(ours("sigmoid", 0.3, 0.0, inputs, prompt_tokens, policy, reference) - expected) > 1e-3
