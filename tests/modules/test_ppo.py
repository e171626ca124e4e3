"""PPO on a tiny policy and a hand-built tiny reward model, through the CLI and the real configs."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lit_rlhf.cli import main
from lit_rlhf.modules.ppo import PPOModule
from ppo_fixtures import make_parity_policy, make_parity_reward_model


@pytest.fixture(scope="module")
def parity_models(tmp_path_factory, smol_tokenizer_dir):
    root = tmp_path_factory.mktemp("parity")
    return make_parity_policy(root / "policy", smol_tokenizer_dir), make_parity_reward_model(root / "rm", smol_tokenizer_dir)


CSV_ONLY = '[{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": ".", "name": "csv"}}]'


def run_ppo(config: str, root: Path, policy: Path, reward: Path, data_root: Path, *extra: str) -> pd.DataFrame:
    main([
        "fit", "--config", f"configs/{config}.yaml",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger", CSV_ONLY,
        "--trainer.enable_progress_bar", "false",
        "--model.model_name_or_path", str(policy),
        "--model.reward_model_path", str(reward),
        "--model.forward_batch_size", "8",
        "--model.max_new_tokens", "10",
        "--model.temperature", "1.0",
        "--model.ppo_epochs", "4",
        "--model.kl_horizon", "50",
        "--model.policy_optimizer.init_args.lr", "1e-2",
        "--model.value_optimizer.init_args.lr", "1e-3",
        "--data.path", str(data_root / "oasst1"),
        "--data.tokenizer_name_or_path", str(policy),
        "--data.num_train_prompts", "16",
        "--data.num_eval_prompts", "8",
        "--data.max_prompt_length", "48",
        "--data.batch_size", "16",
        *extra,
    ])
    return pd.read_csv(sorted(root.glob("csv/version_*/metrics.csv"))[-1])


def test_full_ppo_raises_reward_and_steers_kl(tmp_path, parity_models, data_root):
    policy, reward = parity_models
    every_iteration = ('[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
                       '{"dirpath": "checkpoints", "save_last": true, "save_top_k": 0, "every_n_train_steps": 8}}]')
    df = run_ppo("ppo_full", tmp_path, policy, reward, data_root, "--trainer.max_epochs", "7",
                 "--trainer.callbacks", every_iteration)
    scores = df["objective/scores"].tolist()
    # a rise of 0.4-0.9 over seeds 1, 2, 42 (the untrained policy scores about 0.5)
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2 + 0.3, scores
    kl, coef = df["objective/kl_per_token"].tolist(), df["kl_coef"].tolist()
    for i in range(len(coef) - 1):  # Ziegler's controller: up when KL is above target, down below
        assert (coef[i + 1] > coef[i]) == (kl[i] > 0.05), (i, kl[i], coef[i], coef[i + 1])
    assert {"objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/non_score_reward",
            "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio",
            "val/num_eos_tokens"} <= set(df.columns)
    assert (tmp_path / "eval_prompts.jsonl").exists()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    module = PPOModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    for (name, a), b in zip(exported.state_dict().items(), module.policy.state_dict().values()):
        assert torch.equal(a, b), name
    expected = coef[-1] * (1 + min(max(kl[-1] / 0.05 - 1, -0.2), 0.2) * 16 / 50)  # after the last update
    assert module.kl_controller.value == pytest.approx(expected, rel=1e-4)


def test_lora_trains_only_adapters_and_reloads(tmp_path, parity_models, data_root):
    policy, reward = parity_models
    base_before = AutoModelForCausalLM.from_pretrained(policy).state_dict()
    run_ppo("ppo_lora", tmp_path, policy, reward, data_root, "--trainer.max_epochs", "1")
    module = PPOModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert module.trainable_params["policy"] == sum(
        p.numel() for n, p in module.policy.named_parameters() if "lora_" in n
    ) > 0
    lora_b = [p for n, p in module.policy.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "adapters did not train"
    base_after = module.policy.get_base_model().state_dict()
    for name, weight in base_before.items():
        key = name.replace("q_proj.weight", "q_proj.base_layer.weight").replace("v_proj.weight", "v_proj.base_layer.weight")
        assert torch.equal(weight, base_after[key]), f"base weight {name} changed"
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(policy), tmp_path / "policy_adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    module.policy.eval()
    assert torch.allclose(adapter(ids).logits, module.policy(ids).logits, atol=1e-5)


def test_non_finite_reward_stops_with_clear_error(tmp_path, parity_models, data_root, monkeypatch, capsys):
    policy, reward = parity_models
    monkeypatch.setattr(PPOModule, "score", lambda self, p, r: torch.full((len(p),), math.nan))
    with pytest.raises(SystemExit) as exit_info:
        run_ppo("ppo_full", tmp_path, policy, reward, data_root, "--trainer.max_epochs", "1")
    assert exit_info.value.code == 2
    assert "non-finite scores" in capsys.readouterr().err
    assert not (tmp_path / "policy").exists()


def test_response_mask_finds_first_eos_when_pad_equals_eos(parity_models):
    policy, reward = parity_models
    module = PPOModule(model_name_or_path=str(policy), reward_model_path=str(reward))
    eos = module.tokenizer.eos_token_id
    assert module.tokenizer.pad_token_id == eos
    responses = torch.tensor([[5, 6, eos, eos, eos], [eos, eos, eos, eos, eos], [5, 6, 7, 8, 9]])
    mask, has_eos = module._response_mask(responses)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False]


def test_rollout_reuses_generation_logits_and_micro_batching_keeps_the_gradient(parity_models, data_root):
    """The rollout's log-probs come from `generate`'s logits and the forward passes run on
    length-grouped, trimmed micro-batches: both must give what one plain forward pass gives."""
    from lit_rlhf.data.oasst1_prompts import OASST1PromptDataModule
    from lit_rlhf.rl.ppo import gae, kl_estimate, logprobs_from_logits, masked_whiten, token_rewards

    policy, reward = parity_models
    torch.manual_seed(0)
    module = PPOModule(model_name_or_path=str(policy), reward_model_path=str(reward), forward_batch_size=16,
                       max_new_tokens=10, temperature=1.0, ppo_epochs=1)
    data = OASST1PromptDataModule(path=str(data_root / "oasst1"), tokenizer_name_or_path=str(policy),
                                  num_train_prompts=16, num_eval_prompts=8, max_prompt_length=48, batch_size=16)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert len({len(ids) for ids in batch["input_ids"]}) > 4  # prompts of many lengths: trimming matters
    module.hparams.forward_batch_size, module.hparams.generation_batch_size = 5, 6
    ro = module.rollout(batch)
    mask = ro["mask"]
    with torch.no_grad():
        module.policy.eval()
        plain = logprobs_from_logits(
            module._response_logits(module.policy, ro["sequences"], ro["attention_mask"], mask.size(1)), ro["responses"]
        )
        values = module._values(ro["sequences"], ro["attention_mask"], mask.size(1))
    assert torch.allclose(ro["logprobs"] * mask, plain * mask, atol=1e-4)
    assert torch.allclose(ro["ref_logprobs"] * mask, plain * mask, atol=1e-4)  # full variant: ref = policy at start
    assert torch.allclose(ro["values"] * mask, values * mask, atol=1e-5)
    single = torch.cat([module.score([p], [t]) for p, t in zip(ro["prompts"], ro["texts"])])
    assert torch.allclose(ro["scores"], single, atol=1e-5)

    kl = kl_estimate(ro["logprobs"], ro["ref_logprobs"]) * mask
    advantages, returns = gae(token_rewards(ro["scores"], kl, mask, 0.05)[0], ro["values"], mask, 1.0, 0.95)
    advantages = masked_whiten(advantages, mask)

    class GradientCapture:
        def __init__(self, params):
            self.params = list(params)

        def zero_grad(self):
            for p in self.params:
                p.grad = None

        def step(self):
            self.grads = torch.cat([p.grad.flatten() for p in self.params])

    policy_opt = GradientCapture(p for p in module.policy.parameters() if p.requires_grad)
    value_opt = GradientCapture(p for p in module.critic.parameters() if p.requires_grad)
    module.optimizers = lambda: (policy_opt, value_opt)
    module.manual_backward = lambda loss: loss.backward()
    module.clip_gradients = lambda *args, **kwargs: None
    grads = {}
    for micro in (16, 3):
        module.hparams.forward_batch_size = micro
        stats = module._optimise(ro, advantages, returns)
        grads[micro] = policy_opt.grads, value_opt.grads
        assert stats["policy/approxkl_avg"] < 1e-8  # the first pass sees the rollout policy
    for whole, micro in zip(grads[16], grads[3]):
        assert torch.allclose(whole, micro, rtol=1e-4, atol=1e-7)
