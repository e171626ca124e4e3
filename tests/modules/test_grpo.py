"""GRPO and RLOO on a tiny policy and the hand-built parity reward model, through the CLI and the real configs."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lit_rlhf.cli import main
from lit_rlhf.modules.grpo import GRPOModule, RLOOModule
from ppo_fixtures import make_parity_policy, make_parity_reward_model

CSV_ONLY = '[{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": ".", "name": "csv"}}]'


@pytest.fixture(scope="module")
def parity_models(tmp_path_factory, smol_tokenizer_dir):
    root = tmp_path_factory.mktemp("parity")
    return make_parity_policy(root / "policy", smol_tokenizer_dir), make_parity_reward_model(root / "rm", smol_tokenizer_dir)


def run(configs: list[str], root: Path, policy: Path, reward: Path, data_root: Path, *extra: str) -> pd.DataFrame:
    main([
        "fit", *[arg for config in configs for arg in ("--config", f"configs/{config}.yaml")],
        "--trainer.default_root_dir", str(root),
        "--trainer.logger", CSV_ONLY,
        "--trainer.enable_progress_bar", "false",
        "--model.model_name_or_path", str(policy),
        "--model.reward_model_path", str(reward),
        "--model.forward_batch_size", "16",
        "--model.max_new_tokens", "10",
        "--model.temperature", "1.0",
        "--model.num_generations", "4",
        "--model.num_iterations", "2",
        "--data.path", str(data_root / "oasst1"),
        "--data.num_train_prompts", "16",
        "--data.num_eval_prompts", "8",
        "--data.max_prompt_length", "48",
        "--data.batch_size", "8",
        *extra,
    ])  # fmt: skip
    return pd.read_csv(sorted(root.glob("csv/version_*/metrics.csv"))[-1])


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_critic_free_methods_raise_the_reward(method, tmp_path, parity_models, data_root):
    policy, reward = parity_models
    every_step = ('[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
                  '{"dirpath": "checkpoints", "save_last": true, "save_top_k": 0, "every_n_train_steps": 1}}]')
    df = run([f"rlhf/{method}"], tmp_path, policy, reward, data_root, "--trainer.max_epochs", "4",
             "--model.optimizer.init_args.lr", "1e-2", "--trainer.callbacks", every_step)  # fmt: skip
    scores = df["objective/scores"].tolist()
    assert len(scores) == 8
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2 + 0.2, scores
    assert {"objective/kl_per_token", "objective/entropy", "reward_std", "frac_reward_zero_std",
            "clip_ratio/region_mean", "loss", "val/truncated_share", "kl_coef"} <= set(df.columns)  # fmt: skip
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    module_cls = GRPOModule if method == "grpo" else RLOOModule
    module = module_cls.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    for (name, a), b in zip(exported.state_dict().items(), module.policy.state_dict().values()):
        assert torch.equal(a, b), name


def test_grpo_lora_override_trains_only_adapters(tmp_path, parity_models, data_root):
    policy, reward = parity_models
    base_before = AutoModelForCausalLM.from_pretrained(policy).state_dict()
    run(["rlhf/grpo", "lora/grpo_rloo"], tmp_path, policy, reward, data_root, "--trainer.max_epochs", "1")
    module = GRPOModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert module.trainable_params["policy"] == sum(p.numel() for n, p in module.policy.named_parameters() if "lora_" in n)
    assert any(p.abs().sum() > 0 for n, p in module.policy.named_parameters() if "lora_B" in n), "adapters did not train"
    base_after = module.policy.get_base_model().state_dict()
    for name, weight in base_before.items():
        key = name.replace("q_proj.weight", "q_proj.base_layer.weight").replace("v_proj.weight", "v_proj.base_layer.weight")
        assert torch.equal(weight, base_after[key]), f"base weight {name} changed"
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(policy), tmp_path / "policy_adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    module.policy.eval()
    assert torch.allclose(adapter(ids).logits, module.policy(ids).logits, atol=1e-5)


def test_one_response_per_prompt_is_refused(parity_models):
    from lit_rlhf.errors import UserInputError

    policy, reward = parity_models
    with pytest.raises(UserInputError, match="num_generations must be at least 2"):
        GRPOModule(model_name_or_path=str(policy), reward_model_path=str(reward), num_generations=1)
