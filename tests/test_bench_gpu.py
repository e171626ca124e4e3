"""bench/bench_gpu.py stays runnable where CI has no GPU: its dry run (the GPU script's code path on
CPU at tiny sizes) writes every stage with finite figures, a failing stage does not stop the next,
and the steps and time bounds stop a stage."""

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(markdown: str) -> dict[str, str]:
    return {line.split("|")[1].strip(): line for line in markdown.splitlines() if line.startswith("| ")}


def test_dry_run_writes_every_stage_with_finite_figures(bench, tmp_path, smol_tokenizer_dir):
    bench.main(["--dry-run", "--out", str(tmp_path), "--tokenizer", str(smol_tokenizer_dir)])

    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert list(result["stages"]) == list(bench.STAGES)
    for stage, entry in result["stages"].items():
        assert entry["status"] == "ok", (stage, entry.get("traceback"))
        assert entry["metrics"], stage
        for key, value in entry["metrics"].items():
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (stage, key, value)
    stages = result["stages"]
    for ppo in ("ppo_full", "ppo_lora"):
        metrics = stages[ppo]["metrics"]
        assert metrics["rollout_s_per_iteration"] + metrics["update_s_per_iteration"] == pytest.approx(
            metrics["s_per_iteration"]
        )
        assert metrics["response_tokens_per_iteration"] <= 4 * 8  # dry run: 4 prompts x at most 8 new tokens
    assert stages["ppo_lora"]["settings"]["lora"].startswith("q_proj, v_proj")
    assert stages["reward_model"]["settings"]["trained"] == "all weights"  # the config's full fine-tune
    assert "random weights" in result["meta"]["weights"] and "oasst1" in result["meta"]["sample"]

    rows = table_rows((tmp_path / "bench_gpu.md").read_text())
    for stage in bench.STAGES:
        assert rows[stage].endswith("| ok |"), rows[stage]
    assert "pairs/s" in rows["reward_model"] and "s/iteration (rollout" in rows["ppo_full"]
    assert "tokens/s" in rows["tinygpt"] and "images/s" in rows["dcgan"]


def test_a_failing_stage_is_recorded_and_the_next_one_runs(bench, tmp_path, monkeypatch):
    def broken(self, s, deadline):
        raise RuntimeError("stage broke")

    monkeypatch.setattr(bench.Bench, "tinygpt", broken)
    bench.main(["--dry-run", "--out", str(tmp_path), "--stages", "tinygpt", "dcgan"])

    stages = json.loads((tmp_path / "bench_gpu.json").read_text())["stages"]
    assert stages["tinygpt"]["status"] == "error"
    assert stages["tinygpt"]["error"] == "RuntimeError: stage broke"
    assert stages["dcgan"]["status"] == "ok" and stages["dcgan"]["metrics"]["images_per_s"] > 0
    rows = table_rows((tmp_path / "bench_gpu.md").read_text())
    assert "error: RuntimeError: stage broke" in rows["tinygpt"] and rows["dcgan"].endswith("| ok |")


def test_stages_past_the_time_limit_are_skipped(bench, tmp_path):
    bench.main(["--dry-run", "--out", str(tmp_path), "--stages", "dcgan", "--time-limit", "0"])

    stages = json.loads((tmp_path / "bench_gpu.json").read_text())["stages"]
    assert stages["dcgan"]["status"] == "skipped"


@pytest.mark.parametrize("batches, deadline_passed, stops_after", [(3, False, 3), (100, True, 1)])
def test_meter_stops_after_its_batches_or_at_its_deadline(bench, batches, deadline_passed, stops_after):
    deadline = float("-inf") if deadline_passed else float("inf")
    meter = bench.Meter(batches, deadline, lambda trainer, batch: {"items": 2})
    trainer = SimpleNamespace(should_stop=False)
    calls = 0
    while not trainer.should_stop:
        meter.on_train_batch_start(trainer, None, None, calls)
        meter.on_train_batch_end(trainer, None, None, None, calls)
        calls += 1
    assert calls == stops_after
    assert len(meter.timed(warmup=1)[0]) == max(stops_after - 1, 1)  # warm-up left out unless it is all there is


def test_standin_tokenizer_has_smollm2s_special_tokens_and_chat_template(bench, tmp_path, smol_tokenizer_dir):
    from transformers import AutoTokenizer

    texts = [row["text"] for row in bench.oasst1_sample()[1]]
    standin = AutoTokenizer.from_pretrained(bench.standin_tokenizer(tmp_path, texts))
    smollm2 = AutoTokenizer.from_pretrained(smol_tokenizer_dir)

    assert len(standin) <= bench.SMOLLM2_135M["vocab_size"]
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert standin.convert_tokens_to_ids(token) == smollm2.convert_tokens_to_ids(token)
    assert (standin.eos_token, standin.pad_token) == (smollm2.eos_token, "<|im_end|>")
    chat = [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[1]}]
    assert standin.apply_chat_template(chat, tokenize=False) == smollm2.apply_chat_template(chat, tokenize=False)
    assert standin.decode(standin(texts[2])["input_ids"]) == texts[2]
