"""bench/bench_critic_free.py's dry run (tiny random models, 2 steps) writes both sides of both
methods, lit_rlhf and TRL's GRPOTrainer / RLOOTrainer, with finite figures and equal settings."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_critic_free", REPO / "bench" / "bench_critic_free.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(result: dict) -> None:
    assert set(result["methods"]) == {"grpo", "rloo"}
    for method, entry in result["methods"].items():
        sides = [key for key in entry if key == "lit_rlhf" or key.startswith("trl_")]
        assert len(sides) == 2, (method, list(entry))
        for side in sides:
            figures = entry[side]
            assert "error" not in figures, (method, side, figures.get("error"))
            for key in (
                "s_per_step",
                "cpu_s_per_step",
                "wall_rollout_s_per_step",
                "cpu_rollout_s_per_step",
                "tokens_per_s",
                "tokens_per_cpu_s",
                "peak_rss_gb",
            ):
                assert math.isfinite(figures[key]) and figures[key] > 0, (method, side, key, figures[key])
            assert figures["timed_steps"] == 1  # 2 steps, the first one is the untimed warm-up
            assert len(figures["raw"]["steps"]) == 2
            # 2 prompts x 2 responses of at most 8 tokens
            assert 0 < figures["response_tokens_per_step"] <= 2 * 2 * 8
            for clock in ("wall", "cpu"):
                parts = figures[f"{clock}_rollout_parts_s_per_step"]
                assert set(parts) == {"generate", "logprob_forwards", "reward"}, (method, side, parts)
                assert sum(parts.values()) <= figures[f"{clock}_rollout_s_per_step"] + 1e-6
        for key in ("time_ratio", "cpu_time_ratio", "tokens_per_s_ratio", "memory_ratio"):
            assert math.isfinite(entry[key]) and entry[key] > 0, (method, key)
        trl = entry[sides[1]]["raw"]
        assert trl["prompt_ids_match_lit"]  # TRL templated the prompts to lit_rlhf's very ids (pad = EOS unharmed)
        assert trl["activation_checkpointing"] is False
        assert trl["generation_batch_size"] == 4 and trl["steps_per_generation"] == 2  # one rollout, 2 micro-batches
        assert entry["settings"]["beta"] == {"grpo": 0.04, "rloo": 0.05}[method]


def test_dry_run_in_process_has_both_sides_of_both_methods(bench, tmp_path, smol_tokenizer_dir):
    out = tmp_path / "bench.json"
    bench.main(["--dry-run", "--in-process", "--out", str(out)])
    result = json.loads(out.read_text())
    check(result)
    assert result["prompts"]["prompts"] == 4 and result["prompts"]["prompt_tokens_max"] <= 48


@pytest.mark.slow
def test_dry_run_with_a_process_per_side(bench, tmp_path, smol_tokenizer_dir):
    out = tmp_path / "bench.json"
    bench.main(["--dry-run", "--out", str(out)])
    result = json.loads(out.read_text())
    check(result)
    assert result["peak_rss"] == "per side (own process)"
