"""Bad input, stage by stage: each case ends in one readable paragraph (UserInputError /
NonFiniteError, exit code 2 from the command line) or a documented fallback, and leaves nothing
half-written. One test per row of the README's "Bad input" table; rows already covered elsewhere name
that test in the table instead."""

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from eval.test_rlhf_evaluation import fake_runs  # noqa: F401  (a module-scoped fixture)
from helpers import cli_error, config_args, make_tiny_llama_dir
from lightning.pytorch import Trainer
from medmnist_helpers import fit_tiny_dcgan, write_tiny_medmnist
from ppo_fixtures import make_parity_policy, make_parity_reward_model
from preference_fixtures import separable_pairs, write_jsonl
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from lit_rlhf import evaluate
from lit_rlhf.cli import main
from lit_rlhf.data.oasst1 import read_oasst1_rows
from lit_rlhf.data.oasst1_prompts import split_prompts
from lit_rlhf.data.preference import PreferenceDataModule, read_preference_source
from lit_rlhf.dcgan import report as gan_report
from lit_rlhf.dcgan.classifier import MedMNISTClassifier
from lit_rlhf.dcgan.medmnist import MedMNISTDataModule
from lit_rlhf.dcgan.module import DCGAN
from lit_rlhf.errors import NonFiniteError, UserInputError
from lit_rlhf.eval.generation import generate_responses
from lit_rlhf.eval.rlhf import load_lora_policy
from lit_rlhf.models.hf import load_causal_lm, load_sequence_scorer, load_tokenizer
from lit_rlhf.modules.ppo import PPOModule
from lit_rlhf.modules.reward_model import RewardModel
from lit_rlhf.text import chat_prompt_ids
from lit_rlhf.tinygpt import results as tinygpt_results
from lit_rlhf.tinygpt.pretrain import TinyGPTModule
from lit_rlhf.tinygpt.prompts import PromptsDataModule
from lit_rlhf.tinygpt.rl_lite import RLLiteModule
from lit_rlhf.tinygpt.sft import SFTTinyGPTModule
from lit_rlhf.tinygpt.tokenizer import UNK
from lit_rlhf.tinygpt.wikitext import WikiText2DataModule

REPO = Path(__file__).resolve().parents[1]
CSV_ONLY = '[{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": ".", "name": "csv"}}]'
TEXT = "".join(chr(ord("a") + i % 26) for i in range(6000))
VOCAB = [UNK, *sorted(set(TEXT + "Instruction: \nAnswer: "))]
TINYGPT_CLASSES = [TinyGPTModule, SFTTinyGPTModule, RLLiteModule]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one intra-op thread on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tinygpt_checkpoint(path: Path, vocab=VOCAB, **architecture) -> Path:
    """A Lightning-style checkpoint of a freshly initialised TinyGPTModule (as tests/tinygpt/conftest.py)."""
    torch.manual_seed(0)
    module = TinyGPTModule(vocab=vocab, **{"block_size": 32, "n_embd": 32, "n_head": 2, **architecture})
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def truncated_copy(source: Path, target: Path) -> Path:
    """The first half of a file: an interrupted copy or save."""
    target.parent.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def truncated_folder(source: Path, target: Path, weights: str) -> Path:
    shutil.copytree(source, target)
    truncated_copy(source / weights, target / weights)
    return target


@pytest.fixture(scope="module")
def dcgan_checkpoint(tmp_path_factory) -> Path:
    """A real DCGAN checkpoint (1 epoch on tiny images): the "checkpoint from another stage" of the
    TinyGPT and HF stages, and the input of the GAN report."""
    root = tmp_path_factory.mktemp("dcgan")
    _, trainer = fit_tiny_dcgan(root, epochs=1)
    trainer.save_checkpoint(root / "dcgan.ckpt")
    return root / "dcgan.ckpt"


@pytest.fixture(scope="module")
def no_pad_tokenizer_dirs(tmp_path_factory, tiny_llama_dir) -> tuple[Path, Path]:
    """Copies of the tiny model whose tokenizer has no pad token, and neither pad nor eos."""
    root = tmp_path_factory.mktemp("no_pad")
    folders = []
    for name, tokens in (("no_pad", {"pad_token": None}), ("no_pad_no_eos", {"pad_token": None, "eos_token": None})):
        folder = shutil.copytree(tiny_llama_dir, root / name)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        for key, value in tokens.items():
            setattr(tokenizer, key, value)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return tuple(folders)


# -------------------------------------------------------------------------- TinyGPT pretraining


def test_tinygpt_hub_corpus_offline_names_the_local_alternatives():
    with pytest.raises(UserInputError, match=r"offline\..*--data.path .*builtin:pydoc-topics"):
        WikiText2DataModule(path="wikitext", name="wikitext-2-raw-v1").texts


def test_tinygpt_text_file_that_is_not_utf8(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"caf\xe9 \xff\xfe" * 100)
    with pytest.raises(UserInputError, match="UTF-8"):
        WikiText2DataModule(path=str(tmp_path / "train.txt")).texts


def test_tinygpt_prompt_longer_than_the_block_keeps_its_end(tmp_path):
    """Documented fallback: generation sees the last block_size characters of a longer prompt."""
    model = TinyGPTModule(init_from=str(tinygpt_checkpoint(tmp_path / "t.ckpt", block_size=8)))
    long_prompt = "xyz" * 30 + "abcdefgh"
    assert model.sample([long_prompt], max_new_chars=12) == model.sample(["abcdefgh"], max_new_chars=12)


