"""Evaluation: bootstrap intervals, KL reading, the rating command, and a report from fake runs."""

import io
import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from nbclient import NotebookClient
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import make_tiny_llama_dir
from lit_rlhf import evaluate
from lit_rlhf.errors import UserInputError
from lit_rlhf.eval import human_ratings
from lit_rlhf.eval.kl_monitor import interpret_kl
from lit_rlhf.eval.stats import bootstrap_mean_ci, paired_gain_ci, repetition_rate, win_rate
from ppo_fixtures import make_parity_reward_model

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
    [([0.05, 0.2, 0.3, 0.4], "above the band"), ([0.001, 0.002, 0.003], "below the band"), ([0.01, 0.04, 0.05, 0.06], "inside the band")],
)
def test_kl_interpretation_follows_the_numbers(series, verdict):
    text = interpret_kl(series, 0.02, 0.1, "PPO")
    assert verdict in text
    assert f"{series[0]:.4f}" in text


def write_generations(folder: Path) -> dict:
    generations = {m: [{"prompt": f"p{i}", "response": f"{m} answer {i}"} for i in range(1, 4)] for m in ("A", "B")}
    (folder / human_ratings.GENERATIONS_FILE).write_text(json.dumps(generations))
    return generations


def test_rating_command_validates_and_resumes_from_a_pipe(tmp_path):
    write_generations(tmp_path)
    out = io.StringIO()
    # invalid answers are asked again; 'q' stops after 3 valid ratings
    missing = human_ratings.rate(tmp_path, stdin=io.StringIO("0\nfive\n4\n5\n3\nq\n"), stdout=out)
    assert missing == 30 - 3
    assert out.getvalue().count("whole number from 1 to 5") == 2
    ratings = human_ratings.load_ratings(tmp_path)
    assert ratings == {("A", 1, "Coherence"): 4, ("A", 1, "Relevance"): 5, ("A", 1, "Helpfulness"): 3}
    # resume: the next answers fill the remaining 27 ratings in order, then end of input
    assert human_ratings.rate(tmp_path, stdin=io.StringIO("2\n" * 27), stdout=io.StringIO()) == 0
    ratings = human_ratings.load_ratings(tmp_path)
    assert len(ratings) == 30 and ratings[("A", 1, "Coherence")] == 4 and ratings[("B", 3, "Completeness")] == 2
    summary = human_ratings.summarize(tmp_path).read_text()
    assert "| A | 2.67 | 3.00 | 2.33 | 2.00 | 2.00 |" in summary  # A: (4+2+2)/3, (5+2+2)/3, (3+2+2)/3
    assert summary.count("Prompt 3") == 2


def test_rating_command_runs_as_a_program_fed_by_a_pipe(tmp_path):
    import subprocess
    import sys

    write_generations(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "lit_rlhf.eval.human_ratings", "rate", "--eval_dir", str(tmp_path)],
        input="5\n" * 30, capture_output=True, text=True, check=True,
    )
    assert "All ratings saved." in result.stdout
    assert len(human_ratings.load_ratings(tmp_path)) == 30


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory, smol_tokenizer_dir):
    """A base model, a 'PPO-full' export, a LoRA adapter, a reward model and PPO metrics."""
    root = tmp_path_factory.mktemp("fake_runs")
    base = make_tiny_llama_dir(root / "base", smol_tokenizer_dir, seed=0)
    reward = make_parity_reward_model(root / "rm", smol_tokenizer_dir)
    full = root / "ppo_full"
    make_tiny_llama_dir(full / "policy", smol_tokenizer_dir, seed=1)
    lora_run = root / "ppo_lora"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(lora_run / "policy_adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(lora_run / "policy_adapter")
    prompts = [{"prompt": f"Question number {i}: what is {i} plus {i}?", "message_id": str(i), "message_tree_id": str(i)} for i in range(50)]
    (full / "eval_prompts.jsonl").write_text("\n".join(json.dumps(p) for p in prompts))
    for run, kl in ((full, [0.01, 0.03, 0.05, 0.06]), (lora_run, [0.0, 0.005, 0.01, 0.008])):
        (run / "csv" / "version_0").mkdir(parents=True)
        pd.DataFrame({"step": range(4), "objective/kl_per_token": kl, "kl_coef": [0.05, 0.049, 0.05, 0.051],
                      "objective/scores": [0.1, 0.2, 0.3, 0.4]}).to_csv(run / "csv/version_0/metrics.csv", index=False)
    return root, base, reward, full, lora_run


def test_report_from_fake_runs_and_notebook(fake_runs, tmp_path):
    root, base, reward, full, lora_run = fake_runs
    out = tmp_path / "evaluation"
    evaluate.main(["--config", str(REPO / "configs/evaluate.yaml"), "--reward_model", str(reward),
                   "--base_model", str(base), "--ppo_full", str(full), "--ppo_lora", str(lora_run),
                   "--out_dir", str(out), "--max_new_tokens", "6", "--batch_size", "25",
                   "--bootstrap_resamples", "500", "--wandb_mode", "offline"])
    rewards = pd.read_csv(out / "rewards.csv")
    assert len(rewards) == 150 and set(rewards.model) == {"Pretrained", "PPO (full)", "PPO (LoRA)"}
    summary = json.loads((out / "summary.json").read_text())
    gain = summary["PPO (full)"]["reward_gain"]
    expected = rewards[rewards.model == "PPO (full)"].reward.mean() - rewards[rewards.model == "Pretrained"].reward.mean()
    assert gain["mean"] == pytest.approx(expected, abs=1e-6) and gain["low"] <= gain["mean"] <= gain["high"]
    report = (out / "report.md").read_text()
    assert "Gain vs pretrained" in report and "kl.png" in report and (out / "kl.png").stat().st_size > 1000
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
        evaluate.main(["--config", str(REPO / "configs/evaluate.yaml"), "--reward_model", str(reward),
                       "--base_model", str(base), "--ppo_full", str(full), "--ppo_lora", "null",
                       "--out_dir", str(tmp_path / "e"), "--num_prompts", "10"])
    assert not (tmp_path / "e").exists()
