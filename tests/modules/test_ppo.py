"""PPO on a tiny policy and a hand-built tiny reward model, through the CLI and the real configs."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import config_args
from peft import PeftModel
from ppo_fixtures import make_parity_policy, make_parity_reward_model
from transformers import AutoModelForCausalLM

from lit_rlhf.cli import main
from lit_rlhf.modules.ppo import PPOModule


@pytest.fixture(scope="module")
def parity_models(tmp_path_factory, smol_tokenizer_dir):
    root = tmp_path_factory.mktemp("parity")
    return make_parity_policy(root / "policy", smol_tokenizer_dir), make_parity_reward_model(
        root / "rm", smol_tokenizer_dir
    )


CSV_ONLY = '[{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": ".", "name": "csv"}}]'


def run_ppo(config: str, root: Path, policy: Path, reward: Path, data_root: Path, *extra: str) -> pd.DataFrame:
    main(
        [
            "fit",
            *config_args(config),
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger",
            CSV_ONLY,
            "--trainer.enable_progress_bar",
            "false",
            "--model.model_name_or_path",
            str(policy),
            "--model.reward_model_path",
            str(reward),
            "--model.forward_batch_size",
            "8",
            "--model.max_new_tokens",
            "10",
            "--model.temperature",
            "1.0",
            "--model.ppo_epochs",
            "4",
            "--model.kl_horizon_fraction",
            "0.5",
            "--model.policy_optimizer.init_args.lr",
            "1e-2",
            "--model.value_optimizer.init_args.lr",
            "1e-3",
            "--data.path",
            str(data_root / "oasst1"),
            "--data.num_train_prompts",
            "16",
            "--data.num_eval_prompts",
            "8",
            "--data.max_prompt_length",
            "48",
            "--data.batch_size",
            "16",
            *extra,
        ]
    )
    return pd.read_csv(sorted(root.glob("csv/version_*/metrics.csv"))[-1])


def test_full_ppo_raises_reward_and_steers_kl(tmp_path, parity_models, data_root):
    policy, reward = parity_models
    every_iteration = (
        '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
        '{"dirpath": "checkpoints", "save_last": true, "save_top_k": 0, "every_n_train_steps": 8}}]'
    )
    df = run_ppo(
        "ppo_full",
        tmp_path,
        policy,
        reward,
        data_root,
        "--trainer.max_epochs",
        "7",
        "--trainer.callbacks",
        every_iteration,
    )
    scores = df["objective/scores"].tolist()
    # a rise of 0.4-0.9 over seeds 1, 2, 42 (the untrained policy scores about 0.5)
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2 + 0.3, scores
    kl, coef = df["objective/kl_per_token"].tolist(), df["kl_coef"].tolist()
    for i in range(len(coef) - 1):  # Ziegler's controller: up when KL is above target, down below
        assert (coef[i + 1] > coef[i]) == (kl[i] > 0.05), (i, kl[i], coef[i], coef[i + 1])
    assert {
        "objective/kl",
        "objective/entropy",
        "objective/rlhf_reward",
        "objective/non_score_reward",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/ratio",
        "val/num_eos_tokens",
        "val/truncated_share",
        "policy/approxkl_avg_first_epoch",
    } <= set(df.columns)
    assert (tmp_path / "eval_prompts.jsonl").exists()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    module = PPOModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    for (name, a), b in zip(exported.state_dict().items(), module.policy.state_dict().values()):
        assert torch.equal(a, b), name
    # horizon: 0.5 x the run's 7 x 16 rollout samples = 56
    expected = coef[-1] * (1 + min(max(kl[-1] / 0.05 - 1, -0.2), 0.2) * 16 / 56)  # after the last update
    assert module.kl_controller.horizon == 56
    assert module.kl_controller.value == pytest.approx(expected, rel=1e-4)


def test_the_system_instruction_reaches_the_training_prompts_and_the_export(
    tmp_path, parity_models, data_root, monkeypatch
):
    """--model.system_prompt: the data module encodes every training prompt under it (CLI link), and
    the exported policy records it for the evaluation."""
    import json

    import lit_rlhf.data.oasst1_prompts as prompts_module
    from lit_rlhf.artifacts import REWARD_MODEL_INFO

    policy, reward = parity_models
    encoded = []
    real = prompts_module.chat_prompt_ids

    def spy(tokenizer, prompt, max_length, system_prompt=None):
        encoded.append(system_prompt)
        return real(tokenizer, prompt, max_length, system_prompt)

    monkeypatch.setattr(prompts_module, "chat_prompt_ids", spy)
    run_ppo(
        "ppo_full",
        tmp_path,
        policy,
        reward,
        data_root,
        "--trainer.max_epochs",
        "1",
        "--model.system_prompt",
        "Answer in one sentence.",
    )
    assert encoded and set(encoded) == {"Answer in one sentence."}
    record = json.loads((tmp_path / "policy" / REWARD_MODEL_INFO).read_text())
    assert record == {"system_prompt": "Answer in one sentence."}


def test_lora_trains_only_adapters_and_reloads(tmp_path, parity_models, data_root):
    policy, reward = parity_models
    base_before = AutoModelForCausalLM.from_pretrained(policy).state_dict()
    run_ppo("ppo_lora", tmp_path, policy, reward, data_root, "--trainer.max_epochs", "1")
    module = PPOModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (
        module.trainable_params["policy"]
        == sum(p.numel() for n, p in module.policy.named_parameters() if "lora_" in n)
        > 0
    )
    lora_b = [p for n, p in module.policy.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "adapters did not train"
    base_after = module.policy.get_base_model().state_dict()
    for name, weight in base_before.items():
        key = name.replace("q_proj.weight", "q_proj.base_layer.weight").replace(
            "v_proj.weight", "v_proj.base_layer.weight"
        )
        assert torch.equal(weight, base_after[key]), f"base weight {name} changed"
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(policy), tmp_path / "policy_adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    module.policy.eval()
    assert torch.allclose(adapter(ids).logits, module.policy(ids).logits, atol=1e-5)


def test_non_finite_reward_stops_with_clear_error(tmp_path, parity_models, data_root, monkeypatch, capsys):
    policy, reward = parity_models
    monkeypatch.setattr(PPOModule, "score", lambda self, p, r, ended: torch.full((len(p),), math.nan))
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


class GradientCapture:
    """Stands in for an optimizer: records the gradient at `step` and changes no weight."""

    def __init__(self, params):
        self.params = list(params)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads = torch.cat([p.grad.flatten() for p in self.params])


def updates_without_steps(module: PPOModule) -> tuple[GradientCapture, GradientCapture]:
    """Let `_optimise` run outside `fit`: a trainer for the rank reductions, optimizers that only record."""
    from lightning.pytorch import Trainer

    module.trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    policy_opt = GradientCapture(p for p in module.policy.parameters() if p.requires_grad)
    value_opt = GradientCapture(p for p in module.critic.parameters() if p.requires_grad)
    module.optimizers = lambda: (policy_opt, value_opt)
    module.manual_backward = lambda loss: loss.backward()
    module.clip_gradients = lambda *args, **kwargs: None
    return policy_opt, value_opt


def prompt_batch(policy, data_root, n: int = 16) -> dict:
    from lit_rlhf.data.oasst1_prompts import OASST1PromptDataModule

    data = OASST1PromptDataModule(
        path=str(data_root / "oasst1"),
        tokenizer_name_or_path=str(policy),
        num_train_prompts=n,
        num_eval_prompts=8,
        max_prompt_length=48,
        batch_size=n,
    )
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def advantages_and_returns(ro: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from lit_rlhf.rl.common import kl_estimate, masked_whiten
    from lit_rlhf.rl.ppo import gae, token_rewards

    mask = ro["mask"]
    kl = kl_estimate(ro["logprobs"], ro["ref_logprobs"]) * mask
    advantages, returns = gae(token_rewards(ro["scores"], kl, mask, 0.05)[0], ro["values"], mask, 1.0, 0.95)
    return masked_whiten(advantages, mask), returns


def plain_forward(module: PPOModule, ro: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's log-probs and the critic's values from one full-batch forward pass."""
    from lit_rlhf.rl.common import logprobs_from_logits

    width = ro["mask"].size(1)
    with torch.no_grad():
        module.policy.eval()
        module.critic.eval()
        logits = module._response_logits(module.policy, ro["sequences"], ro["attention_mask"], width)
        return logprobs_from_logits(logits, ro["responses"]), module._values(
            ro["sequences"], ro["attention_mask"], width
        )


