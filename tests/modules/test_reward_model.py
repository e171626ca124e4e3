"""RewardModel on a tiny Llama: learning, one forward pass, export round trip, LoRA, CLI, metrics."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_llama_dir
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from preference_fixtures import make_shp_folder, separable_pairs, write_jsonl

from lit_rlhf.artifacts import reward_model_info, reward_model_scoring, reward_model_seen
from lit_rlhf.cli import main
from lit_rlhf.data.preference import PreferenceDataModule, collate_pairs
from lit_rlhf.errors import UserInputError
from lit_rlhf.models.frozen_trunk import FrozenTrunkCache
from lit_rlhf.models.hf import load_sequence_scorer
from lit_rlhf.modules.reward_model import (
    RewardModel,
    grouped_bootstrap_interval,
    mean_response_logprob,
    transformer_blocks,
)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "rlhf" / "reward_model.yaml"
CPU_CONFIG = CONFIG.parents[1] / "cpu" / "reward_model.yaml"


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
    data = PreferenceDataModule(str(separable_dir), max_length=64, min_prompt_tokens=16, batch_size=8)
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
    model.model.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
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
    monkeypatch.setattr(model, "forward", lambda input_ids, attention_mask, prompt_tokens=None: rewards)
    batch = {"input_ids": None, "attention_mask": None, "margin": torch.tensor([0.0, 1.0])}
    loss, diff = model._pair_step(batch)
    expected = (
        -(torch.nn.functional.logsigmoid(torch.tensor([2.0 - 0.5, -0.5 - 1.5]))).mean()
        + 0.1 * ((torch.tensor([2.0, 2.5])) ** 2).mean()
    )
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(diff, torch.tensor([2.0, -0.5]))
    # per-pair weights (data.balance_length): a weighted mean of the pair losses
    weighted, _ = model._pair_step({**batch, "weight": torch.tensor([0.5, 1.5])})
    pair_losses = -torch.nn.functional.logsigmoid(torch.tensor([2.0 - 0.5, -0.5 - 1.5]))
    expected = (0.5 * pair_losses[0] + 1.5 * pair_losses[1]) / 2 + 0.1 * ((torch.tensor([2.0, 2.5])) ** 2).mean()
    torch.testing.assert_close(weighted, expected)


def test_odin_loss_is_the_pairwise_loss_of_the_sum_plus_the_length_and_orthogonality_terms(tiny_llama_dir, monkeypatch):
    model = RewardModel(str(tiny_llama_dir), head="odin", length_weight=0.5, orthogonal_weight=2.0)
    assert model.model.score.weight.shape[0] == 2 and model.model.config.id2label == {0: "quality", 1: "length"}
    # rows: chosen 1, chosen 2, rejected 1, rejected 2; columns: quality, length
    rewards = torch.tensor([[1.0, 0.5], [0.0, 2.0], [0.5, -1.0], [1.0, 0.0]])
    monkeypatch.setattr(model, "forward", lambda input_ids, attention_mask, prompt_tokens=None: rewards)
    with torch.no_grad():
        model.model.score.weight.copy_(torch.zeros_like(model.model.score.weight))
        model.model.score.weight[0, 0] = model.model.score.weight[1, 0] = model.model.score.weight[1, 1] = 1.0
    batch = {
        "input_ids": None,
        "attention_mask": None,
        "margin": torch.zeros(2),
        "response_chars": torch.tensor([10, 40, 20, 30]),
    }
    out = model._pair_outputs(batch)
    torch.testing.assert_close(out["diff"], torch.tensor([1.5 - (-0.5), 2.0 - 1.0]))  # the sum's margins
    # lengths centred [-15, 15, -5, 5] (sum of squares 500); quality centred [.375, -.625, -.125, .375]
    # (sum of squares .6875): rho_Q = (-5.625 - 9.375 + .625 + 1.875) / sqrt(500 * .6875) = -12.5 / 18.54
    rho_quality = -12.5 / math.sqrt(500 * 0.6875)
    # length reward centred [.125, 1.625, -1.375, -.375] (4.6875): rho_L = (-1.875 + 24.375 + 6.875 - 1.875) / 48.41
    rho_length = 27.5 / math.sqrt(500 * 4.6875)
    assert out["length_term"].item() == pytest.approx(abs(rho_quality) - rho_length, abs=1e-5)
    assert out["orthogonality"].item() == pytest.approx(1 / math.sqrt(2), abs=1e-6)  # heads (1, 0) and (1, 1)
    pairwise = -torch.nn.functional.logsigmoid(torch.tensor([2.0, 1.0])).mean().item()
    expected = pairwise + 0.5 * (abs(rho_quality) - rho_length) + 2.0 / math.sqrt(2)
    assert out["loss"].item() == pytest.approx(expected, abs=1e-5)
    assert model._pair_step(batch)[0].item() == pytest.approx(expected, abs=1e-5)


def test_odin_head_trains_exports_both_outputs_and_scorers_read_the_quality_one(
    tiny_llama_dir, separable_dir, tmp_path
):
    from lit_rlhf.models.scoring import score_responses

    model = RewardModel(str(tiny_llama_dir), head="odin", optimizer=adamw(3e-3))
    data = PreferenceDataModule(str(separable_dir), max_length=64, min_prompt_tokens=16, batch_size=8)
    run = trainer(tmp_path, max_epochs=1, limit_train_batches=2, log_every_n_steps=1)
    run.fit(model, data)
    assert {
        "train/odin_length_term",
        "val/accuracy_quality",
        "val/length_corr_quality",
        "val/length_corr_length",
    } <= set(run.callback_metrics)
    exported = tmp_path / "reward_model"
    info = reward_model_info(exported)
    assert info["head"] == "odin" and info["reward_output"] == "quality"
    batch = next(iter(data.val_dataloader()))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    with torch.no_grad():
        both = model(batch["input_ids"], batch["attention_mask"])
        scorer = load_sequence_scorer(str(exported), model.tokenizer.pad_token_id, trained_head=True).eval()
        assert scorer.config.num_labels == 1
        # PPO, GRPO, RLOO and the evaluation score with the quality output
        torch.testing.assert_close(scorer(**inputs).logits[:, 0], both[:, 0])
        row = data.datasets["validation"][0]
        rewards = score_responses(
            scorer, model.tokenizer, [row["prompt"]], [row["chosen"]], max_length=64, min_prompt_tokens=16, ended=[True]
        )
        torch.testing.assert_close(rewards, both[:1, 0])
        kept = load_sequence_scorer(str(exported), model.tokenizer.pad_token_id, odin=True).eval()
        torch.testing.assert_close(kept(**inputs).logits, both)
        again = RewardModel(str(exported)).eval()  # head None: an ODIN export stays ODIN
        assert again.odin
        torch.testing.assert_close(again(batch["input_ids"], batch["attention_mask"]), both)
        single = RewardModel(str(exported), head="single").eval()
        torch.testing.assert_close(single(batch["input_ids"], batch["attention_mask"]), both[:, 0])
        # an export whose record names the sum as its reward is scored with quality + length
        record = exported / "lit_rlhf_export.json"
        record.write_text(record.read_text().replace('"reward_output": "quality"', '"reward_output": "sum"'))
        summed = load_sequence_scorer(str(exported), model.tokenizer.pad_token_id).eval()
        torch.testing.assert_close(summed(**inputs).logits[:, 0], both.sum(-1))
    # a single-head export grown into ODIN keeps its reward as the quality output
    plain = RewardModel(str(tiny_llama_dir))
    plain.export(tmp_path / "single", {"head": "single"})
    grown = RewardModel(str(tmp_path / "single"), head="odin").model
    assert grown.config.id2label == {0: "quality", 1: "length"} and grown.score.weight.shape[0] == 2
    torch.testing.assert_close(grown.score.weight[0], plain.model.score.weight[0])


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
    data = PreferenceDataModule(str(separable_dir), max_length=64, min_prompt_tokens=16, batch_size=8)
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
    data = PreferenceDataModule(
        str(make_shp_folder(tmp_path / "shp")), max_length=64, min_prompt_tokens=16, min_score_ratio=None
    )
    model = RewardModel(str(tiny_llama_dir))
    metrics = trainer(tmp_path, max_epochs=1).test(model, data, verbose=False)[0]
    assert 0.0 <= metrics["test/accuracy"] <= 1.0
    assert {
        "test/accuracy_ratio_<2",
        "test/accuracy_ratio_2-3",
        "test/accuracy_ratio_3-5",
        "test/accuracy_ratio_>=10",
    } <= set(metrics)
    assert {"test/accuracy_domain_askculinary", "test/accuracy_domain_askphysics"} <= set(metrics)
    assert "test/accuracy_ratio_5-10" not in metrics  # empty buckets are not logged
    per_domain = (metrics["test/accuracy_domain_askculinary"] + metrics["test/accuracy_domain_askphysics"]) / 2
    assert math.isclose(per_domain, metrics["test/accuracy"], abs_tol=1e-6)  # equal-sized domains


def test_cli_fit_then_test_on_the_exported_folder(tiny_llama_dir, separable_dir, tmp_path, capsys):
    common = [
        "--config",
        str(CONFIG),
        "--data.path",
        str(separable_dir),
        "--data.max_length",
        "64",
        "--data.min_prompt_tokens",
        "16",
        "--trainer.enable_progress_bar",
        "false",
    ]
    main(
        [
            "fit",
            *common,
            "--model.model_name_or_path",
            str(tiny_llama_dir),
            "--model.trainable_top_blocks",
            "1",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path / "fit"),
        ]
    )
    exported = tmp_path / "fit" / "reward_model"
    assert (exported / "model.safetensors").exists() and list((tmp_path / "fit" / "checkpoints").glob("best-*.ckpt"))
    assert (tmp_path / "fit" / "preprocessed_preview.md").exists()
    # the export records how to score (the data module's settings) and what it trained and validated on
    assert reward_model_scoring(exported) == {"max_length": 64, "min_prompt_tokens": 16}
    seen = reward_model_seen(exported)
    assert seen["post_ids"] == {f"q{i}" for i in range(48)}  # train (0-39) + validation (40-47), not test
    assert seen["message_tree_ids"] == {f"t{i}" for i in range(24)}
    assert reward_model_info(exported)["base_model"] == str(tiny_llama_dir)
    main(
        [
            "test",
            *common,
            "--model.model_name_or_path",
            str(exported),
            "--trainer.default_root_dir",
            str(tmp_path / "test"),
        ]
    )
    out = capsys.readouterr().out
    assert "test/accuracy" in out and "test/baseline_longer_reply" in out and f"under {tiny_llama_dir}" in out
    assert "| reward model | " in (tmp_path / "test" / "test_accuracy.md").read_text()


def test_cpu_setting_is_one_override_stacked_on_the_stage_config(capsys):
    import yaml

    with pytest.raises(SystemExit):
        main(
            ["fit", "--config", str(CONFIG), "--config", str(CPU_CONFIG), "--data.path", "runs/pairs", "--print_config"]
        )
    parsed = yaml.safe_load(capsys.readouterr().out)
    override = yaml.safe_load(CPU_CONFIG.read_text())

    def leaves(tree: dict, prefix=()):
        for key, value in tree.items():
            yield from leaves(value, prefix + (key,)) if isinstance(value, dict) else [(prefix + (key,), value)]

    for path, value in leaves(override):  # every value of the override wins ...
        node = parsed
        for key in path:
            node = node[key]
        assert node == value, path
    assert parsed["model"]["class_path"] == "lit_rlhf.modules.reward_model.RewardModel"  # ... on top of the stage
    assert parsed["model"]["init_args"]["cache_frozen_trunk"] is True
    assert parsed["data"]["init_args"]["path"] == "runs/pairs" and parsed["data"]["init_args"]["max_length"] >= 1024
    assert parsed["trainer"]["precision"] == "32-true" and parsed["model"]["init_args"]["trainable_top_blocks"] == 2
    assert any("ModelCheckpoint" in c["class_path"] for c in parsed["trainer"]["callbacks"])


@pytest.mark.slow
def test_embedded_smollm2_trains_a_few_steps_on_real_oasst1_pairs(data_root, tmp_path):
    from lit_rlhf.data.oasst1 import oasst1_preference_pairs, read_oasst1_rows

    pairs = oasst1_preference_pairs(read_oasst1_rows(str(data_root / "oasst1" / "oasst1_validation_en.jsonl")))
    write_jsonl(tmp_path / "pairs" / "train.jsonl", pairs[:24])
    write_jsonl(tmp_path / "pairs" / "validation.jsonl", pairs[24:32])
    model = RewardModel("embedded:smollm2", trainable_top_blocks=2, optimizer=adamw(1e-4))
    data = PreferenceDataModule(str(tmp_path / "pairs"), max_length=128, batch_size=4)
    run = trainer(tmp_path, max_epochs=1, limit_train_batches=3, log_every_n_steps=1)
    run.fit(model, data)
    assert math.isfinite(run.callback_metrics["train/loss"]) and "val/accuracy" in run.callback_metrics
    scorer = load_sequence_scorer(str(tmp_path / "reward_model"), model.tokenizer.pad_token_id)
    assert scorer.config.num_labels == 1 and scorer.config.num_hidden_layers == 30


# -- frozen-trunk cache ---------------------------------------------------------------------------


def _twin_models(folder, **kwargs) -> tuple[RewardModel, RewardModel]:
    """The same top-1-block reward model twice (same head): one uncached, one with the trunk cache."""
    plain = RewardModel(str(folder), trainable_top_blocks=1, cache_frozen_trunk=False, **kwargs)
    cached = RewardModel(str(folder), trainable_top_blocks=1, **kwargs)
    cached.load_state_dict(plain.state_dict())
    cached.trunk_cache = FrozenTrunkCache(cached.model.base_model, cached.frozen_blocks)
    return plain, cached


def _pair_batch(data: PreferenceDataModule, duplicate: bool = True) -> dict:
    """A right-padded validation batch of pairs of different lengths; with `duplicate`, its first
    pair twice (a sequence in two pairs of a batch) and a third reply to its prompt (a post with
    three replies: one prompt, three continuations)."""
    items = [data.datasets["validation"][i] for i in range(4)]
    if duplicate:
        first, other = items[0], items[1]
        third_reply = other["rejected_ids"][other["rejected_prompt_tokens"] :]
        items += [first, {**first, "rejected_ids": first["chosen_ids"][: first["chosen_prompt_tokens"]] + third_reply}]
    return collate_pairs(items, data.tokenizer.pad_token_id)


@pytest.mark.parametrize("prebuilt", [False, True], ids=["first-epoch", "pre-pass"])
def test_cached_trunk_gives_the_same_losses_and_gradients_and_runs_the_frozen_blocks_once(
    tmp_path, smol_tokenizer_dir, separable_dir, prebuilt
):
    folder = make_tiny_llama_dir(tmp_path / "llama3", smol_tokenizer_dir, num_hidden_layers=3)
    plain, cached = _twin_models(folder, center_rewards_coefficient=0.1)
    assert cached.frozen_blocks == 2 and plain.frozen_blocks == 0
    data = PreferenceDataModule(
        str(separable_dir), tokenizer_name_or_path=str(folder), max_length=64, min_prompt_tokens=16
    )
    data.prepare(("validation",))
    batch = _pair_batch(data)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # right padding is exercised
    frozen_calls = []
    for block in transformer_blocks(cached.model)[:2]:
        block.register_forward_hook(lambda *_: frozen_calls.append(1))
    if prebuilt:  # each pair's prompt runs once, its two replies continue from the prompt's keys/values
        cached.trunk_cache.build([[batch]])
        assert len(frozen_calls) == 2 * 2 * 4  # 2 frozen blocks x (prompt, its replies) x 4 distinct prompts
    calls_before_training = len(frozen_calls)
    for epoch in range(2):
        grads = []
        for model in (plain, cached):
            model.zero_grad()
            loss, diff = model._pair_step(batch)
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            if model is plain:
                expected_loss, expected_diff = loss.detach(), diff.detach()
        torch.testing.assert_close(loss.detach(), expected_loss, rtol=0, atol=1e-5)
        torch.testing.assert_close(diff.detach(), expected_diff, rtol=0, atol=1e-5)
        assert grads[0].keys() == grads[1].keys() and any("layers.2." in n for n in grads[0])
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-5, msg=name)
        # the frozen blocks ran before training or in the first epoch only (one batch of the missing rows)
        assert len(frozen_calls) == (calls_before_training if prebuilt else 2)
    # 6 pairs = 12 rows: 4 pairs' 8 sequences + the third reply; the repeated ones computed once
    assert cached.trunk_cache.computed == 9 and len(cached.trunk_cache.entries) == 9


def test_cached_trunk_through_fit_and_test_is_invisible_but_for_speed(tmp_path, smol_tokenizer_dir, separable_dir):
    folder = make_tiny_llama_dir(tmp_path / "llama3", smol_tokenizer_dir, num_hidden_layers=3)
    results = {}
    for cache in (False, True):
        torch.manual_seed(0)
        model = RewardModel(str(folder), trainable_top_blocks=1, cache_frozen_trunk=cache, optimizer=adamw(3e-3))
        data = PreferenceDataModule(str(separable_dir), max_length=64, min_prompt_tokens=16, batch_size=8)
        root = tmp_path / f"cache_{cache}"
        run = trainer(root, max_epochs=3, limit_train_batches=3, log_every_n_steps=1)
        run.fit(model, data)
        metrics = {k: float(v) for k, v in run.callback_metrics.items()}
        metrics.update(trainer(root, max_epochs=1).test(model, data, verbose=False)[0])
        metrics = {k: v for k, v in metrics.items() if not k.endswith("pairs_per_sec")}  # speed differs
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[cache] = (metrics, weights, model.trunk_cache)
    (plain, plain_weights, none), (cached, cached_weights, cache) = results[False], results[True]
    assert none is None and cache.computed > 0 and cache.reused > cache.computed  # later epochs read it
    assert plain.keys() == cached.keys() and "test/baseline_zero_shot_logprob" in plain
    for key in plain:
        assert cached[key] == pytest.approx(plain[key], abs=1e-5), key
    # nine Adam steps (lr 3e-3) amplify fp32 rounding in near-zero gradients: CI once saw 1.2e-5; the
    # per-step losses and gradients are held to 1e-5 above, the weights after training to 1e-4
    for name in plain_weights:
        torch.testing.assert_close(cached_weights[name], plain_weights[name], rtol=0, atol=1e-4)
    assert (tmp_path / "cache_True" / "frozen_trunk_cache.safetensors").is_file()
    assert not (tmp_path / "cache_False" / "frozen_trunk_cache.safetensors").exists()


def test_trunk_cache_file_is_reused_only_for_the_same_trunk(tmp_path, smol_tokenizer_dir, separable_dir, capsys):
    folder = make_tiny_llama_dir(tmp_path / "llama3", smol_tokenizer_dir, num_hidden_layers=3)
    other = make_tiny_llama_dir(tmp_path / "other", smol_tokenizer_dir, seed=1, num_hidden_layers=3)
    path = tmp_path / "trunk.safetensors"
    model = RewardModel(str(folder), trainable_top_blocks=1)
    data = PreferenceDataModule(
        str(separable_dir), tokenizer_name_or_path=str(folder), max_length=64, min_prompt_tokens=16
    )
    data.prepare(("validation",))
    batch = _pair_batch(data, duplicate=False)

    def rewards(model, cache) -> torch.Tensor:
        model.trunk_cache = cache
        with torch.no_grad():
            return model(batch["input_ids"], batch["attention_mask"])

    first = FrozenTrunkCache(model.model.base_model, 2, path)
    expected = rewards(model, first)
    first.save()
    again = FrozenTrunkCache(model.model.base_model, 2, path)
    torch.testing.assert_close(rewards(model, again), expected)
    assert again.computed == 0 and again.reused == 8  # a rerun reads every sequence from the file
    # another model (other weights) or another number of frozen blocks: the file is not trusted
    other_model = RewardModel(str(other), trainable_top_blocks=1)
    other_cache = FrozenTrunkCache(other_model.model.base_model, 2, path)
    other_expected = rewards(other_model, None)
    torch.testing.assert_close(rewards(other_model, other_cache), other_expected)
    assert other_cache.computed == 8 and not torch.allclose(other_expected, expected)
    assert FrozenTrunkCache(model.model.base_model, 1, path).stored is None
    out = capsys.readouterr().out
    assert "built for another trunk (model " in out and "frozen_blocks 2 -> 1" in out
    # another max_length (other token ids): its sequences are computed, never read from the file
    short = PreferenceDataModule(
        str(separable_dir), tokenizer_name_or_path=str(folder), max_length=24, min_prompt_tokens=8
    )
    short.prepare(("validation",))
    batch = _pair_batch(short, duplicate=False)
    expected_short = rewards(model, None)
    reread = FrozenTrunkCache(model.model.base_model, 2, path)
    torch.testing.assert_close(rewards(model, reread), expected_short)
    assert reread.computed == 8 and reread.reused == 0


def test_trunk_cache_never_trusts_a_half_written_or_truncated_file(
    tmp_path, smol_tokenizer_dir, separable_dir, monkeypatch, capsys
):
    import lit_rlhf.models.frozen_trunk as frozen_trunk

    folder = make_tiny_llama_dir(tmp_path / "llama3", smol_tokenizer_dir, num_hidden_layers=3)
    model = RewardModel(str(folder), trainable_top_blocks=1)
    data = PreferenceDataModule(
        str(separable_dir), tokenizer_name_or_path=str(folder), max_length=64, min_prompt_tokens=16
    )
    data.prepare(("validation",))
    batch = _pair_batch(data, duplicate=False)
    path = tmp_path / "cache" / "trunk.safetensors"

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a header")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(frozen_trunk, "save_file", full_disk)
    cache = FrozenTrunkCache(model.model.base_model, 2, path)
    model.trunk_cache = cache
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["attention_mask"])
    cache.save()
    out = capsys.readouterr().out
    assert "could not write the frozen-trunk cache" in out and "No space left on device" in out
    assert not path.exists() and list(path.parent.iterdir()) == []  # no file, no staging file left
    monkeypatch.undo()
    cache.save()  # still dirty: the next save writes it
    assert path.is_file()
    path.write_bytes(path.read_bytes()[:200])  # truncated by an interrupted copy
    rebuilt = FrozenTrunkCache(model.model.base_model, 2, path)
    assert rebuilt.stored is None and "is unreadable" in capsys.readouterr().out
    model.trunk_cache = rebuilt
    with torch.no_grad():
        torch.testing.assert_close(model(batch["input_ids"], batch["attention_mask"]), expected)
    assert rebuilt.computed == 8


# -- test report: interval, baselines, length subsets ---------------------------------------------


def test_mean_response_logprob_equals_the_log_probs_of_the_full_causal_lm(tiny_llama_dir):
    from lit_rlhf.models.hf import load_causal_lm

    lm = load_causal_lm(str(tiny_llama_dir)).eval()
    input_ids = torch.tensor([[5, 9, 11, 13, 17, 19], [23, 29, 31, 2, 2, 2]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    start = torch.tensor([2, 1])  # row 0: tokens 2..5 are the response, row 1: tokens 1..2
    with torch.no_grad():
        logits = lm(input_ids=input_ids, attention_mask=attention_mask).logits.log_softmax(-1)
        hidden = lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    expected = torch.stack(
        [
            sum(logits[0, t - 1, input_ids[0, t]] for t in range(2, 6)) / 4,
            sum(logits[1, t - 1, input_ids[1, t]] for t in range(1, 3)) / 2,
        ]
    )
    got = mean_response_logprob(lm.lm_head, hidden, input_ids, attention_mask, start, chunk=3)
    torch.testing.assert_close(got, expected)


def test_grouped_bootstrap_interval_resamples_whole_posts():
    from lit_rlhf.eval.stats import bootstrap_mean_ci

    rng = np.random.default_rng(0)
    per_post = rng.integers(0, 2, 40).astype(float)  # 40 posts, each post's 5 pairs agree
    values, posts = np.repeat(per_post, 5), np.repeat(np.arange(40), 5)
    mean, low, high = grouped_bootstrap_interval(values, posts)
    assert mean == pytest.approx(per_post.mean())
    reference = bootstrap_mean_ci(per_post)  # equal-sized posts: the bootstrap of the 40 post means
    assert low == pytest.approx(reference.low, abs=0.02) and high == pytest.approx(reference.high, abs=0.02)
    independent = bootstrap_mean_ci(values)  # treating the 200 pairs as independent is too narrow
    assert high - low > 1.8 * (independent.high - independent.low)
    assert grouped_bootstrap_interval([1.0, 1.0, 1.0], [0, 1, 2]) == (1.0, 1.0, 1.0)


def _length_pairs() -> list[dict]:
    """13 test pairs: the chosen reply is the longer one in 8, the shorter one in 4, as long in 1."""
    longer = [
        {
            "prompt": f"Question {i}?",
            "chosen": f"A careful, complete answer number {i}.",
            "rejected": f"No {i}.",
            "post_id": f"p{i // 2}",
        }
        for i in range(8)
    ]
    shorter = [
        {
            "prompt": f"Other question {i}?",
            "chosen": f"Yes {i}.",
            "rejected": f"A rambling reply that goes on {i}.",
            "post_id": f"s{i}",
        }
        for i in range(4)
    ]
    tie = [{"prompt": "Tie?", "chosen": "abc", "rejected": "xyz", "post_id": "t"}]
    return longer + shorter + tie


@pytest.mark.parametrize("shared_trunk", [True, False], ids=["shared-trunk", "full-base-forward"])
def test_test_run_reports_interval_baselines_and_length_subsets(tmp_path, smol_tokenizer_dir, shared_trunk):
    from lit_rlhf.models.hf import load_causal_lm

    folder = make_tiny_llama_dir(tmp_path / "llama3", smol_tokenizer_dir, num_hidden_layers=3)
    base = (
        folder
        if shared_trunk
        else make_tiny_llama_dir(tmp_path / "base", smol_tokenizer_dir, seed=2, num_hidden_layers=3)
    )
    pairs = _length_pairs()
    write_jsonl(tmp_path / "pairs" / "test.jsonl", pairs)
    model = RewardModel(str(folder), trainable_top_blocks=1, baseline_model=None if shared_trunk else str(base))
    data = PreferenceDataModule(str(tmp_path / "pairs"), max_length=64, min_prompt_tokens=16, batch_size=4)
    metrics = trainer(tmp_path / "run", max_epochs=1).test(model, data, verbose=False)[0]

    # references, computed apart from the module: the plain HF scorer and the full base causal LM
    test = data.datasets["test"]
    sequences = [
        (row["chosen_ids"], row["rejected_ids"], row["chosen_prompt_tokens"], row["rejected_prompt_tokens"])
        for row in test
    ]
    lm = load_causal_lm(str(base)).eval()

    def reward(ids) -> float:
        with torch.no_grad():
            return model.model(input_ids=torch.tensor([ids])).logits.item()

    def mean_logprob(ids, start) -> float:
        with torch.no_grad():
            logprobs = lm(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        return float(np.mean([logprobs[t - 1, ids[t]].item() for t in range(start, len(ids))]))

    model_correct = np.array([reward(c) > reward(r) for c, r, _, _ in sequences], dtype=float)
    logprob_correct = []
    for c, r, cs, rs in sequences:
        lc, lr = mean_logprob(c, cs), mean_logprob(r, rs)
        logprob_correct.append(1.0 if lc > lr else 0.0 if lc < lr else 0.5)
    logprob_correct = np.array(logprob_correct)
    longer, shorter = slice(0, 8), slice(8, 12)  # the file order is kept in the test split

    assert metrics["test/accuracy"] == pytest.approx(model_correct.mean(), abs=1e-6)
    assert metrics["test/accuracy_ci_low"] <= metrics["test/accuracy"] <= metrics["test/accuracy_ci_high"]
    assert metrics["test/baseline_longer_reply"] == pytest.approx((8 + 0.5) / 13)
    assert metrics["test/baseline_longer_reply_chosen_longer"] == 1.0
    assert metrics["test/baseline_longer_reply_chosen_shorter"] == 0.0
    assert metrics["test/pairs_chosen_longer"] == 8 and metrics["test/pairs_chosen_shorter"] == 4
    assert metrics["test/accuracy_chosen_longer"] == pytest.approx(model_correct[longer].mean())
    assert metrics["test/accuracy_chosen_shorter"] == pytest.approx(model_correct[shorter].mean())
    assert metrics["test/baseline_zero_shot_logprob"] == pytest.approx(logprob_correct.mean())
    assert metrics["test/baseline_zero_shot_logprob_chosen_shorter"] == pytest.approx(logprob_correct[shorter].mean())
    table = (tmp_path / "run" / "test_accuracy.md").read_text()
    assert "| reward model | " in table and "| longer reply wins (characters) | " in table
    assert "zero-shot mean log-prob of the base model" in table and "chosen is the shorter reply (4)" in table
    assert f"{metrics['test/baseline_longer_reply']:.3f} [" in table
    # the reward's Pearson correlation with the replies' length (characters), chosen and rejected replies
    replies = [reward(ids) for c, r, _, _ in sequences for ids in (c, r)]
    lengths = [len(row[side]) for row in test for side in ("chosen", "rejected")]
    assert metrics["test/length_corr"] == pytest.approx(np.corrcoef(replies, lengths)[0, 1], abs=1e-6)


def test_odin_test_run_reports_each_output_per_source(tmp_path, smol_tokenizer_dir):
    folder = make_tiny_llama_dir(tmp_path / "llama3", smol_tokenizer_dir, num_hidden_layers=3)
    write_jsonl(tmp_path / "alpha" / "test.jsonl", _length_pairs())
    write_jsonl(tmp_path / "beta" / "test.jsonl", separable_pairs(6))
    sources = [{"domain": "alpha", "path": str(tmp_path / "alpha")}, {"domain": "beta", "path": str(tmp_path / "beta")}]
    model = RewardModel(str(folder), head="odin", trainable_top_blocks=1)  # the trunk cache serves both outputs
    data = PreferenceDataModule(
        sources=sources, max_length=64, min_prompt_tokens=16, batch_size=4, min_score_ratio=None
    )
    metrics = trainer(tmp_path / "run", max_epochs=1).test(model, data, verbose=False)[0]

    test = data.datasets["test"]
    with torch.no_grad():
        outputs = {
            side: np.array(
                [model.model(input_ids=torch.tensor([ids])).logits[0].tolist() for ids in test[f"{side}_ids"]]
            )
            for side in ("chosen", "rejected")
        }
    chars = {side: np.array([len(text) for text in test[side]]) for side in ("chosen", "rejected")}
    domains = np.array(test["domain"])
    for key, mask in (("", domains != ""), ("alpha/", domains == "alpha"), ("beta/", domains == "beta")):
        quality = outputs["chosen"][mask, 0] > outputs["rejected"][mask, 0]
        total = outputs["chosen"][mask].sum(1) > outputs["rejected"][mask].sum(1)
        assert metrics[f"test/{key}accuracy_quality"] == pytest.approx(quality.mean(), abs=1e-6)
        if key:  # overall, `test/accuracy` is the BinaryAccuracy of the sum
            assert metrics[f"test/{key}accuracy"] == pytest.approx(total.mean(), abs=1e-6)
        lengths = np.concatenate([chars["chosen"][mask], chars["rejected"][mask]])
        for index, output in enumerate(("quality", "length")):
            rewards = np.concatenate([outputs["chosen"][mask, index], outputs["rejected"][mask, index]])
            expected = np.corrcoef(rewards, lengths)[0, 1]
            assert metrics[f"test/{key}length_corr_{output}"] == pytest.approx(expected, abs=1e-5)
    assert metrics["test/accuracy"] == pytest.approx(np.mean(outputs["chosen"].sum(1) > outputs["rejected"].sum(1)))
    assert metrics["test/alpha/baseline_longer_reply_chosen_shorter"] == 0.0
    assert metrics["test/alpha/pairs_chosen_shorter"] == 4 and metrics["test/beta/pairs_chosen_longer"] == 6
    assert {"test/alpha/baseline_zero_shot_logprob_ci_low", "test/beta/accuracy_quality_chosen_longer"} <= set(metrics)
    report = (tmp_path / "run" / "test_accuracy.md").read_text()
    assert "| reward model (quality + length) | " in report and "| quality output alone | " in report
    assert "## Per source" in report and "| alpha (13: 4 / 8) | quality output alone | " in report
    assert "| beta (6: 0 / 6) | longer reply wins (characters) | 1.000 [" in report