def test_tinygpt_nan_loss_stops_the_cli_run_without_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(TinyGPTModule, "_loss", lambda self, batch: self(batch[0]).sum() * math.nan)
    root = tmp_path / "run"
    message = cli_error(
        capsys,
        lambda: main(
            [
                "fit",
                "--config",
                "configs/tinygpt/pretrain.yaml",
                "--data.path",
                "builtin:pydoc-topics",
                "--data.train_chars",
                "4000",
                "--data.val_chars",
                "1000",
                "--trainer.max_steps",
                "3",
                "--trainer.logger",
                CSV_ONLY,
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.default_root_dir",
                str(root),
            ]
        ),
    )
    assert "train/loss = nan at step 0" in message and "learning rate" in message
    assert not list(root.rglob("*.ckpt"))


@pytest.mark.parametrize("module_class", TINYGPT_CLASSES, ids=lambda c: c.__name__)
def test_tinygpt_init_from_a_dcgan_checkpoint_is_refused(module_class, dcgan_checkpoint):
    with pytest.raises(UserInputError, match="is not a TinyGPT checkpoint .*pretrain_tinygpt, sft_tinygpt or rl_lite"):
        module_class(init_from=str(dcgan_checkpoint))


@pytest.mark.parametrize("module_class", TINYGPT_CLASSES, ids=lambda c: c.__name__)
def test_tinygpt_init_from_a_truncated_checkpoint(module_class, tmp_path):
    bad = truncated_copy(tinygpt_checkpoint(tmp_path / "t.ckpt"), tmp_path / "truncated.ckpt")
    with pytest.raises(UserInputError, match="init_from: .* is not a readable checkpoint .*truncated or corrupt"):
        module_class(init_from=str(bad))


def test_tinygpt_init_from_a_checkpoint_holding_python_objects_is_not_unpickled(tmp_path):
    """A weights-only load refuses classes, so a checkpoint from elsewhere cannot run code on load."""
    torch.save({"state_dict": {}, "hyper_parameters": {"args": argparse.Namespace(lr=1.0)}}, tmp_path / "foreign.ckpt")
    with pytest.raises(UserInputError, match="Unsupported global.*argparse.Namespace.*weights-only load refuses"):
        TinyGPTModule(init_from=str(tmp_path / "foreign.ckpt"))


# -------------------------------------------------------------------------- SFT


@pytest.mark.parametrize(
    "config, bad_value",
    [
        ("sft_tinygpt", "--model.init_args.init_from={dcgan}"),
        ("reward_model", "--model.model_name_or_path=lit-rlhf-tests/no-such-model"),
    ],
    ids=["sft_tinygpt", "reward_model"],
)
def test_init_time_errors_through_the_cli_are_one_paragraph(config, bad_value, tmp_path, dcgan_checkpoint, capsys):
    """Today: a jsonargparse trace ("Does not validate against any of the Union subtypes") with
    the message inside; the same holds for every UserInputError raised while building a module."""
    message = cli_error(
        capsys,
        lambda: main(
            [
                "fit",
                *config_args(config),
                bad_value.format(dcgan=dcgan_checkpoint),
                "--trainer.default_root_dir",
                str(tmp_path / "run"),
            ]
        ),
    )
    assert "is not a TinyGPT checkpoint" in message or "offline" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sft_nan_loss_is_a_non_finite_error(tmp_path):
    model = SFTTinyGPTModule(init_from=str(tinygpt_checkpoint(tmp_path / "t.ckpt")))
    with torch.no_grad():
        model.model.wte.weight.fill_(math.nan)
    x = torch.randint(1, len(VOCAB), (2, 50))  # longer than the block: the sliding windows are scored too
    with pytest.raises(NonFiniteError, match="train/loss = nan"):
        model.training_step((x, x), 0)


# -------------------------------------------------------------------------- RL-lite


def test_rl_lite_without_a_start_checkpoint_or_with_a_missing_one(tmp_path):
    with pytest.raises(UserInputError, match="RL-lite starts from a TinyGPT checkpoint: set model.init_args.init_from"):
        RLLiteModule()
    with pytest.raises(UserInputError, match="init_from: the local path .* does not exist"):
        RLLiteModule(init_from=str(tmp_path / "missing.ckpt"))
    with pytest.raises(UserInputError, match="temperature must be > 0"):
        RLLiteModule(init_from=str(tinygpt_checkpoint(tmp_path / "t.ckpt")), temperature=0.0)


def test_rl_lite_prompts_must_not_be_empty():
    for prompts in ([], ["ok", ""]):
        with pytest.raises(UserInputError, match="non-empty list of non-empty strings"):
            PromptsDataModule(prompts=prompts)


def test_rl_lite_prompt_longer_than_the_block_is_cropped_from_the_left(tmp_path):
    model = RLLiteModule(
        init_from=str(tinygpt_checkpoint(tmp_path / "t.ckpt", block_size=8)), samples_per_prompt=4, max_new_chars=6
    )
    prompt = "abcdefghijklmnopqrstuvwxyz" * 2
    seqs, mask, texts = model.sample_completions(prompt)
    assert seqs.shape == (4, len(prompt) + 6) and mask.shape == (4, 6) and len(texts) == 4
    logits = model.model.sliding_logits(seqs[:, :-1])  # on-policy scoring of the whole sequence
    assert logits.shape[:2] == (4, len(prompt) + 5) and torch.isfinite(logits).all()


def test_rl_lite_nan_reward_is_a_non_finite_error(tmp_path, monkeypatch):
    model = RLLiteModule(init_from=str(tinygpt_checkpoint(tmp_path / "t.ckpt")), samples_per_prompt=4, max_new_chars=6)
    monkeypatch.setattr("lit_rlhf.tinygpt.rl_lite.keyword_length_reward", lambda *args: math.nan)
    with pytest.raises(NonFiniteError, match=r"train/reward = \[nan, nan, nan, nan\] at step 0.*reward settings"):
        model.training_step(["ab"], 0)


# -------------------------------------------------------------------------- reward model


