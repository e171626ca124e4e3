"""Evaluation: bootstrap intervals, KL reading, the rating command, and a report from fake runs."""

import io
import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import make_tiny_llama_dir
from nbclient import NotebookClient
from peft import LoraConfig, get_peft_model
from ppo_fixtures import make_parity_reward_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_rlhf import evaluate
from lit_rlhf.eval import human_ratings
from lit_rlhf.eval.generation import generate_responses, response_logprobs
from lit_rlhf.eval.kl_monitor import interpret_kl
from lit_rlhf.eval.rlhf_report import seconds_text
from lit_rlhf.eval.stats import bootstrap_mean_ci, paired_gain_ci, repetition_rate, win_rate
from lit_rlhf.models.hf import load_sequence_scorer, load_tokenizer
from lit_rlhf.models.scoring import score_responses
from lit_rlhf.text import batches_by_length

REPO = Path(__file__).resolve().parents[2]


def test_bootstrap_interval_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 30), rng.normal(1.0, 1.0, 3000)
    ci_small, ci_large = bootstrap_mean_ci(small, seed=0), bootstrap_mean_ci(large, seed=0)
    assert ci_small.low < small.mean() < ci_small.high
    assert ci_large.high - ci_large.low < (ci_small.high - ci_small.low) / 5
    assert ci_large.low < 1.0 < ci_large.high
    constant = bootstrap_mean_ci([2.0, 2.0, 2.0])
    assert (constant.mean, constant.low, constant.high) == (2.0, 2.0, 2.0)


def test_paired_gain_and_win_rate():
    base = np.array([0.0, 1.0, 2.0, 3.0])
    gain = paired_gain_ci(base + 1.0, base)  # a constant shift: the paired interval is exact
    assert (gain.mean, gain.low, gain.high) == (1.0, 1.0, 1.0)
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    with pytest.raises(ValueError):
        paired_gain_ci([1, 2], [1, 2, 3])


def test_repetition_rate():
    assert repetition_rate([1, 2, 3, 4, 5]) == 0.0
    assert repetition_rate([7, 7, 7, 7, 7]) == pytest.approx(2 / 3)
    assert repetition_rate([1, 2]) == 0.0


@pytest.mark.parametrize(
    "series, verdict",
    [
        ([0.05, 0.2, 0.3, 0.4], "above the band"),
        ([0.001, 0.002, 0.003], "below the band"),
        ([0.01, 0.04, 0.05, 0.06], "inside the band"),
    ],
)
def test_kl_interpretation_follows_the_numbers(series, verdict):
    text = interpret_kl(series, 0.02, 0.1, "PPO")
    assert verdict in text
    assert f"{series[0]:.4f}" in text


MODELS = ("Pretrained", "PPO (full)", "PPO (LoRA)")


def write_generations(folder: Path, models=MODELS[:2]) -> dict:
    generations = {
        m: [{"prompt": f"p{i}", "response": f"answer {i} of model {k}"} for i in range(1, 4)]
        for k, m in enumerate(models)
    }
    (folder / human_ratings.GENERATIONS_FILE).write_text(json.dumps(generations))
    return generations


def test_rating_command_validates_and_resumes_from_a_pipe(tmp_path):
    generations = write_generations(tmp_path)
    model, number = human_ratings.rating_order(generations)[0]
    out = io.StringIO()
    # invalid answers are asked again; 'q' stops after 3 valid ratings
    missing = human_ratings.rate(tmp_path, stdin=io.StringIO("0\nfive\n4\n5\n3\nq\n"), stdout=out)
    assert missing == 30 - 3
    assert out.getvalue().count("whole number from 1 to 5") == 2
    ratings = human_ratings.load_ratings(tmp_path, generations)
    assert ratings == {
        (model, number, "Coherence"): 4,
        (model, number, "Relevance"): 5,
        (model, number, "Helpfulness"): 3,
    }
    # resume: the next answers fill the remaining 27 ratings in order, then end of input
    assert human_ratings.rate(tmp_path, stdin=io.StringIO("2\n" * 27), stdout=io.StringIO()) == 0
    ratings = human_ratings.load_ratings(tmp_path, generations)
    assert len(ratings) == 30 and ratings[(model, number, "Coherence")] == 4
    assert ratings[(model, number, "Completeness")] == 2
    summary = human_ratings.summarize(tmp_path).read_text()
    assert f"| {model} | 2.67 | 3.00 | 2.33 | 2.00 | 2.00 |" in summary  # (4+2+2)/3, (5+2+2)/3, (3+2+2)/3
    assert summary.count("Prompt 3") == 2