def test_rollout_reuses_generation_logits(parity_models, data_root, monkeypatch):
    """The rollout's log-probs come from `generate`'s logits on length-grouped, trimmed micro-batches
    at temperature 0.7, with nothing taken from the model's own generation_config (a repetition
    penalty or top-k there would change what is sampled but not what the training forward computes)."""
    policy, reward = parity_models
    torch.manual_seed(0)
    module = PPOModule(
        model_name_or_path=str(policy),
        reward_model_path=str(reward),
        forward_batch_size=16,
        max_new_tokens=10,
        temperature=0.7,
        ppo_epochs=1,
    )
    module.policy.generation_config.update(repetition_penalty=1.5, top_k=3, no_repeat_ngram_size=2)
    used = []
    real = module.policy._get_logits_processor

    def spy(*args, **kwargs):
        processors = real(*args, **kwargs)
        used.extend(type(p).__name__ for p in processors)
        return processors

    monkeypatch.setattr(module.policy, "_get_logits_processor", spy)
    batch = prompt_batch(policy, data_root)
    assert len({len(ids) for ids in batch["input_ids"]}) > 4  # prompts of many lengths: trimming matters
    module.settings["forward_batch_size"], module.settings["generation_batch_size"] = 5, 6  # what the code reads
    ro = module.rollout(batch)
    assert set(used) == {"SampledTokenStats", "TemperatureLogitsWarper"}, used
    mask = ro["mask"]
    logprobs, values = plain_forward(module, ro)
    assert torch.allclose(ro["logprobs"] * mask, logprobs * mask, atol=1e-4)
    assert torch.allclose(ro["ref_logprobs"] * mask, logprobs * mask, atol=1e-4)  # full variant: ref = policy at start
    assert torch.allclose(ro["values"] * mask, values * mask, atol=1e-5)
    ended = ro["has_eos"].tolist()
    single = torch.cat([module.score([p], [t], [e]) for p, t, e in zip(ro["prompts"], ro["texts"], ended)])
    assert torch.allclose(ro["scores"], single, atol=1e-5)


