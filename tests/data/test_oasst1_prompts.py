"""PPO prompts from oasst1: root prompts by default, follow-ups with their conversation, and
evaluation prompts kept out of the reward model's training data (real oasst1 rows)."""

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import config_args
from ppo_fixtures import make_parity_policy, make_parity_reward_model

from lit_rlhf.artifacts import REWARD_MODEL_INFO, read_eval_prompts
from lit_rlhf.cli import LitRLHFCLI
from lit_rlhf.data.oasst1 import read_oasst1_rows
from lit_rlhf.data.oasst1_prompts import OASST1PromptDataModule, split_prompts
from lit_rlhf.models.hf import load_tokenizer
from lit_rlhf.text import chat_prompt_ids

REPO = Path(__file__).resolve().parents[2]
VALIDATION = "oasst1/oasst1_validation_en.jsonl"
TRAIN_SAMPLE = "oasst1_train_sample/oasst1_train_en_sample.jsonl"


@pytest.mark.parametrize("file, roots, follow_ups", [(VALIDATION, 150, 472), (TRAIN_SAMPLE, 88, 358)])
def test_prompts_are_the_root_questions_by_default(data_root, file, roots, follow_ups):
    rows = read_oasst1_rows(str(data_root / file))
    root_ids = {r["message_id"] for r in rows if r["role"] == "prompter" and r["parent_id"] is None}
    stats = Counter()
    train, evaluation = split_prompts(rows, "en", num_train=10_000, num_eval=50, seed=0, stats=stats)
    prompts = train + evaluation
    assert len(prompts) == len(root_ids) == roots
    assert {p["message_id"] for p in prompts} == root_ids
    assert all(isinstance(p["prompt"], str) for p in prompts)
    assert stats["follow-up turns left out"] == follow_ups
    assert not {p["message_tree_id"] for p in train} & {p["message_tree_id"] for p in evaluation}


def test_follow_ups_come_with_their_conversation(data_root):
    rows = read_oasst1_rows(str(data_root / VALIDATION))
    by_id = {r["message_id"]: r for r in rows}
    stats = Counter()
    train, _ = split_prompts(rows, "en", 10_000, 0, 0, follow_ups=True, stats=stats)
    follow = [p for p in train if by_id[p["message_id"]]["parent_id"]]
    # 472 follow-up turns, one of which lost its history (its parent is not in the English rows)
    assert len(follow) == 471 and stats["follow-up turns without their conversation left out"] == 1
    for p in follow:
        messages = p["prompt"]
        assert len(messages) >= 3 and len(messages) % 2 == 1
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + ["user"]
        assert messages[-1]["content"] == by_id[p["message_id"]]["text"]
        root = [r for r in rows if r["message_tree_id"] == p["message_tree_id"] and r["parent_id"] is None]
        assert messages[0]["content"] == root[0]["text"]


def test_long_conversations_lose_their_oldest_turns(smol_tokenizer_dir):
    tokenizer = load_tokenizer(str(smol_tokenizer_dir))
    conversation = [
        {"role": "user", "content": "FIRST question " + "filler " * 60},
        {"role": "assistant", "content": "first answer " + "filler " * 60},
        {"role": "user", "content": "Ok thanks, and what about the SECOND?"},
    ]
    ids, kept = chat_prompt_ids(tokenizer, conversation, max_length=80)
    assert len(ids) <= 80 and kept == conversation[2:]
    assert tokenizer.decode(ids).endswith("what about the SECOND?<|im_end|>\n<|im_start|>assistant\n")
    ids, kept = chat_prompt_ids(tokenizer, conversation, max_length=400)
    assert kept == conversation and "FIRST question" in tokenizer.decode(ids)