def test_rating_is_blind_and_interleaves_the_models(tmp_path):
    generations = write_generations(tmp_path, MODELS)
    out = io.StringIO()
    assert human_ratings.rate(tmp_path, stdin=io.StringIO("3\n" * 45), stdout=out) == 0
    screen = out.getvalue()
    assert not [m for m in MODELS if m in screen]
    which = {item["response"]: m for m, items in generations.items() for item in items}
    shown = [which[line.removeprefix("RESPONSE: ")] for line in screen.splitlines() if line.startswith("RESPONSE: ")]
    assert sorted(shown) == sorted(m for m in MODELS for _ in range(3))
    switches = sum(a != b for a, b in zip(shown, shown[1:]))
    assert switches > len(MODELS) - 1, shown  # model by model would switch only twice
    summary = human_ratings.summarize(tmp_path).read_text()
    assert all(f"| {m} | 3.00 | 3.00 | 3.00 | 3.00 | 3.00 |" in summary for m in MODELS)  # 15 ratings each


def test_regenerated_response_makes_its_ratings_stale(tmp_path):
    generations = write_generations(tmp_path)
    human_ratings.rate(tmp_path, stdin=io.StringIO("5\n" * 30), stdout=io.StringIO())
    generations["PPO (full)"][1]["response"] = "a regenerated answer"
    (tmp_path / human_ratings.GENERATIONS_FILE).write_text(json.dumps(generations))

    note = io.StringIO()
    ratings = human_ratings.load_ratings(tmp_path, generations, note)
    assert len(ratings) == 25 and not any(key[:2] == ("PPO (full)", 2) for key in ratings)
    assert note.getvalue().startswith("5 saved ratings are of responses that were regenerated")
    out = io.StringIO()
    assert human_ratings.rate(tmp_path, stdin=io.StringIO("1\n" * 5), stdout=out) == 0
    assert out.getvalue().count("=== Item") == 1 and "RESPONSE: a regenerated answer" in out.getvalue()
    note = io.StringIO()
    ratings = human_ratings.load_ratings(tmp_path, generations, note)
    assert len(ratings) == 30 and ratings[("PPO (full)", 2, "Coherence")] == 1 and not note.getvalue()
    assert len((tmp_path / human_ratings.RATINGS_FILE).read_text().splitlines()) == 1 + 30  # stale rows cleared