def test_reward_model_hub_id_offline_and_missing_local_model(tmp_path):
    with pytest.raises(UserInputError, match=r"offline\..*embedded:smollm2"):
        RewardModel("lit-rlhf-tests/no-such-model")
    with pytest.raises(UserInputError, match="does not exist"):
        RewardModel(str(tmp_path / "missing_model"))


def test_reward_model_started_from_a_lightning_checkpoint_is_refused(dcgan_checkpoint):
    with pytest.raises(UserInputError, match="is not a Hugging Face model folder"):
        RewardModel(str(dcgan_checkpoint))


def test_reward_model_from_a_folder_with_truncated_weights(tmp_path, tiny_llama_dir):
    bad = truncated_folder(tiny_llama_dir, tmp_path / "truncated", "model.safetensors")
    with pytest.raises(UserInputError, match="local folder .* truncated or corrupt"):
        RewardModel(str(bad))


def test_reward_model_nan_loss_stops_before_the_export(tmp_path, tiny_llama_dir, monkeypatch):
    write_jsonl(tmp_path / "pairs" / "train.jsonl", separable_pairs(8))
    write_jsonl(tmp_path / "pairs" / "validation.jsonl", separable_pairs(4))
    model = RewardModel(str(tiny_llama_dir))
    monkeypatch.setattr(model, "forward", lambda input_ids, attention_mask, *_: torch.full((len(input_ids),), math.nan))
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    data = PreferenceDataModule(str(tmp_path / "pairs"), max_length=64, min_prompt_tokens=16, batch_size=4)
    with pytest.raises(NonFiniteError, match="train/loss = nan at step 0"):
        trainer.fit(model, data)
    assert not (tmp_path / "reward_model").exists() and not list(tmp_path.rglob("*.ckpt"))


def test_tokenizer_without_pad_token_falls_back_to_eos_else_stops(no_pad_tokenizer_dirs):
    """Shared by the reward model, PPO and evaluation (`load_tokenizer`)."""
    no_pad, no_pad_no_eos = no_pad_tokenizer_dirs
    model = RewardModel(str(no_pad))
    assert model.tokenizer.pad_token == model.tokenizer.eos_token == "<|im_end|>"
    assert model.model.config.pad_token_id == model.tokenizer.eos_token_id
    with pytest.raises(UserInputError, match="neither a pad nor an eos token"):
        load_tokenizer(str(no_pad_no_eos))


# -------------------------------------------------------------------------- PPO (full / LoRA)


@pytest.fixture(scope="module")
def parity_models(tmp_path_factory, smol_tokenizer_dir):
    root = tmp_path_factory.mktemp("parity")
    return make_parity_policy(root / "policy", smol_tokenizer_dir), make_parity_reward_model(
        root / "rm", smol_tokenizer_dir
    )


def oasst1_message(mid, parent, role, text, lang="en") -> dict:
    return {
        "message_id": mid,
        "parent_id": parent,
        "role": role,
        "text": text,
        "rank": 0,
        "message_tree_id": f"tree_{mid}",
        "lang": lang,
    }


def test_ppo_prompt_hub_id_offline_and_missing_reward_model(tmp_path, parity_models):
    with pytest.raises(UserInputError, match=r"offline\..*oasst1_validation_en.jsonl"):
        read_oasst1_rows("OpenAssistant/oasst1")
    with pytest.raises(UserInputError, match="does not exist"):
        PPOModule(model_name_or_path=str(parity_models[0]), reward_model_path=str(tmp_path / "no_reward_model"))


def test_ppo_oasst1_rows_without_role_and_text(tmp_path):
    rows = [{k: v for k, v in oasst1_message("m1", None, "prompter", "Hi").items() if k not in ("role", "text")}]
    with pytest.raises(UserInputError, match=r"not look like oasst1 message rows: missing columns \['text', 'role'\]"):
        read_oasst1_rows(str(write_jsonl(tmp_path / "rows.jsonl", rows)))


def test_ppo_no_prompt_left_after_the_language_filter():
    rows = [oasst1_message(f"m{i}", None, "prompter", f"Hallo {i}", lang="de") for i in range(5)]
    rows.append(oasst1_message("a", "m0", "assistant", "Hello"))
    with pytest.raises(UserInputError, match="No oasst1 prompter message is left after filtering.*data.lang"):
        split_prompts(rows, "en", num_train=4, num_eval=1, seed=0)


def test_ppo_and_evaluation_prompts_longer_than_max_length_lose_their_start(smol_tokenizer_dir):
    tokenizer = load_tokenizer(str(smol_tokenizer_dir))
    text = "START " + "filler words " * 200 + "END OF QUESTION?"
    ids, kept = chat_prompt_ids(tokenizer, text, max_length=48)
    decoded = tokenizer.decode(ids)
    assert len(ids) <= 48 and kept != text and text.endswith(kept)
    assert "START" not in decoded and decoded.endswith("END OF QUESTION?<|im_end|>\n<|im_start|>assistant\n")
    assert decoded.startswith("<|im_start|>system\n")  # the template stays whole


def test_ppo_model_paths_that_are_lightning_checkpoints_or_truncated(tmp_path, parity_models, dcgan_checkpoint):
    policy, reward = parity_models
    with pytest.raises(UserInputError, match="is not a Hugging Face model folder"):
        PPOModule(model_name_or_path=str(dcgan_checkpoint), reward_model_path=str(reward))
    bad = truncated_folder(policy, tmp_path / "truncated_policy", "model.safetensors")
    with pytest.raises(UserInputError, match="local folder .* truncated or corrupt"):
        PPOModule(model_name_or_path=str(bad), reward_model_path=str(reward))


def test_ppo_reward_model_path_pointing_at_a_policy_is_refused(parity_models):
    policy, _ = parity_models
    with pytest.raises(UserInputError, match="is not a trained reward model"):
        PPOModule(model_name_or_path=str(policy), reward_model_path=str(policy))


