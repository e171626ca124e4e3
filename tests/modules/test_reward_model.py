"""RewardModel on a tiny Llama: learning, one forward pass, export round trip, LoRA, CLI, metrics."""

import math
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_llama_dir
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from preference_fixtures import make_shp_folder, separable_pairs, write_jsonl

from lit_rlhf.cli import main
from lit_rlhf.data.preference import SHPDataModule
from lit_rlhf.errors import UserInputError
from lit_rlhf.models.hf import load_sequence_scorer
from lit_rlhf.modules.reward_model import RewardModel, transformer_blocks

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "reward_model.yaml"


@pytest.fixture(scope="module")
def separable_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("separable")
    pairs = separable_pairs(56)
    write_jsonl(root / "train.jsonl", pairs[:40])
    write_jsonl(root / "validation.jsonl", pairs[40:48])
    write_jsonl(root / "test.jsonl", pairs[48:])
    return root


def adamw(lr: float):
    return lambda params: torch.optim.AdamW(params, lr=lr)


def trainer(root, max_epochs: int, **kwargs) -> Trainer:
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", monitor="val/loss", mode="min")
    return Trainer(
        default_root_dir=root,
        max_epochs=max_epochs,
        logger=False,
        callbacks=[checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_learns_a_separable_preference_and_exports_a_reloadable_scorer(tiny_llama_dir, separable_dir, tmp_path):
    model = RewardModel(str(tiny_llama_dir), optimizer=adamw(3e-3))
    data = SHPDataModule(str(separable_dir), max_length=64, min_prompt_tokens=16, batch_size=8)
    data.tokenizer = model.tokenizer
    data.prepare(("validation",))

    def val_loss() -> float:
        with torch.no_grad():
            return sum(model._pair_step(b)[0].item() for b in data.val_dataloader()) / len(data.val_dataloader())

    before = val_loss()
    run = trainer(tmp_path, max_epochs=4, log_every_n_steps=1)
    run.fit(model, data)
    assert val_loss() < before - 0.2
    assert run.callback_metrics["val/loss"] < before - 0.2
    assert run.callback_metrics["val/accuracy"] >= 0.9 > 0.5
    assert (tmp_path / "preprocessed_preview.md").exists()

    exported = tmp_path / "reward_model"
    assert (exported / "config.json").exists() and (exported / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".reward_model-*"))  # no staging folder left behind
    scorer = load_sequence_scorer(str(exported), model.tokenizer.pad_token_id).eval()
    batch = next(iter(data.val_dataloader()))
    model.eval()
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["attention_mask"])
        reloaded = scorer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(reloaded, expected)
    # An exported folder is also a valid model_name_or_path: its trained head is loaded.
    again = RewardModel(str(exported)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(batch["input_ids"], batch["attention_mask"]), expected)


def test_chosen_and_rejected_share_one_forward_pass(tiny_llama_dir):
    model = RewardModel(str(tiny_llama_dir))
    calls = []
    model.model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    batch = {
        "input_ids": torch.randint(3, 100, (6, 10)),
        "attention_mask": torch.ones(6, 10, dtype=torch.long),
        "margin": torch.zeros(3),
    }
    model.training_step(batch, 0)
    assert calls == [torch.Size([6, 10])]