def force_response_lengths(module: PPOModule, ro: dict, lengths: list[int]) -> dict:
    """End response i with EOS at position lengths[i] - 1 (pad after it), as if the policy had
    stopped there, and recompute the rollout's log-probs and values for the new sequences."""
    eos, pad, width = module.tokenizer.eos_token_id, module.tokenizer.pad_token_id, ro["mask"].size(1)
    length = torch.tensor(lengths).unsqueeze(1)
    columns = torch.arange(width).unsqueeze(0)
    responses = torch.where(columns == length - 1, eos, ro["responses"]).masked_fill(columns >= length, pad)
    mask = (columns < length).long()
    ro = {**ro, "responses": responses, "mask": mask.float(), "has_eos": torch.ones(len(lengths), dtype=torch.bool)}
    ro["sequences"] = torch.cat([ro["sequences"][:, : ro["query_width"]], responses], 1)
    ro["attention_mask"] = torch.cat([ro["attention_mask"][:, : ro["query_width"]], mask], 1)
    ro["logprobs"], ro["values"] = plain_forward(module, ro)
    ro["ref_logprobs"] = ro["logprobs"]
    return ro


def test_ppo_loss_does_not_depend_on_the_micro_batch_size(parity_models, data_root):
    """Responses of 1 to 10 tokens: every token of the mini-batch must weigh the same, whichever
    length-grouped micro-batch it falls in, so micro-batches of 3 give the gradient of one of 16."""
    policy, reward = parity_models
    torch.manual_seed(0)
    module = PPOModule(
        model_name_or_path=str(policy),
        reward_model_path=str(reward),
        forward_batch_size=16,
        max_new_tokens=10,
        temperature=1.0,
        ppo_epochs=1,
    )
    ro = module.rollout(prompt_batch(policy, data_root))
    assert ro["mask"].size(1) == 10
    ro = force_response_lengths(module, ro, [1, 10, 2, 9, 1, 10, 3, 8, 1, 10, 2, 7, 1, 10, 4, 6])
    advantages, returns = advantages_and_returns(ro)
    policy_opt, value_opt = updates_without_steps(module)
    grads = {}
    for micro in (16, 3):
        module.settings["forward_batch_size"] = micro  # what `_micro_batches` reads
        stats = module._optimise(ro, advantages, returns)
        grads[micro] = policy_opt.grads, value_opt.grads
        assert stats["policy/approxkl_avg"] < 1e-8  # the first pass sees the rollout policy
    for whole, micro in zip(grads[16], grads[3]):
        assert torch.allclose(whole, micro, rtol=1e-4, atol=1e-7)