def test_rating_command_runs_as_a_program_fed_by_a_pipe(tmp_path):
    import subprocess
    import sys

    generations = write_generations(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "lit_rlhf.eval.human_ratings", "rate", "--eval_dir", str(tmp_path)],
        input="5\n" * 30,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "All ratings saved." in result.stdout
    assert len(human_ratings.load_ratings(tmp_path, generations)) == 30


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory, smol_tokenizer_dir):
    """A base model, a 'PPO-full' export, a LoRA adapter, a reward model and PPO metrics."""
    root = tmp_path_factory.mktemp("fake_runs")
    base = make_tiny_llama_dir(root / "base", smol_tokenizer_dir, seed=0)
    reward = make_parity_reward_model(root / "rm", smol_tokenizer_dir)
    full = root / "ppo_full"
    make_tiny_llama_dir(full / "policy", smol_tokenizer_dir, seed=1)
    lora_run = root / "ppo_lora"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(lora_run / "policy_adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(lora_run / "policy_adapter")
    prompts = [
        {"prompt": f"Question number {i}: what is {i} plus {i}?", "message_id": str(i), "message_tree_id": str(i)}
        for i in range(50)
    ]
    (full / "eval_prompts.jsonl").write_text("\n".join(json.dumps(p) for p in prompts))
    for run, kl in ((full, [0.01, 0.03, 0.05, 0.06]), (lora_run, [0.0, 0.005, 0.01, 0.008])):
        (run / "csv" / "version_0").mkdir(parents=True)
        pd.DataFrame(
            {
                "step": range(4),
                "objective/kl_per_token": kl,
                "kl_coef": [0.05, 0.049, 0.05, 0.051],
                "objective/scores": [0.1, 0.2, 0.3, 0.4],
            }
        ).to_csv(run / "csv/version_0/metrics.csv", index=False)
    return root, base, reward, full, lora_run


def test_report_from_fake_runs_and_notebook(fake_runs, tmp_path):
    root, base, reward, full, lora_run = fake_runs
    out = tmp_path / "evaluation"
    evaluate.main(
        [
            "--config",
            str(REPO / "configs/rlhf/evaluate.yaml"),
            "--reward_model",
            str(reward),
            "--base_model",
            str(base),
            "--policies",
            json.dumps({"PPO (full)": str(full), "PPO (LoRA)": str(lora_run)}),
            "--out_dir",
            str(out),
            "--max_new_tokens",
            "6",
            "--batch_size",
            "25",
            "--bootstrap_resamples",
            "500",
            "--wandb_mode",
            "offline",
        ]
    )
    rewards = pd.read_csv(out / "rewards.csv")
    assert len(rewards) == 150 and set(rewards.model) == {"Pretrained", "PPO (full)", "PPO (LoRA)"}
    summary = json.loads((out / "summary.json").read_text())
    gain = summary["PPO (full)"]["reward_gain"]
    expected = (
        rewards[rewards.model == "PPO (full)"].training_reward.mean()
        - rewards[rewards.model == "Pretrained"].training_reward.mean()
    )
    assert gain["mean"] == pytest.approx(expected, abs=1e-6) and gain["low"] <= gain["mean"] <= gain["high"]
    # 6 new tokens: a response without EOS has 6 tokens and counts as truncated
    assert (rewards.truncated == (rewards.length == 6)).all() and rewards.truncated.any()
    for model, group in rewards.groupby("model"):
        assert summary[model]["truncated_share"] == pytest.approx(group.truncated.mean())
    report = (out / "report.md").read_text()
    assert "| Truncated share |" in report and f"| {summary['Pretrained']['truncated_share']:.0%}" in report
    # the report says how cut answers were scored, and flags every model whose answers are mostly cut
    assert "The reward models read such an answer as an open assistant turn" in report
    models = ["Pretrained", "PPO (full)", "PPO (LoRA)"]
    flagged = {line.split(":")[0] for line in summary["readings"] if "did not end within 6 new tokens" in line}
    assert flagged and flagged == {m for m in models if summary[m]["truncated_share"] > 0.25}
    assert "Overlap with the training reward model's data unknown" in report  # its export records nothing
    assert "reading at most 512 tokens with at least 64 for the prompt" in report
    assert (
        "Length-controlled gain" in report
        and "KL to base (per token)" in report
        and "kl.png" in report
        and (out / "kl.png").stat().st_size > 1000
    )
    assert "inside the band" in report and "below the band" in report
    assert report.count("| Prompt 1:") == 3 and "Hallucination/toxicity" in report
    generations = json.loads((out / human_ratings.GENERATIONS_FILE).read_text())
    assert [len(v) for v in generations.values()] == [3, 3, 3]
    assert any((out / "wandb").iterdir())

    notebook = nbformat.read(REPO / "notebooks" / "rlhf_report.ipynb", as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(f"REPORT_DIR = {str(out)!r}"))
    NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    outputs = "".join(str(o) for cell in notebook.cells for o in cell.get("outputs", []))
    assert "PPO (LoRA)" in outputs and "image/png" in outputs


def test_evaluation_needs_enough_prompts(fake_runs, tmp_path):
    root, base, reward, full, lora_run = fake_runs
    with pytest.raises(SystemExit):
        evaluate.main(
            [
                "--config",
                str(REPO / "configs/rlhf/evaluate.yaml"),
                "--reward_model",
                str(reward),
                "--base_model",
                str(base),
                "--policies",
                json.dumps({"PPO (full)": str(full)}),
                "--out_dir",
                str(tmp_path / "e"),
                "--num_prompts",
                "10",
            ]
        )
    assert not (tmp_path / "e").exists()


def test_evaluation_scores_as_the_reward_model_was_trained_and_counts_its_overlap(
    fake_runs, tmp_path, monkeypatch, capsys
):
    """The reward-model export's scoring settings and training trees drive scoring and the report;
    a follow-up prompt (a conversation) is generated for and scored like a plain one."""
    import shutil

    from lit_rlhf.artifacts import REWARD_MODEL_INFO

    root, base, reward, full, lora_run = fake_runs
    exported = shutil.copytree(reward, tmp_path / "rm")
    (exported / REWARD_MODEL_INFO).write_text(
        json.dumps(
            {
                "scoring": {"max_length": 96, "min_prompt_tokens": 24},
                "trained_on": {"message_tree_ids": ["3", "7"], "post_ids": ["11"]},
            }
        )
    )
    prompts = [
        {"prompt": f"Question number {i}: what is {i} plus {i}?", "message_id": str(i), "message_tree_id": str(i)}
        for i in range(12)
    ]
    prompts[5]["prompt"] = [
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And times 3?"},
    ]
    prompt_file = tmp_path / "eval_prompts.jsonl"
    prompt_file.write_text("\n".join(json.dumps(p) for p in prompts))
    calls, endings = [], []
    from lit_rlhf.eval import rlhf

    real_score = rlhf.score_responses

    def recording_score(model, tokenizer, prompts, responses, max_length, batch_size, min_prompt_tokens, *, ended):
        calls.append((prompts, max_length, min_prompt_tokens))
        endings.append(ended)
        return real_score(model, tokenizer, prompts, responses, max_length, batch_size, min_prompt_tokens, ended=ended)

    monkeypatch.setattr(rlhf, "score_responses", recording_score)
    args = [
        "--config",
        str(REPO / "configs/rlhf/evaluate.yaml"),
        "--reward_model",
        str(exported),
        "--base_model",
        str(base),
        "--policies",
        json.dumps({"PPO (full)": str(full)}),
        "--eval_prompts",
        str(prompt_file),
        "--min_prompts",
        "12",
        "--max_new_tokens",
        "4",
        "--bootstrap_resamples",
        "200",
        "--human_eval_prompts",
        "1",
    ]
    evaluate.main([*args, "--out_dir", str(tmp_path / "as_trained")])
    assert [c[1:] for c in calls] == [(96, 24)]  # one pass over the base model's and the policy's responses
    assert (
        len(calls[0][0]) == 2 * 12 and calls[0][0][5] == calls[0][0][12 + 5] == prompts[5]["prompt"]
    )  # as the conversation it is
    report = (tmp_path / "as_trained" / "report.md").read_text()
    assert "reading at most 96 tokens with at least 24 for the prompt (as it was trained)" in report
    assert "Warning: 3 evaluation prompts share a message tree with the training reward model's training" in report
    summary = json.loads((tmp_path / "as_trained" / "summary.json").read_text())
    assert summary["prompts_seen_by_training_reward_model"] == 3 and summary["training_reward_max_length"] == 96
    rewards = pd.read_csv(tmp_path / "as_trained" / "rewards.csv")
    assert rewards.prompt[5] == "user: What is 2 plus 2?\nassistant: 4.\nuser: And times 3?"
    # answers cut at max_new_tokens are scored as open turns, the others as closed ones
    assert endings[-1] == (~rewards.truncated).tolist() and not all(endings[-1])
    assert "warning" not in capsys.readouterr().out

    calls.clear()
    (exported / REWARD_MODEL_INFO).write_text(
        json.dumps({"scoring": {"max_length": 96, "min_prompt_tokens": 24}, "trained_on": {"message_tree_ids": ["99"]}})
    )
    evaluate.main([*args, "--out_dir", str(tmp_path / "override"), "--reward_max_length", "128"])
    assert [c[1:] for c in calls] == [(128, 24)]
    assert "warning: scoring with reward_max_length 128, but the reward model was trained with max length 96" in (
        capsys.readouterr().out
    )
    report = (tmp_path / "override" / "report.md").read_text()
    assert "reward_max_length overrides the max length 96 it was trained with" in report
    assert (
        "0 evaluation prompts share a message tree with the training reward model's training/validation data" in report
    )


@pytest.mark.parametrize(
    ("training", "judge", "length_controlled", "verdict"),
    [
        ((0.05, -0.05, 0.15), (0.02, -0.1, 0.1), (0.04, -0.06, 0.14), "no significant gain under the training"),
        ((0.3, 0.1, 0.5), (0.02, -0.1, 0.14), (0.28, 0.1, 0.45), "possible reward hacking: .* judge reward model"),
        ((0.3, 0.1, 0.5), (0.25, 0.05, 0.45), (0.05, -0.1, 0.2), "possible reward hacking: .* length explains most"),
        ((0.3, 0.1, 0.5), None, (0.05, -0.1, 0.2), "possible reward hacking: .* length explains most"),
        (
            (0.3, 0.1, 0.5),
            (0.25, 0.05, 0.45),
            (0.27, 0.08, 0.46),
            "significant gain under the training .* and under the judge",
        ),
    ],
)
def test_reward_hacking_reading_follows_the_numbers(training, judge, length_controlled, verdict):
    import re

    from lit_rlhf.eval.rlhf import reward_hacking_reading
    from lit_rlhf.eval.stats import Interval

    reading = reward_hacking_reading(
        "GRPO", Interval(*training), Interval(*judge) if judge else None, Interval(*length_controlled)
    )
    assert re.search(verdict, reading), reading
    assert ("possible reward hacking" in reading) == ("hacking" in verdict)


def test_the_policies_system_instruction_is_given_to_every_model(fake_runs, tmp_path, monkeypatch, capsys):
    """A policy exported with a system instruction: the base model and the policy both answer under it
    (generation and the KL pass), the report and summary say so; policies trained under different
    instructions are refused before anything is written."""
    import shutil

    from lit_rlhf.artifacts import REWARD_MODEL_INFO
    from lit_rlhf.eval import rlhf

    root, base, reward, full, lora_run = fake_runs
    brief = tmp_path / "brief"
    shutil.copytree(full / "policy", brief / "policy")
    (brief / "policy" / REWARD_MODEL_INFO).write_text(json.dumps({"system_prompt": "Answer in one sentence."}))
    seen = []

    def generation_spy(*args, **kwargs):
        seen.append(("generate", kwargs["system_prompt"]))
        return generate_responses(*args, **kwargs)

    def kl_spy(*args, **kwargs):
        seen.append(("kl", args[7]))
        return response_logprobs(*args, **kwargs)

    monkeypatch.setattr(rlhf, "generate_responses", generation_spy)
    monkeypatch.setattr(rlhf, "response_logprobs", kl_spy)
    args = [
        "--config",
        str(REPO / "configs/rlhf/evaluate.yaml"),
        "--reward_model",
        str(reward),
        "--base_model",
        str(base),
        "--eval_prompts",
        str(full / "eval_prompts.jsonl"),
        "--max_new_tokens",
        "4",
        "--batch_size",
        "25",
        "--bootstrap_resamples",
        "100",
        "--human_eval_prompts",
        "1",
    ]
    out = tmp_path / "evaluation"
    evaluate.main([*args, "--policies", json.dumps({"Brief": str(brief)}), "--out_dir", str(out)])
    assert seen == [("generate", "Answer in one sentence.")] * 2 + [("kl", "Answer in one sentence.")]
    assert json.loads((out / "summary.json").read_text())["system_prompt"] == "Answer in one sentence."
    assert "under the policies' system instruction 'Answer in one sentence.'" in (out / "report.md").read_text()
    mixed = tmp_path / "mixed"
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(
            [*args, "--policies", json.dumps({"Brief": str(brief), "PPO (full)": str(full)}), "--out_dir", str(mixed)]
        )
    assert exit_info.value.code == 2 and "different system instructions" in capsys.readouterr().err
    assert not mixed.exists()


def test_length_controlled_gain_removes_a_gain_that_is_only_length():
    """A policy whose extra reward is exactly what its extra length buys gains nothing once length is controlled."""
    from lit_rlhf.eval.rlhf import length_residuals

    rng = np.random.default_rng(0)
    base_len, policy_len = rng.integers(10, 50, 200), rng.integers(40, 90, 200)
    lengths = pd.Series(np.concatenate([base_len, policy_len]))
    rewards = 0.02 * lengths + pd.Series(rng.normal(0, 0.01, 400))
    residuals = length_residuals(rewards, lengths, np.arange(400) < 200)
    raw_gain = rewards[200:].mean() - rewards[:200].mean()
    assert raw_gain > 0.5 and abs(residuals[200:].mean() - residuals[:200].mean()) < 0.01


def test_length_controlled_gain_is_fit_on_the_base_model_alone(tmp_path):
    """Rewards concave in length (not a line): a policy's length-controlled gain is its gain less the
    base model's slope x its length change, and evaluating a second, much longer policy beside it
    leaves that figure unchanged (a fit pooled over every model's answers moved with it)."""
    from lit_rlhf.eval.rlhf import BASE, EvalSettings, Judge, summarise

    rng = np.random.default_rng(1)
    prompts = 40
    lengths = {
        BASE: rng.integers(5, 40, prompts),
        "A": rng.integers(20, 60, prompts),
        "B": rng.integers(80, 128, prompts),
    }

    def records(models):
        return pd.DataFrame(
            [
                {
                    "model": m,
                    "prompt_id": i,
                    "sample": 0,
                    "length": int(n),
                    "truncated": False,
                    "repetition": 0.0,
                    "kl_sum": 0.0,
                    "training_reward": float(np.sqrt(n) + 0.1 * np.sin(i)),
                }
                for m in models
                for i, n in enumerate(lengths[m])
            ]
        )

    settings = EvalSettings(policies={"A": str(tmp_path), "B": str(tmp_path)}, bootstrap_resamples=200, seed=0)
    judges = [Judge("training", "rm", {}, None)]
    alone = summarise(records([BASE, "A"]), settings, judges)["A"]
    beside = summarise(records([BASE, "A", "B"]), settings, judges)["A"]
    assert alone["length_controlled_gain"] == beside["length_controlled_gain"]
    base = records([BASE])
    slope = np.polyfit(base.length, base.training_reward, 1)[0]
    length_change = (lengths["A"] - lengths[BASE]).mean()
    expected = alone["reward_gain"]["mean"] - slope * length_change
    assert alone["length_controlled_gain"]["mean"] == pytest.approx(expected, abs=1e-9)
    assert abs(alone["length_controlled_gain"]["mean"]) > 0.05  # a concave curve: not all of the gain is length


def test_evaluation_measures_kl_to_the_base_model_for_any_policies(fake_runs, tmp_path, monkeypatch):
    """Any number of policies, each with its KL to the base on its own samples: 0 for the base itself;
    with two answers per prompt, two different samples of each prompt are scored; generation takes
    its own batch size, the forward passes keep `batch_size`."""
    from lit_rlhf.eval import rlhf

    root, base, reward, full, lora_run = fake_runs
    out = tmp_path / "evaluation"
    generation_batches, kl_batches = [], []

    def generation_spy(*args, **kwargs):
        generation_batches.append(args[6])
        return generate_responses(*args, **kwargs)

    def kl_spy(*args, **kwargs):
        kl_batches.append(args[6])
        return response_logprobs(*args, **kwargs)

    monkeypatch.setattr(rlhf, "generate_responses", generation_spy)
    monkeypatch.setattr(rlhf, "response_logprobs", kl_spy)
    evaluate.main(
        [
            "--config",
            str(REPO / "configs/rlhf/evaluate.yaml"),
            "--reward_model",
            str(reward),
            "--judge_reward_model",
            str(reward),
            "--base_model",
            str(base),
            "--policies",
            json.dumps({"Same as base": str(base), "PPO (full)": str(full)}),
            "--eval_prompts",
            str(full / "eval_prompts.jsonl"),
            "--out_dir",
            str(out),
            "--max_new_tokens",
            "5",
            "--batch_size",
            "25",
            "--bootstrap_resamples",
            "200",
            "--human_eval_prompts",
            "1",
            "--samples_per_prompt",
            "2",
            "--generation_batch_size",
            "100",
        ]
    )
    assert generation_batches == [100, 100, 100] and kl_batches == [25, 25]  # the base needs no KL pass
    summary = json.loads((out / "summary.json").read_text())
    assert summary["Same as base"]["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert summary["PPO (full)"]["kl_to_base"] > 0.01
    rewards = pd.read_csv(out / "rewards.csv", keep_default_na=False)
    assert len(rewards) == 3 * 50 * 2
    assert all(sorted(group) == [0, 1] for _, group in rewards.groupby(["model", "prompt_id"])["sample"])
    answers = rewards[rewards.model == "PPO (full)"].pivot(index="prompt_id", columns="sample", values="response")
    assert (answers[0] != answers[1]).mean() > 0.5  # each answer its own sample, not a copy
    # the same reward model as judge: the judge's gains are the training gains
    assert summary["PPO (full)"]["judge_reward_gain"] == summary["PPO (full)"]["reward_gain"]
    report = (out / "report.md").read_text()
    assert summary["num_prompts"] == 50 and "2 sampled answers per prompt" in report
    assert "Judge-RM gain" in report and "Same as base: per-token KL to the base model" in report


def test_gains_compare_per_prompt_means_when_a_prompt_has_several_answers(tmp_path):
    """Two answers per prompt: the interval resamples the 4 prompts' mean gains, not 8 answers as if
    they were independent prompts (hand-computed per-prompt means)."""
    from lit_rlhf.eval.rlhf import BASE, EvalSettings, Judge, summarise
    from lit_rlhf.eval.stats import paired_gain_ci, win_rate

    base = [0.0, 0.2, 1.0, 0.6, -0.4, 0.0, 0.3, 0.1]  # prompt 0: answers 0.0 and 0.2, prompt 1: 1.0 and 0.6, ...
    policy = [0.5, 0.1, 1.2, 1.2, -0.6, 0.4, 0.1, 0.3]
    records = pd.DataFrame(
        {
            "model": [BASE] * 8 + ["P"] * 8,
            "prompt_id": [0, 0, 1, 1, 2, 2, 3, 3] * 2,
            "sample": [0, 1] * 8,
            "training_reward": base + policy,
            "length": [10] * 16,
            "truncated": False,
            "repetition": 0.0,
            "kl_sum": 0.0,
        }
    )
    settings = EvalSettings(policies={"P": str(tmp_path)}, bootstrap_resamples=2000, seed=3)
    summary = summarise(records, settings, [Judge("training", "rm", {}, None)])["P"]
    gain = summary["reward_gain"]
    base_means, policy_means = [0.1, 0.8, -0.2, 0.2], [0.3, 1.2, -0.1, 0.2]
    expected = paired_gain_ci(policy_means, base_means, n_resamples=2000, seed=3)
    assert gain == pytest.approx({"mean": expected.mean, "low": expected.low, "high": expected.high})
    assert gain["mean"] == pytest.approx(0.175)
    assert summary["win_rate"] == win_rate(policy_means, base_means) == 0.875


def test_the_cost_column_says_per_step_for_dpo():
    """Online methods log seconds per iteration, DPO per optimizer step: the report says which."""
    assert seconds_text({"seconds_per_iteration": 19.04, "peak_rss_gb": 6.8}) == "19.0"
    assert seconds_text({"seconds_per_step": 3.21}) == "3.2 per step"
    assert seconds_text({}) == "—"


def test_generation_returns_the_log_probs_a_forward_pass_gives(tiny_llama_dir):
    """The evaluation's KL takes the policy's log-probs from its own sampling (one forward pass fewer
    per policy): they equal a separate pass over the sampled tokens, for left-padded prompts of
    different lengths, and sampling is unchanged by asking for them."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir, padding_side="left")
    prompts = ["Hi.", "Name a colour you like.", [{"role": "user", "content": "A long question " * 12}]]
    texts, ids, logprobs = generate_responses(
        model, tokenizer, prompts, 12, 0.7, seed=0, batch_size=2, return_logprobs=True
    )
    assert generate_responses(model, tokenizer, prompts, 12, 0.7, seed=0, batch_size=2) == (texts, ids)
    recomputed = response_logprobs(model, tokenizer, prompts, ids, 0.7, batch_size=2)
    for own, again, tokens in zip(logprobs, recomputed, ids):
        assert own.shape == (len(tokens),)
        torch.testing.assert_close(own, again, atol=1e-5, rtol=0)
    assert (torch.cat(logprobs) < 0).all()


def test_a_cut_answer_reaches_the_scorer_as_an_open_turn(smol_tokenizer_dir):
    """The same text, once cut at max_new_tokens and once ended: the scorer must see two sequences,
    the ended one closed by the end-of-turn tokens, the cut one without them."""
    tokenizer = load_tokenizer(str(smol_tokenizer_dir), padding_side="right")
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            seen.extend(ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask))
            return type("Output", (), {"logits": torch.zeros(len(input_ids), 1)})()

    text = "The answer starts like this and then"
    score_responses(
        Recorder(), tokenizer, ["Q?", "Q?"], [text, text], 96, batch_size=1, min_prompt_tokens=24, ended=[False, True]
    )
    cut, ended = sorted(seen, key=len)
    assert cut != ended and ended[: len(cut)] == cut
    assert tokenizer.decode(cut).endswith("<|im_start|>assistant\n" + text)
    assert tokenizer.decode(ended[len(cut) :]) == "<|im_end|>\n"


def test_scores_come_back_in_order_whatever_the_batching(tmp_path, smol_tokenizer_dir):
    """Scoring batches rows of similar length together (less padding) and puts each score back at its row."""
    assert batches_by_length([3, 9, 1, 7, 5], 2) == [[2, 0], [4, 3], [1]]
    folder = make_parity_reward_model(tmp_path / "rm", smol_tokenizer_dir)
    tokenizer = load_tokenizer(str(folder), padding_side="right")
    model = load_sequence_scorer(str(folder), tokenizer.pad_token_id, trained_head=True).eval()
    prompts = [
        "Hi.",
        "Tell me a long story about " + "a dog and a cat " * 6,
        [{"role": "user", "content": "2+2?"}],
        "What is the capital of France?",
        "Why?",
    ]
    responses = ["Hello there, friend.", "Once.", "4", "Paris is the capital of France " * 3, "Because."]
    ended = [True, False, True, False, True]
    batched = score_responses(model, tokenizer, prompts, responses, 96, batch_size=2, min_prompt_tokens=24, ended=ended)
    alone = torch.cat(
        [
            score_responses(model, tokenizer, [p], [r], 96, batch_size=1, min_prompt_tokens=24, ended=[e])
            for p, r, e in zip(prompts, responses, ended)
        ]
    )
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    assert batched.unique().numel() > 1  # the rows really differ: an order mix-up would show