def test_a_system_instruction_the_chat_template_cannot_render_is_refused(tmp_path, parity_models):
    """A template without a system role (it drops the system turn) would train the policy without the
    instruction its export records: refused before any weights load."""
    import shutil

    from lit_rlhf.models.hf import load_tokenizer

    policy, reward = parity_models
    no_system = shutil.copytree(policy, tmp_path / "no_system_role")
    tokenizer = load_tokenizer(str(no_system))
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer.save_pretrained(no_system)
    with pytest.raises(UserInputError, match="does not render the system instruction 'Be brief.'"):
        PPOModule(model_name_or_path=str(no_system), reward_model_path=str(reward), system_prompt="Be brief.")
    PPOModule(model_name_or_path=str(no_system), reward_model_path=str(reward))  # no instruction: nothing to render


# -------------------------------------------------------------------------- evaluation


def evaluate_args(fake_runs, out: Path, **overrides) -> list[str]:
    root, base, reward, full, lora_run = fake_runs
    policies = {}
    for name, key, default in (("PPO (full)", "ppo_full", full), ("PPO (LoRA)", "ppo_lora", lora_run)):
        run = overrides.pop(key, default)
        if run not in (None, "null"):
            policies[name] = str(run)
    settings = {
        "reward_model": reward,
        "base_model": base,
        "policies": json.dumps(policies),
        "out_dir": out,
        "max_new_tokens": 4,
        "batch_size": 25,
        "bootstrap_resamples": 100,
        **overrides,
    }
    return ["--config", str(REPO / "configs/rlhf/evaluate.yaml"), *[f"--{k}={v}" for k, v in settings.items()]]


def test_evaluation_base_model_hub_id_offline(fake_runs, tmp_path, capsys):
    out = tmp_path / "eval"
    message = cli_error(
        capsys,
        lambda: evaluate.main(
            evaluate_args(fake_runs, out, base_model="lit-rlhf-tests/no-such-model", ppo_lora="null")
        ),
    )
    assert "offline" in message and "embedded:smollm2" in message and not out.exists()


def test_evaluation_prompts_missing_or_without_prompt_text(fake_runs, tmp_path, capsys):
    out = tmp_path / "eval"
    message = cli_error(
        capsys, lambda: evaluate.main(evaluate_args(fake_runs, out, eval_prompts=tmp_path / "none.jsonl"))
    )
    assert "No evaluation prompts at" in message
    rows = [{"message_id": str(i), "text": f"question {i}"} for i in range(60)]
    bad = write_jsonl(tmp_path / "eval_prompts.jsonl", rows)
    message = cli_error(capsys, lambda: evaluate.main(evaluate_args(fake_runs, out, eval_prompts=bad)))
    assert "60 rows of" in message and "no non-empty 'prompt' text" in message
    bad.write_text('{"prompt": "fine"}\n{"prompt": "cut here\n')
    message = cli_error(capsys, lambda: evaluate.main(evaluate_args(fake_runs, out, eval_prompts=bad)))
    assert "is not a JSON-lines file" in message and not out.exists()


def test_evaluation_ppo_run_without_its_export(fake_runs, tmp_path, capsys):
    full = shutil.copytree(fake_runs[3], tmp_path / "ppo_full")
    shutil.rmtree(full / "policy")
    message = cli_error(capsys, lambda: evaluate.main(evaluate_args(fake_runs, tmp_path / "eval", ppo_full=full)))
    assert "No exported policy in" in message and "policy/ (a full fine-tune) or policy_adapter/ (LoRA)" in message


def test_tinygpt_results_of_a_folder_that_is_no_run(tmp_path, capsys):
    (tmp_path / "not_a_run").mkdir()
    message = cli_error(
        capsys,
        lambda: tinygpt_results.main(["--pretrain", str(tmp_path / "not_a_run"), "--out", str(tmp_path / "out")]),
    )
    assert "has no csv/version_*/metrics.csv" in message and not (tmp_path / "out").exists()


def test_evaluation_long_prompts_are_cut_from_the_left_when_generating(fake_runs):
    base = fake_runs[1]
    model, tokenizer = load_causal_lm(str(base)), load_tokenizer(str(base), padding_side="left")
    prompts = ["short question?", "START " + "filler words " * 300 + "END?"]
    texts, ids = generate_responses(
        model, tokenizer, prompts, max_new_tokens=3, temperature=0.7, seed=0, max_prompt_length=40
    )
    assert len(texts) == 2 and all(0 < len(row) <= 3 for row in ids)


def test_evaluation_nan_rewards_stop_before_anything_is_written(fake_runs, tmp_path, monkeypatch, capsys):
    from lit_rlhf.eval import rlhf

    monkeypatch.setattr(
        rlhf, "score_responses", lambda model, tok, prompts, *args, **kwargs: torch.full((len(prompts),), math.nan)
    )
    out = tmp_path / "eval"
    message = cli_error(
        capsys,
        lambda: evaluate.main(
            evaluate_args(
                fake_runs, out, ppo_full="null", ppo_lora="null", eval_prompts=fake_runs[3] / "eval_prompts.jsonl"
            )
        ),
    )
    assert "gave NaN/inf rewards to 50 of the 50 responses of Pretrained" in message and not out.exists()


