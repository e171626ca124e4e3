"""DPOModule on a tiny Llama: agreement with TRL's DPOTrainer, learning through the CLI and the real
configs (full and LoRA), the exports reloading as evaluation loads them, config stacking."""

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from preference_fixtures import separable_pairs, write_jsonl
from transformers import AutoModelForCausalLM

from lit_rlhf.cli import main
from lit_rlhf.data.preference import PreferenceDataModule
from lit_rlhf.errors import UserInputError
from lit_rlhf.eval.rlhf import load_lora_policy, training_cost
from lit_rlhf.models.policy import LoraSettings
from lit_rlhf.modules.dpo import DPOModule

REPO = Path(__file__).resolve().parents[2]
CONFIG, LORA, CPU = REPO / "configs/rlhf/dpo.yaml", REPO / "configs/lora/dpo.yaml", REPO / "configs/cpu/dpo.yaml"
CSV_ONLY = '[{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": ".", "name": "csv"}}]'
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@pytest.fixture(scope="module")
def separable_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_pairs")
    pairs = separable_pairs(48)
    write_jsonl(root / "train.jsonl", pairs[:40])
    write_jsonl(root / "validation.jsonl", pairs[40:])
    return root


@pytest.fixture(scope="module")
def mixed_batch(tmp_path_factory, tiny_llama_dir):
    """Pairs whose prompts and responses differ in length, so the response masks differ per row,
    and one prompt is cut from the left."""
    root = tmp_path_factory.mktemp("dpo_mixed")
    pairs = [
        {"prompt": "Hi?", "chosen": "Hello! How can I help you today?", "rejected": "What."},
        {
            "prompt": "Explain " + "why the sky is blue " * 12,
            "chosen": "Rayleigh scattering.",
            "rejected": "It is not.",
        },
        {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "A fruit is a thing that grows on trees, mostly."},
    ]
    write_jsonl(root / "validation.jsonl", pairs)
    data = PreferenceDataModule(
        str(root),
        tokenizer_name_or_path=str(tiny_llama_dir),
        max_length=64,
        min_prompt_tokens=16,
        min_score_ratio=None,
        batch_size=3,
    )
    data.prepare(("validation",))
    batch = next(iter(data.val_dataloader()))
    assert len(set(batch["prompt_tokens"].tolist())) == 3 and (batch["attention_mask"] == 0).any()
    return batch


def trl_compute_loss(module: DPOModule, batch: dict, loss_type: str, beta: float) -> tuple[torch.Tensor, dict]:
    """TRL 1.16's `DPOTrainer._compute_loss` on the module's own networks: TRL computes the response
    log-probs itself (its fused LM head and `completion_mask`), the reference as it does (a separate
    model, or the PEFT model with its adapters disabled), then its loss and metrics."""
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    fields = ("log_probs", "entropy", "mean_logits", "is_top1")
    if module.ref_policy is None:
        add_fused_lm_head(module.policy.get_base_model(), outputs=fields)
    else:
        add_fused_lm_head(module.policy, outputs=fields)
        add_fused_lm_head(module.ref_policy)
    positions = torch.arange(batch["input_ids"].size(1))
    completion_mask = (positions >= batch["prompt_tokens"].unsqueeze(1)).long() * batch["attention_mask"]
    trainer = SimpleNamespace(
        model=module.policy,
        ref_model=module.ref_policy,
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=0.0,
        ld_alpha=None,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        use_weighting=False,
        aux_loss_enabled=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x, unwrap_model=lambda m: m
        ),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": completion_mask,
    }
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(trainer, module.policy, inputs, return_outputs=False)
    mode = "train" if module.policy.training else "eval"
    return loss, {key: values[0] for key, values in trainer._metrics[mode].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_loss_and_metrics_match_trl(tiny_llama_dir, mixed_batch, loss_type, lora):
    module = DPOModule(
        str(tiny_llama_dir), lora=LoraSettings(r=4, alpha=8) if lora else None, loss_type=loss_type, beta=0.2
    )
    with torch.no_grad():  # move the policy away from its reference
        for name, p in module.policy.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.5 if "lora_B" in name else 0.05))
        loss, ours = module._pair_step(mixed_batch)
    trl_loss, theirs = trl_compute_loss(module, mixed_batch, loss_type, beta=0.2)
    assert abs(ours["rewards/margins"]) > 1e-2, "policy and reference coincide: the comparison would be vacuous"
    # float32 networks, log-probs computed two ways (full logits vs TRL's chunked fused head): the
    # sums of ~40 token log-probs agree to a few ulps (measured: loss 1.4e-6 on 5.9, metrics 1.3e-6)
    assert abs(loss.item() - trl_loss.item()) <= 1e-6 * max(1.0, trl_loss.item()), (loss.item(), trl_loss.item())
    for key in METRICS[1:]:
        assert abs(ours[key].item() - theirs[key]) <= 1e-5 * max(1.0, abs(theirs[key])), (key, ours[key], theirs[key])