def test_loss_margin_and_centering(tiny_llama_dir, monkeypatch):
    model = RewardModel(str(tiny_llama_dir), margin=0.5, center_rewards_coefficient=0.1)
    rewards = torch.tensor([2.0, 1.0, 0.0, 1.5])  # chosen 2, 1 ; rejected 0, 1.5
    monkeypatch.setattr(model, "forward", lambda input_ids, attention_mask: rewards)
    batch = {"input_ids": None, "attention_mask": None, "margin": torch.tensor([0.0, 1.0])}
    loss, diff = model._pair_step(batch)
    expected = -(torch.nn.functional.logsigmoid(torch.tensor([2.0 - 0.5, -0.5 - 1.5]))).mean() + 0.1 * ((torch.tensor([2.0, 2.5])) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(diff, torch.tensor([2.0, -0.5]))


def test_trainable_top_blocks_freezes_the_rest(tmp_path, smol_tokenizer_dir):
    folder = make_tiny_llama_dir(tmp_path / "llama3", smol_tokenizer_dir, num_hidden_layers=3)
    model = RewardModel(str(folder), trainable_top_blocks=1)
    trainable = {name for name, p in model.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.2.", "model.norm.", "score.")) for n in trainable)
    assert any(n.startswith("score.") for n in trainable) and "model.norm.weight" in trainable
    assert len(transformer_blocks(model.model)) == 3
    with pytest.raises(UserInputError, match="between 0 and 3"):
        RewardModel(str(folder), trainable_top_blocks=5)
    with pytest.raises(UserInputError, match="either lora_r or trainable_top_blocks"):
        RewardModel(str(folder), trainable_top_blocks=1, lora_r=4)


def test_lora_trains_adapters_and_head_and_exports_merged_weights(tiny_llama_dir, separable_dir, tmp_path):
    model = RewardModel(str(tiny_llama_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0, optimizer=adamw(5e-3))
    trainable = [n for n, p in model.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".score." in n for n in trainable)
    data = SHPDataModule(str(separable_dir), max_length=64, min_prompt_tokens=16, batch_size=8)
    trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(model, data)
    exported = tmp_path / "reward_model"
    assert not (exported / "adapter_config.json").exists()
    scorer = load_sequence_scorer(str(exported), model.tokenizer.pad_token_id).eval()
    batch = next(iter(data.val_dataloader()))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            scorer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1),
            model(batch["input_ids"], batch["attention_mask"]),
            rtol=1e-4,
            atol=1e-4,
        )


def test_test_accuracy_per_score_ratio_bucket_and_domain(tiny_llama_dir, tmp_path):
    data = SHPDataModule(str(make_shp_folder(tmp_path / "shp")), max_length=64, min_prompt_tokens=16, min_score_ratio=None)
    model = RewardModel(str(tiny_llama_dir))
    metrics = trainer(tmp_path, max_epochs=1).test(model, data, verbose=False)[0]
    assert 0.0 <= metrics["test/accuracy"] <= 1.0
    assert {"test/accuracy_ratio_<2", "test/accuracy_ratio_2-3", "test/accuracy_ratio_3-5", "test/accuracy_ratio_>=10"} <= set(metrics)
    assert {"test/accuracy_domain_askculinary", "test/accuracy_domain_askphysics"} <= set(metrics)
    assert "test/accuracy_ratio_5-10" not in metrics  # empty buckets are not logged
    per_domain = (metrics["test/accuracy_domain_askculinary"] + metrics["test/accuracy_domain_askphysics"]) / 2
    assert math.isclose(per_domain, metrics["test/accuracy"], abs_tol=1e-6)  # equal-sized domains


def test_cli_fit_then_test_on_the_exported_folder(tiny_llama_dir, separable_dir, tmp_path, capsys):
    common = ["--config", str(CONFIG), "--data.path", str(separable_dir),
              "--data.max_length", "64", "--data.min_prompt_tokens", "16", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    main(["fit", *common, "--model.model_name_or_path", str(tiny_llama_dir), "--model.trainable_top_blocks", "1",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
          "--trainer.default_root_dir", str(tmp_path / "fit")])  # fmt: skip
    exported = tmp_path / "fit" / "reward_model"
    assert (exported / "model.safetensors").exists() and list((tmp_path / "fit" / "checkpoints").glob("best-*.ckpt"))
    assert (tmp_path / "fit" / "preprocessed_preview.md").exists()
    main(["test", *common, "--model.model_name_or_path", str(exported), "--trainer.default_root_dir", str(tmp_path / "test")])
    assert "test/accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_embedded_smollm2_trains_a_few_steps_on_real_oasst1_pairs(data_root, tmp_path):
    from lit_rlhf.data.oasst1 import oasst1_preference_pairs, read_oasst1_rows

    pairs = oasst1_preference_pairs(read_oasst1_rows(str(data_root / "oasst1" / "oasst1_validation_en.jsonl")))
    write_jsonl(tmp_path / "pairs" / "train.jsonl", pairs[:24])
    write_jsonl(tmp_path / "pairs" / "validation.jsonl", pairs[24:32])
    model = RewardModel("embedded:smollm2", trainable_top_blocks=2, optimizer=adamw(1e-4))
    data = SHPDataModule(str(tmp_path / "pairs"), max_length=128, batch_size=4)
    run = trainer(tmp_path, max_epochs=1, limit_train_batches=3, log_every_n_steps=1)
    run.fit(model, data)
    assert math.isfinite(run.callback_metrics["train/loss"]) and "val/accuracy" in run.callback_metrics
    scorer = load_sequence_scorer(str(tmp_path / "reward_model"), model.tokenizer.pad_token_id)
    assert scorer.config.num_labels == 1 and scorer.config.num_hidden_layers == 30