def test_lora_updates_start_from_the_rollout_policy_and_values(parity_models, data_root, monkeypatch):
    """Iteration 2 of LoRA PPO (adapters no longer zero), before any optimizer step: the update's
    log-probs and values must be the rollout's. Dropout on in updates and off in the rollout broke it."""
    import lit_rlhf.modules.ppo as ppo_module
    from lit_rlhf.modules.ppo import LoraSettings

    policy, reward = parity_models
    torch.manual_seed(0)
    module = PPOModule(
        model_name_or_path=str(policy),
        reward_model_path=str(reward),
        lora=LoraSettings(),
        critic_lora=LoraSettings(),
        forward_batch_size=8,
        max_new_tokens=10,
        temperature=1.0,
        ppo_epochs=2,
    )
    with torch.no_grad():  # as after a first iteration: lora_B starts at 0, where dropout changes nothing
        for name, param in [*module.policy.named_parameters(), *module.critic.named_parameters()]:
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    ro = module.rollout(prompt_batch(policy, data_root))
    advantages, returns = advantages_and_returns(ro)
    compared = []
    real_value_loss = ppo_module.ppo_value_loss

    def value_loss(values, old_values, *args):
        compared.append((values.detach(), old_values))
        return real_value_loss(values, old_values, *args)

    monkeypatch.setattr(ppo_module, "ppo_value_loss", value_loss)
    updates_without_steps(module)  # no weight changes: every pass sees the rollout's weights
    stats = module._optimise(ro, advantages, returns)
    assert stats["policy/approxkl_avg"] < 1e-6
    assert stats["policy/clipfrac_avg"] == 0
    assert len(compared) >= 4
    for new, old in compared:
        assert torch.allclose(new, old, atol=1e-5)


def test_ppo_scores_as_the_reward_model_was_trained(parity_models, tmp_path, monkeypatch, capsys):
    """Max length and prompt budget come from the reward model's export record; an explicit
    reward_max_length wins with a warning."""
    import json
    import shutil

    import lit_rlhf.modules.online as online
    from lit_rlhf.artifacts import REWARD_MODEL_INFO

    policy, reward = parity_models
    exported = shutil.copytree(reward, tmp_path / "rm")
    (exported / REWARD_MODEL_INFO).write_text(json.dumps({"scoring": {"max_length": 96, "min_prompt_tokens": 24}}))
    calls = []
    monkeypatch.setattr(
        online, "score_responses", lambda *args, **kwargs: calls.append((args[4], kwargs)) or torch.zeros(1)
    )
    PPOModule(model_name_or_path=str(policy), reward_model_path=str(exported)).score(["q"], ["a"], [True])
    assert calls[-1][0] == 96 and calls[-1][1]["min_prompt_tokens"] == 24
    assert "warning" not in capsys.readouterr().out
    module = PPOModule(model_name_or_path=str(policy), reward_model_path=str(exported), reward_max_length=128)
    module.score(["q"], ["a"], [True])
    assert calls[-1][0] == 128 and calls[-1][1]["min_prompt_tokens"] == 24
    assert "warning: scoring with reward_max_length 128, but the reward model was trained with max length 96" in (
        capsys.readouterr().out
    )


def test_a_critic_whose_tokenizer_is_not_the_policys_is_refused(parity_models, tmp_path):
    """The critic reads the policy's token ids: a reward model (its default start) or value model with
    another tokenizer is refused; scoring alone re-tokenizes, so the same reward model with the
    policy as the critic's start is fine."""
    import shutil

    from lit_rlhf.errors import UserInputError
    from lit_rlhf.models.hf import load_tokenizer

    policy, reward = parity_models
    other = shutil.copytree(reward, tmp_path / "rm_other_tokenizer")
    tokenizer = load_tokenizer(str(other))
    tokenizer.add_tokens(["<|not_in_the_policy|>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(UserInputError, match=r"tokenizer differs from the policy's.*model.value_model_path"):
        PPOModule(model_name_or_path=str(policy), reward_model_path=str(other))
    with pytest.raises(UserInputError, match=r"\(model.value_model_path\), whose tokenizer differs"):
        PPOModule(model_name_or_path=str(policy), reward_model_path=str(reward), value_model_path=str(other))
    PPOModule(model_name_or_path=str(policy), reward_model_path=str(other), value_model_path=str(policy))