def test_bad_settings_name_the_fix():
    with pytest.raises(UserInputError, match="loss_type must be one of"):
        DPOModule("unused", loss_type="hinge")
    with pytest.raises(UserInputError, match="label_smoothing applies to loss_type 'sigmoid' only"):
        DPOModule("unused", loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(UserInputError, match="beta must be positive"):
        DPOModule("unused", beta=0.0)


def run_dpo(root: Path, model: Path, data: Path, *configs: Path, lr: str) -> pd.DataFrame:
    every_epoch = (
        '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
        '{"dirpath": "checkpoints", "save_last": true, "save_top_k": 0, '
        '"every_n_train_steps": 0, "every_n_epochs": 1}}]'
    )
    args = ["fit"]
    for config in (CONFIG, *configs):
        args += ["--config", str(config)]
    main(
        [
            *args,
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger",
            CSV_ONLY,
            "--trainer.callbacks",
            every_epoch,
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.max_epochs",
            "2",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.val_check_interval",
            "1.0",
            "--model.model_name_or_path",
            str(model),
            "--model.optimizer.init_args.lr",
            lr,
            "--data.path",
            str(data),
            "--data.max_length",
            "64",
            "--data.min_prompt_tokens",
            "16",
            "--data.batch_size",
            "4",
        ]
    )
    return pd.read_csv(sorted(root.glob("csv/version_*/metrics.csv"))[-1])


def assert_learns(df: pd.DataFrame) -> None:
    train = df.dropna(subset=["train/loss"])
    assert {f"train/{key}" for key in METRICS} | {f"val/{key}" for key in METRICS} <= set(df.columns)
    # step 0: the policy is its reference, so every implicit reward is 0 and the loss is log 2
    assert train["train/loss"].iloc[0] == pytest.approx(0.6931472, abs=1e-5)
    assert train["train/rewards/margins"].iloc[0] == 0.0 and train["train/rewards/accuracies"].iloc[0] == 0.0
    last = train.tail(5)
    assert last["train/loss"].mean() < 0.6, train["train/loss"].tolist()
    assert last["train/rewards/accuracies"].mean() > 0.75, train["train/rewards/accuracies"].tolist()
    assert df["val/rewards/accuracies"].dropna().iloc[-1] >= 0.9
    assert df["val/rewards/margins"].dropna().iloc[-1] > 0


def test_full_dpo_learns_separable_pairs_and_exports_a_policy(tmp_path, tiny_llama_dir, separable_dir, one_thread):
    df = run_dpo(tmp_path, tiny_llama_dir, separable_dir, lr="1e-3")
    assert_learns(df)
    # its cost, as the evaluation compares it with the online methods'
    cost = training_cost(str(tmp_path))
    assert cost["seconds_per_step"] > 0 and cost["peak_rss_gb"] > 0.1 and "seconds_per_iteration" not in cost
    assert df["time/step_s"].notna().sum() == df["train/loss"].notna().sum()
    module = DPOModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    for (name, a), b in zip(exported.state_dict().items(), module.policy.state_dict().values()):
        assert torch.equal(a, b), name
    start = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert not torch.equal(
        start.state_dict()["model.layers.0.mlp.up_proj.weight"],
        exported.state_dict()["model.layers.0.mlp.up_proj.weight"],
    )
    for name, p in module.ref_policy.state_dict().items():  # the reference is the starting model
        assert torch.equal(p, start.state_dict()[name]), name
    assert not list(tmp_path.glob(".policy-*"))  # no staging folder left behind


def test_lora_dpo_learns_separable_pairs_and_exports_an_adapter(tmp_path, tiny_llama_dir, separable_dir, one_thread):
    df = run_dpo(tmp_path, tiny_llama_dir, separable_dir, LORA, lr="2e-2")
    assert_learns(df)
    module = DPOModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert module.hparams.lora == LoraSettings(r=8, alpha=32, target_modules=("q_proj", "v_proj"))
    assert all("lora_" in n for n, p in module.policy.named_parameters() if p.requires_grad)
    assert module.ref_policy is None
    policy = load_lora_policy(str(tiny_llama_dir), tmp_path / "policy_adapter")  # as lit_rlhf.evaluate loads it
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(policy(ids).logits, module.policy(ids).logits, atol=1e-5, rtol=1e-4)
        with module.policy.disable_adapter():
            base = module.policy(ids).logits
    assert not torch.allclose(policy(ids).logits, base, atol=1e-4)  # the adapter changed the policy


def test_configs_stack_through_the_cli(capsys):
    def printed(*configs: Path) -> str:
        args = ["fit"]
        for config in configs:
            args += ["--config", str(config)]
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--print_config"])
        assert exit_info.value.code in (0, None)
        return capsys.readouterr().out

    full = printed(CONFIG)
    assert "lit_rlhf.modules.dpo.DPOModule" in full and "lora: null" in full and "lr: 5.0e-07" in full
    assert "beta: 0.1" in full and "PreferenceDataModule" in full and "precision: 32-true" in full
    lora = printed(CONFIG, LORA)
    assert "default_root_dir: runs/dpo_lora" in lora and "r: 8" in lora and "lr: 5.0e-05" in lora
    assert "fused: true" in lora  # the override changes lr only
    cpu = printed(CONFIG, CPU)
    assert "model_name_or_path: embedded:smollm2" in cpu and "max_length: 320" in cpu and "batch_size: 4" in cpu
    assert "max_epochs: 1" in cpu and "lora: null" in cpu and "lr: 5.0e-06" in cpu
    cpu_lora = printed(CONFIG, CPU, LORA)  # LoRA stacked last keeps its own learning rate
    assert "max_length: 320" in cpu_lora and "r: 8" in cpu_lora and "lr: 5.0e-05" in cpu_lora