def test_evaluation_reward_model_that_is_a_policy_is_refused(fake_runs, tmp_path, capsys):
    out = tmp_path / "eval"
    message = cli_error(capsys, lambda: evaluate.main(evaluate_args(fake_runs, out, reward_model=fake_runs[1])))
    assert "is not a trained reward model" in message and "score.weight" in message and not out.exists()
    # the reward-model stage itself starts from such a folder: there a new head is what it trains
    assert load_sequence_scorer(str(fake_runs[1]), 0).config.num_labels == 1


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory, smol_tokenizer_dir) -> dict[str, Path]:
    """Base models the fake runs' LoRA adapter (2 layers, hidden 32, q/v_proj) was not trained on."""
    root = tmp_path_factory.mktemp("other_bases")
    bases = {
        "wider": make_tiny_llama_dir(root / "wider", smol_tokenizer_dir, hidden_size=64, intermediate_size=128),
        "deeper": make_tiny_llama_dir(root / "deeper", smol_tokenizer_dir, num_hidden_layers=3),
        "shallower": make_tiny_llama_dir(root / "shallower", smol_tokenizer_dir, num_hidden_layers=1),
        "small_vocab": make_tiny_llama_dir(
            root / "small_vocab", smol_tokenizer_dir, vocab_size=1000, bos_token_id=1, eos_token_id=2, pad_token_id=2
        ),
    }
    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tokenizer))).save_pretrained(
        root / "gpt2"
    )
    tokenizer.save_pretrained(root / "gpt2")
    return {**bases, "gpt2": root / "gpt2"}


@pytest.mark.parametrize("base", ["wider", "deeper", "shallower", "gpt2"])
def test_evaluation_lora_adapter_on_the_wrong_base_model(fake_runs, other_bases, base):
    adapter = fake_runs[4] / "policy_adapter"
    with pytest.raises(UserInputError, match="does not fit the base model .*base_model_name_or_path"):
        load_lora_policy(str(other_bases[base]), adapter)
    assert load_lora_policy(str(fake_runs[1]), adapter) is not None  # its own base loads


def test_evaluation_lora_adapter_on_the_wrong_base_through_the_command(fake_runs, other_bases, tmp_path, capsys):
    """The silent case: a deeper base takes the adapter without a PEFT error."""
    out = tmp_path / "eval"
    message = cli_error(
        capsys,
        lambda: evaluate.main(
            evaluate_args(
                fake_runs,
                out,
                base_model=other_bases["deeper"],
                ppo_full="null",
                eval_prompts=fake_runs[3] / "eval_prompts.jsonl",
            )
        ),
    )
    assert "does not fit the base model" in message and "LoRA tensors are missing from the adapter" in message
    assert not out.exists()


def test_evaluation_tokenizer_of_another_model_is_refused(fake_runs, other_bases, tmp_path, capsys):
    """A policy folder whose tokenizer has more tokens than its embedding (files of two models mixed)."""
    full = shutil.copytree(fake_runs[3], tmp_path / "ppo_full")
    shutil.rmtree(full / "policy")
    shutil.copytree(other_bases["small_vocab"], full / "policy")
    AutoTokenizer.from_pretrained(fake_runs[1]).save_pretrained(full / "policy")
    message = cli_error(
        capsys, lambda: evaluate.main(evaluate_args(fake_runs, tmp_path / "eval", ppo_full=full, ppo_lora="null"))
    )
    assert "The tokenizer of PPO (full) has 49152 tokens but the model's embedding only 1000 rows" in message


def test_evaluation_truncated_adapter_or_policy_weights(fake_runs, tmp_path, capsys):
    lora_run = tmp_path / "ppo_lora"
    truncated_folder(fake_runs[4], lora_run, "policy_adapter/adapter_model.safetensors")
    with pytest.raises(UserInputError, match="Could not read the LoRA adapter weights .* truncated or corrupt"):
        load_lora_policy(str(fake_runs[1]), lora_run / "policy_adapter")
    full = truncated_folder(fake_runs[3], tmp_path / "ppo_full", "policy/model.safetensors")
    message = cli_error(
        capsys, lambda: evaluate.main(evaluate_args(fake_runs, tmp_path / "eval", ppo_full=full, ppo_lora="null"))
    )
    assert "Could not load the causal LM from the local folder" in message and "truncated or corrupt" in message


# -------------------------------------------------------------------------- DCGAN and its report


def test_dcgan_data_with_fewer_images_than_a_batch(tmp_path):
    write_tiny_medmnist(tmp_path, "dermamnist", n_train=8)
    with pytest.raises(UserInputError, match="has 8 images, fewer than batch_size 16"):
        MedMNISTDataModule(root=str(tmp_path), batch_size=16).setup("fit")


def test_dcgan_image_size_or_channels_other_than_the_model(tmp_path):
    with pytest.raises(UserInputError, match="size 32 is not supported"):
        MedMNISTDataModule(size=32)
    write_tiny_medmnist(tmp_path, "dermamnist", n_train=32)
    trainer = Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    with pytest.raises(UserInputError, match=r"\(channels, size\) \(3, 28\) but the DCGAN was built for \(1, 28\)"):
        trainer.fit(
            DCGAN(latent_dim=8, ngf=8, ndf=8, channels=1, image_size=28),
            MedMNISTDataModule(root=str(tmp_path), val_split=None, batch_size=16),
        )