def test_a_system_instruction_stays_in_front_of_every_cut(smol_tokenizer_dir):
    """The system turn replaces the template's default one and is never what a cut removes: a long
    conversation loses its oldest turns, a long question its start, the instruction stays."""
    tokenizer = load_tokenizer(str(smol_tokenizer_dir))
    system = "Answer in one short sentence."
    conversation = [
        {"role": "user", "content": "FIRST question " + "filler " * 60},
        {"role": "assistant", "content": "first answer " + "filler " * 60},
        {"role": "user", "content": "Ok thanks, and what about the SECOND?"},
    ]
    for prompt in (conversation, "START " + "filler " * 200 + "END?"):
        ids, _ = chat_prompt_ids(tokenizer, prompt, max_length=80, system_prompt=system)
        text = tokenizer.decode(ids)
        assert len(ids) <= 80 and text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n")
        assert "FIRST" not in text and "START" not in text and "SmolLM" not in text
    default, _ = chat_prompt_ids(tokenizer, "Hi?", max_length=80)
    assert "SmolLM" in tokenizer.decode(default)  # unset: the template's own system turn, as before


def reward_model_export(folder: Path, trees: set[str], posts: set[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"trained_on": {"message_tree_ids": sorted(trees), "post_ids": sorted(posts)}}
    (folder / REWARD_MODEL_INFO).write_text(json.dumps(record))
    return folder


def test_evaluation_prompts_skip_what_the_reward_model_saw(data_root, tmp_path, smol_tokenizer_dir, capsys):
    rows = read_oasst1_rows(str(data_root / VALIDATION))
    _, before = split_prompts(rows, "en", 10_000, 50, 0)
    trees = sorted({r["message_tree_id"] for r in rows})
    seen_trees = set(trees[::2])  # the reward model trained on every other tree...
    seen_post = next(p["message_id"] for p in before if p["message_tree_id"] not in seen_trees)  # ...and one post
    assert sum(p["message_tree_id"] in seen_trees for p in before) > 10  # the overlap without the exclusion

    data = OASST1PromptDataModule(
        path=str(data_root / VALIDATION),
        tokenizer_name_or_path=str(smol_tokenizer_dir),
        reward_model_path=str(reward_model_export(tmp_path / "rm", seen_trees, {seen_post})),
        num_train_prompts=20,
        num_eval_prompts=50,
        max_prompt_length=64,
    )
    data.setup("fit")
    evaluation = data.eval_prompts
    assert len(evaluation) == 50
    assert not any(p["message_tree_id"] in seen_trees or p["message_id"] == seen_post for p in evaluation)
    excluded = (
        sum(r["role"] == "prompter" and r["parent_id"] is None and r["message_tree_id"] in seen_trees for r in rows) + 1
    )
    assert f"{excluded} prompts the reward model saw, kept out of evaluation" in capsys.readouterr().out
    # too few unseen trees: fewer evaluation prompts, and the log says why
    data.hparams.reward_model_path = str(reward_model_export(tmp_path / "rm2", set(trees[:-5]), set()))
    data.setup("fit")
    assert 0 < len(data.eval_prompts) <= 5
    assert f"only {len(data.eval_prompts)} of the 50 evaluation prompts" in capsys.readouterr().out


def test_cli_links_the_reward_model_path_into_the_prompt_data(data_root, tmp_path, smol_tokenizer_dir):
    policy = make_parity_policy(tmp_path / "policy", smol_tokenizer_dir)
    reward = make_parity_reward_model(tmp_path / "rm", smol_tokenizer_dir)
    rows = read_oasst1_rows(str(data_root / VALIDATION))
    trees = {r["message_tree_id"] for r in rows}
    reward_model_export(reward, set(sorted(trees)[:100]), set())
    cli = LitRLHFCLI(
        args=[
            *config_args("ppo_lora"),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.logger",
            "false",
            "--model.model_name_or_path",
            str(policy),
            "--model.reward_model_path",
            str(reward),
            "--data.path",
            str(data_root / VALIDATION),
            "--data.num_eval_prompts",
            "40",
        ],
        run=False,
    )
    assert cli.datamodule.hparams.reward_model_path == str(reward)
    cli.datamodule.trainer = cli.trainer
    cli.datamodule.setup("fit")
    written = read_eval_prompts(tmp_path / "run")
    assert len(written) == 40 and not {p["message_tree_id"] for p in written} & set(sorted(trees)[:100])