def test_dcgan_nan_losses_stop_training_without_grids_or_checkpoints(tmp_path):
    write_tiny_medmnist(tmp_path / "data", "dermamnist", n_train=32)
    model = DCGAN(latent_dim=8, ngf=8, ndf=8, channels=3, image_size=28)
    with torch.no_grad():
        next(model.generator.parameters()).fill_(math.nan)
    trainer = Trainer(
        default_root_dir=tmp_path / "run",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    message = r"\(loss_d, loss_g, d_real, d_fake\) = \[nan, nan, .*\] at step \d+\. Lower the learning rates"
    with pytest.raises(NonFiniteError, match=message):
        trainer.fit(model, MedMNISTDataModule(root=str(tmp_path / "data"), val_split=None, batch_size=16))
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not list((tmp_path / "run").rglob("grid_final.png"))


def test_gan_report_refuses_checkpoints_of_other_stages(tmp_path, dcgan_checkpoint, capsys):
    tinygpt = tinygpt_checkpoint(tmp_path / "tinygpt.ckpt")
    message = cli_error(
        capsys, lambda: gan_report.main(["--ckpt", str(tinygpt), "--classifier", str(dcgan_checkpoint)])
    )
    assert "is not a DCGAN checkpoint" in message
    message = cli_error(
        capsys,
        lambda: gan_report.main(["--ckpt", str(dcgan_checkpoint), "--classifier", str(dcgan_checkpoint), "--no-wandb"]),
    )
    assert "--classifier" in message and "is not a MedMNISTClassifier checkpoint" in message
    assert not (dcgan_checkpoint.parent / "samples" / "gan_report.md").exists()


def test_gan_report_truncated_checkpoints(tmp_path, dcgan_checkpoint, capsys):
    bad = truncated_copy(dcgan_checkpoint, tmp_path / "truncated.ckpt")
    message = cli_error(capsys, lambda: gan_report.main(["--ckpt", str(bad), "--classifier", str(dcgan_checkpoint)]))
    assert "DCGAN checkpoint (--ckpt)" in message and "truncated or corrupt" in message
    message = cli_error(capsys, lambda: gan_report.main(["--ckpt", str(dcgan_checkpoint), "--classifier", str(bad)]))
    assert "classifier checkpoint (--classifier)" in message and "truncated or corrupt" in message


def test_dcgan_npz_without_medmnist_arrays(tmp_path):
    np.savez(tmp_path / "dermamnist.npz", images=np.zeros((4, 28, 28, 3), np.uint8))
    with pytest.raises(UserInputError, match="train_images"):
        MedMNISTDataModule(root=str(tmp_path), batch_size=2).setup("fit")


def test_dcgan_corrupt_npz(tmp_path):
    write_tiny_medmnist(tmp_path, "dermamnist")
    truncated_copy(tmp_path / "dermamnist.npz", tmp_path / "dermamnist.npz")
    with pytest.raises(UserInputError, match="dermamnist.npz"):
        MedMNISTDataModule(root=str(tmp_path), batch_size=2).setup("fit")


# -------------------------------------------------------------------------- MedMNIST classifier


def test_classifier_nan_loss_is_a_non_finite_error():
    model = MedMNISTClassifier(channels=3, num_classes=7, multi_label=False, width=8, feature_dim=16)
    with torch.no_grad():
        model.head.weight.fill_(math.nan)
    with pytest.raises(NonFiniteError, match="train/loss = nan at step 0"):
        model.training_step((torch.zeros(4, 3, 28, 28), torch.zeros(4, dtype=torch.long)), 0)


def test_classifier_built_for_other_data(tmp_path):
    write_tiny_medmnist(tmp_path, "dermamnist", n_train=32)
    trainer = Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    with pytest.raises(
        UserInputError,
        match=r"\(channels, classes, multi-label\) \(3, 7, False\), the classifier "
        r"was built for \(1, 14, True\)",
    ):
        trainer.fit(
            MedMNISTClassifier(channels=1, num_classes=14, multi_label=True, width=8, feature_dim=16),
            MedMNISTDataModule(root=str(tmp_path), batch_size=16),
        )


# -------------------------------------------------------------------------- every stage's run folder

SECRETS = {"WANDB_API_KEY": "wandbsecret0123456789abcdef0123456789abcdef", "HF_TOKEN": "hf_secretTOKENvalue0123456789"}


def stage_args(stage: str, root: Path, work: Path, parity_models) -> list[str]:
    """`python -m lit_rlhf fit` arguments for a run of a few steps of `stage`, writing under `root`."""
    common = [
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "1",
    ]
    if stage == "pretrain_tinygpt":  # with the config's W&B logger: the secrets check covers its files
        return [
            "--config",
            "configs/tinygpt/pretrain.yaml",
            "--data.path",
            "builtin:pydoc-topics",
            "--data.train_chars",
            "4000",
            "--data.val_chars",
            "1000",
            "--trainer.max_steps",
            "4",
            *common,
        ]
    common += ["--trainer.logger", CSV_ONLY]
    if stage == "sft_tinygpt":
        (work / "train.txt").write_text(TEXT)
        return [
            "--config",
            "configs/tinygpt/sft.yaml",
            *common,
            "--data.path",
            str(work / "train.txt"),
            "--model.init_args.init_from",
            str(tinygpt_checkpoint(work / "init.ckpt")),
            "--data.k",
            "16",
            "--data.stride",
            "32",
            "--data.batch_size",
            "16",
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
        ]
    if stage == "rl_lite":
        return [
            "--config",
            "configs/tinygpt/rl_lite.yaml",
            *common,
            "--model.init_args.init_from",
            str(tinygpt_checkpoint(work / "init.ckpt", vocab=[UNK, "a", "d", "t", "\n"])),
            "--model.init_args.samples_per_prompt",
            "4",
            "--model.init_args.max_new_chars",
            "6",
            "--data.prompts",
            '["a", "t"]',
            "--data.steps_per_epoch",
            "2",
            "--trainer.max_steps",
            "2",
        ]
    if stage == "reward_model":
        write_jsonl(work / "pairs" / "train.jsonl", separable_pairs(16))
        write_jsonl(work / "pairs" / "validation.jsonl", separable_pairs(4))
        return [
            "--config",
            "configs/rlhf/reward_model.yaml",
            *common,
            "--model.model_name_or_path",
            str(parity_models[0]),
            "--data.path",
            str(work / "pairs"),
            "--data.max_length",
            "64",
            "--data.min_prompt_tokens",
            "16",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
        ]
    if stage in ("ppo_full", "ppo_lora"):
        policy, reward = parity_models
        rows = [oasst1_message(f"m{i}", None, "prompter", f"Tell me about number {i}.") for i in range(12)]
        return [
            *config_args(stage),
            *common,
            "--model.model_name_or_path",
            str(policy),
            "--model.reward_model_path",
            str(reward),
            "--model.forward_batch_size",
            "8",
            "--model.max_new_tokens",
            "4",
            "--model.ppo_epochs",
            "1",
            "--data.path",
            str(write_jsonl(work / "oasst1.jsonl", rows)),
            "--data.num_train_prompts",
            "8",
            "--data.num_eval_prompts",
            "2",
            "--data.max_prompt_length",
            "32",
            "--data.batch_size",
            "8",
            "--trainer.max_epochs",
            "1",
        ]
    write_tiny_medmnist(work, "dermamnist", n_train=32)
    data = ["--data.root", str(work), "--data.batch_size", "16", "--trainer.max_epochs", "1"]
    if stage == "dcgan_dermamnist":
        return [
            "--config",
            "configs/dcgan/dcgan.yaml",
            *common,
            *data,
            "--model.latent_dim",
            "8",
            "--model.ngf",
            "8",
            "--model.ndf",
            "8",
            "--model.sample_every_n_epochs",
            "1",
            "--model.plot_first_epochs",
            "1",
        ]
    return [
        "--config",
        "configs/dcgan/classifier.yaml",
        *common,
        *data,
        "--model.width",
        "8",
        "--model.feature_dim",
        "16",
    ]


STAGES = [
    "pretrain_tinygpt",
    "sft_tinygpt",
    "rl_lite",
    "reward_model",
    "ppo_full",
    "ppo_lora",
    "dcgan_dermamnist",
    "medmnist_classifier",
]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_run_checkpoints_load_weights_only_and_hold_no_secret(stage, tmp_path, monkeypatch, parity_models):
    """Checkpoints are data: each one a stage writes loads with `torch.load(weights_only=True)`. And
    tokens in the environment (W&B, HF) appear in no file of the run: configs, hparams, metrics,
    W&B offline files, checkpoints."""
    monkeypatch.chdir(REPO)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    root = tmp_path / "run"
    main(["fit", *stage_args(stage, root, tmp_path, parity_models)])
    checkpoints = sorted(root.rglob("*.ckpt"))
    assert checkpoints, f"{stage} wrote no checkpoint"
    for ckpt in checkpoints:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert checkpoint["state_dict"], ckpt
    assert all(list(root.rglob(name)) for name in ("config.yaml", "hparams.yaml", "metrics.csv"))
    for file in (f for f in tmp_path.rglob("*") if f.is_file()):
        content = file.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in content, f"{name} leaked into {file}"


# -------------------------------------------------------------------------- every stage: files, numbers, paths, devices

OASST1_TO_PAIRS = str(REPO / "scripts" / "oasst1_to_pairs.py")


def broken_table_files(folder: Path) -> dict[str, Path]:
    """An empty .jsonl, a .jsonl whose copy stopped in its 3rd row, and a truncated parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rows = [oasst1_message(f"m{i}", None, "prompter", f"Question {i}?") for i in range(4)]
    lines = [json.dumps(row) for row in rows]
    (folder / "empty.jsonl").write_text("")
    (folder / "cut.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    pq.write_table(pa.Table.from_pylist(rows), folder / "whole.parquet")
    truncated_copy(folder / "whole.parquet", folder / "cut.parquet")
    return {name: folder / name for name in ("empty.jsonl", "cut.jsonl", "cut.parquet")}


def read_with_oasst1_to_pairs(path: str, monkeypatch, capsys) -> str:
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", [OASST1_TO_PAIRS, path, str(Path(path).parent / "pairs_out")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(OASST1_TO_PAIRS, run_name="__main__")
    assert exit_info.value.code == 2 and not (Path(path).parent / "pairs_out").exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("reader", ["oasst1 rows", "preference pairs", "oasst1_to_pairs.py"])
def test_empty_or_truncated_local_files_name_the_file_and_line(reader, tmp_path, monkeypatch, capsys):
    """`datasets` answers an empty file with a bare StopIteration and a cut one with an error naming
    neither file nor line; every local reader goes through `lit_rlhf.data.files.read_local_tables`."""
    files = broken_table_files(tmp_path / "data")
    folder = tmp_path / "folder"  # a good file beside a cut one: the message names the cut one
    folder.mkdir()
    shutil.copy(files["cut.jsonl"], folder / "b.jsonl")
    write_jsonl(folder / "a.jsonl", [oasst1_message("x", None, "prompter", "Hi?")])

    def message(path: Path) -> str:
        if reader == "oasst1_to_pairs.py":
            return read_with_oasst1_to_pairs(str(path), monkeypatch, capsys)
        with pytest.raises(UserInputError) as error:
            (read_oasst1_rows if reader == "oasst1 rows" else read_preference_source)(str(path))
        return str(error.value)

    assert f"'{files['empty.jsonl']}' is empty" in message(files["empty.jsonl"])
    cut = message(files["cut.jsonl"])
    assert f"'{files['cut.jsonl']}' cannot be read at line 3" in cut and "truncated or corrupt" in cut
    assert f"'{files['cut.parquet']}' cannot be read as parquet" in message(files["cut.parquet"])
    assert f"the file '{folder / 'b.jsonl'}' cannot be read at line 3" in message(folder)


IMPOSSIBLE_NUMBERS = [
    ("ppo_full", "--data.batch_size", "-4", "--data.batch_size -4: must be greater than 0."),
    ("ppo_lora", "--data.max_prompt_length", "0", "--data.max_prompt_length 0: must be greater than 0."),
    ("reward_model", "--data.batch_size", "0", "--data.batch_size 0: must be greater than 0."),
    ("reward_model", "--data.eval_batch_size", "0", "--data.eval_batch_size 0: must be greater than 0."),
    ("reward_model", "--data.num_workers", "-1", "--data.num_workers -1: must be greater than or equal to 0."),
    ("pretrain_tinygpt", "--data.batch_size", "0", "--data.batch_size 0: must be greater than 0."),
    ("pretrain_tinygpt", "--model.n_layer", "0", "--model.n_layer 0: must be greater than 0."),
    ("sft_tinygpt", "--data.k", "0", "--data.k 0: must be greater than 0."),
    ("rl_lite", "--model.samples_per_prompt", "0", "--model.samples_per_prompt 0: must be greater than 0."),
    ("dcgan_dermamnist", "--data.batch_size", "-1", "--data.batch_size -1: must be greater than 0."),
    ("pretrain_tinygpt", "--trainer.max_steps", "many", "--trainer.max_steps many: must be an int."),
    (
        "pretrain_tinygpt",
        "--model.n_layers",
        "2",
        "--model.n_layers 2: TinyGPTModule has no option 'n_layers'; did you mean --model.n_layer?",
    ),
]


@pytest.mark.parametrize(
    ("config", "option", "value", "expected"),
    IMPOSSIBLE_NUMBERS,
    ids=[f"{config}{option.removeprefix('-')}" for config, option, *_ in IMPOSSIBLE_NUMBERS],
)
def test_impossible_numbers_are_refused_with_the_option_name(config, option, value, expected, capsys):
    """Sizes are typed (pydantic PositiveInt / NonNegativeInt: plain ints in checkpoints), so the
    parser refuses them before anything is built, in one line instead of its usage and nested report."""
    message = cli_error(capsys, lambda: main(["fit", *config_args(config), option, value]))
    assert message == f"lit_rlhf error: {expected} See `lit_rlhf fit --help`."


@pytest.mark.parametrize("option", ["--samples_per_prompt", "--batch_size", "--generation_batch_size"])
def test_the_evaluation_refuses_impossible_numbers_in_one_line(option, capsys):
    message = cli_error(
        capsys, lambda: evaluate.main(["--config", str(REPO / "configs/rlhf/evaluate.yaml"), option, "0"])
    )
    assert message == (f"lit_rlhf error: {option} 0: must be greater than 0. See `python -m lit_rlhf.evaluate --help`.")


def test_a_run_folder_given_as_a_checkpoint_names_the_file_inside(tmp_path):
    run = tmp_path / "pretrain_run"
    tinygpt_checkpoint((run / "checkpoints").mkdir(parents=True) or run / "checkpoints" / "last.ckpt")
    with pytest.raises(
        UserInputError,
        match=r"init_from: '.*pretrain_run' is a folder, not a checkpoint file\. "
        r"Pass the checkpoint file inside it, probably '.*checkpoints/last\.ckpt'",
    ):
        TinyGPTModule(init_from=str(run))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(UserInputError, match="is a folder, not a checkpoint file. It holds no .ckpt file"):
        TinyGPTModule(init_from=str(tmp_path / "empty_run"))


def tinygpt_run_args(root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(REPO / "configs/tinygpt/pretrain.yaml"),
        "--data.path",
        "builtin:pydoc-topics",
        "--data.train_chars",
        "4000",
        "--data.val_chars",
        "1000",
        "--trainer.max_steps",
        "2",
        "--trainer.logger",
        CSV_ONLY,
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


def test_ckpt_path_last_without_a_checkpoint_is_refused(tmp_path, capsys):
    """Lightning only warns and trains from scratch; a fresh start must be asked for (no --ckpt_path)."""
    root = tmp_path / "run"
    message = cli_error(capsys, lambda: main(tinygpt_run_args(root, "--ckpt_path", "last")))
    assert "--ckpt_path last: there is no last checkpoint in" in message and "leave --ckpt_path out" in message
    assert not list(root.rglob("*.ckpt"))
    main(tinygpt_run_args(root))
    message = cli_error(capsys, lambda: main(tinygpt_run_args(tmp_path / "run2", "--ckpt_path", str(root))))
    assert f"--ckpt_path: '{root}' is a folder, not a checkpoint file" in message and "last.ckpt" in message


def test_gpu_asked_for_on_a_machine_without_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = cli_error(capsys, lambda: main(tinygpt_run_args(tmp_path / "run", "--trainer.accelerator", "gpu")))
    assert "--trainer.accelerator gpu: PyTorch finds no CUDA GPU on this machine" in message
    assert "--trainer.accelerator cpu --trainer.precision 32-true" in message and not (tmp_path / "run").exists()


def test_bf16_on_a_cpu_warns_once_with_the_slowdown(tmp_path, capsys):
    main(tinygpt_run_args(tmp_path / "run", "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed"))
    err = capsys.readouterr().err
    assert err.count("[lit_rlhf] warning: trainer.precision bf16-mixed on a CPU runs ~6x slower than 32-true") == 1


def test_evaluation_given_a_run_folder_as_reward_model_names_the_option_and_the_export(fake_runs, tmp_path, capsys):
    root, base, reward, full, lora_run = fake_runs
    reward_run = tmp_path / "reward_model_run"
    shutil.copytree(reward, reward_run / "reward_model")
    message = cli_error(
        capsys, lambda: evaluate.main(evaluate_args(fake_runs, tmp_path / "eval", reward_model=reward_run))
    )
    assert (
        f"--reward_model '{reward_run}' is not a Hugging Face model folder" in message
        and f"pass its export, '{reward_run / 'reward_model'}'" in message
    )
    message = cli_error(capsys, lambda: evaluate.main(evaluate_args(fake_runs, tmp_path / "eval", reward_model=full)))
    assert f"--reward_model '{full}'" in message and "It holds policy/" in message and "reward_model/ folder" in message
    assert not (tmp_path / "eval").exists()
