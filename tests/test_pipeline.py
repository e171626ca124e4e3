"""The pipeline: the split by message tree, stage wiring, skipping and re-running, and its bad input."""

import json
from pathlib import Path

import pytest

from lit_rlhf import pipeline
from lit_rlhf.data.oasst1 import read_oasst1_rows
from lit_rlhf.data.rlhf_splits import message_trees, write_rlhf_splits


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    write_rlhf_splits(read_oasst1_rows(str(pipeline.SAMPLE)), out, seed=0)
    return out


def test_the_packaged_sample_is_cut_into_disjoint_trees(splits):
    """Training RM, judge RM and the held-out prompts never share a message tree; policies train on
    prompts of the first two groups only, and the held-out trees are both reward models' test split."""
    train = message_trees(splits / "reward_model/train.jsonl") | message_trees(splits / "reward_model/validation.jsonl")
    judge = message_trees(splits / "judge/train.jsonl") | message_trees(splits / "judge/validation.jsonl")
    held_out = message_trees(splits / "eval_prompts.jsonl")
    assert train and judge and len(held_out) >= 50  # the evaluation asks for at least 50 prompts
    assert not train & judge and not train & held_out and not judge & held_out
    assert message_trees(splits / "reward_model/test.jsonl") <= held_out
    assert not message_trees(splits / "prompt_rows.jsonl") & held_out
    prompts = [json.loads(line) for line in (splits / "eval_prompts.jsonl").read_text().splitlines()]
    rows = {row["message_id"]: row for row in read_oasst1_rows(str(pipeline.SAMPLE))}
    assert all(rows[p["message_id"]]["parent_id"] is None and p["prompt"] for p in prompts)  # root prompts


def args(tmp_path: Path, *extra: str):
    parser_args = ["--root", str(tmp_path), "--setting", "quickstart", *extra]
    namespace = pipeline.argparse.Namespace(
        root=tmp_path,
        setting="quickstart",
        model=None,
        prompt_data=None,
        preference_data=None,
        eval_prompts=None,
        seed=0,
        stages=list(pipeline.DEFAULT_STAGES),
    )
    return parser_args, namespace


def test_stages_feed_each_other_by_path_and_stack_the_setting_overrides(tmp_path):
    _, namespace = args(tmp_path)
    stages = {s.name: s for s in pipeline.plan(namespace)}
    reward_model = str(tmp_path / "reward_model" / "reward_model")
    assert reward_model in stages["ppo_full"].command and reward_model in stages["evaluation"].command
    assert str(tmp_path / "pairs" / "prompt_rows.jsonl") in stages["ppo_lora"].command
    assert str(tmp_path / "pairs" / "judge") in stages["judge_reward_model"].command
    command = stages["ppo_lora"].command
    configs = [
        Path(command[i + 1]).relative_to(pipeline.CONFIGS).as_posix()
        for i, arg in enumerate(command)
        if arg == "--config"
    ]
    assert configs == [
        "rlhf/ppo.yaml",
        "cpu/ppo.yaml",
        "quickstart/ppo.yaml",
        "lora/ppo.yaml",
        "cpu/ppo_lora.yaml",
        "quickstart/ppo_lora.yaml",
    ]
    policies = json.loads(stages["evaluation"].command[stages["evaluation"].command.index("--policies") + 1])
    assert policies == {"PPO (full)": str(tmp_path / "ppo_full"), "PPO (LoRA)": str(tmp_path / "ppo_lora")}


def test_evaluation_also_compares_the_policies_an_earlier_invocation_finished(tmp_path):
    """`--stages grpo,evaluation` after the default run: one report with PPO and GRPO (PPO LoRA unfinished)."""
    (tmp_path / "ppo_full" / "policy").mkdir(parents=True)
    (tmp_path / "ppo_full" / "policy" / "config.json").write_text("{}")
    (tmp_path / "ppo_lora" / "policy_adapter").mkdir(parents=True)  # interrupted: no adapter_config.json
    _, namespace = args(tmp_path)
    namespace.stages = ["grpo", "evaluation"]
    stages = {s.name: s for s in pipeline.plan(namespace)}
    policies = json.loads(stages["evaluation"].command[stages["evaluation"].command.index("--policies") + 1])
    assert policies == {"PPO (full)": str(tmp_path / "ppo_full"), "GRPO": str(tmp_path / "grpo")}


def test_a_stage_is_skipped_only_when_done_with_the_same_command(tmp_path, capsys):
    ran = []

    def fake_run(command):
        ran.append(command)
        stage.output.parent.mkdir(parents=True, exist_ok=True)
        stage.output.touch()

    stage = pipeline.Stage("reward_model", ["lit_rlhf", "fit", "--x", "1"], tmp_path / "rm", tmp_path / "rm" / "out")
    stage.run(fake_run)
    stage.run(fake_run)
    assert len(ran) == 1 and "done already" in capsys.readouterr().out
    stage.command = ["lit_rlhf", "fit", "--x", "2"]
    stage.run(fake_run)
    assert len(ran) == 2 and "running again (its settings changed)" in capsys.readouterr().out
    (tmp_path / "rm" / "out").unlink()
    stage.run(fake_run)
    assert len(ran) == 3 and "running again (it did not finish)" in capsys.readouterr().out


def test_unknown_stage_or_missing_inputs_name_what_to_run_first(tmp_path, capsys):
    for stages, expected in (
        ("ppo_full,sft", "Unknown stage(s) ['sft']"),
        ("ppo_lora", "needs the output of pairs, reward_model"),
        ("evaluation", "--stages pairs,reward_model,judge_reward_model,evaluation"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            pipeline.main(["--root", str(tmp_path), "--setting", "quickstart", "--stages", stages])
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pipeline.main(["--root", str(tmp_path), "--setting", "cpu"])
    assert "--setting cpu needs --prompt_data" in capsys.readouterr().err


def test_eval_prompts_that_share_a_tree_with_training_data_are_refused(tmp_path, splits, capsys):
    import shutil

    shutil.copytree(splits, tmp_path / "pairs")
    seen = json.loads((tmp_path / "pairs" / "prompt_rows.jsonl").read_text().splitlines()[0])
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "message_id": "x", "message_tree_id": seen["message_tree_id"]}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for file, expected in ((bad, "shares 1 message trees"), (empty, "is missing or empty")):
        _, namespace = args(tmp_path)
        namespace.eval_prompts = str(file)
        with pytest.raises(pipeline.UserInputError, match=expected):
            pipeline.check_eval_prompts(namespace)
    namespace.eval_prompts = str(splits / "eval_prompts.jsonl")
    pipeline.check_eval_prompts(namespace)  # the held-out prompts pass


@pytest.mark.parametrize("setting", ["quickstart", "cpu", "real"])
def test_every_stage_command_of_a_setting_parses(setting, tmp_path, capsys):
    """Each stage's config stack (stage config + the setting's overrides + the pipeline's flags) is
    valid for LightningCLI / the evaluation: a typo in an override file fails here, not mid-pipeline."""
    from lit_rlhf import evaluate
    from lit_rlhf.cli import main

    _, namespace = args(tmp_path)
    namespace.setting, namespace.prompt_data = setting, str(pipeline.SAMPLE)
    namespace.stages = list(pipeline.STAGES)
    for stage in pipeline.plan(namespace):
        if stage.name == "pairs":
            continue
        command = stage.command[1:] + ["--print_config"]
        with pytest.raises(SystemExit) as exit_info:
            main(command) if stage.command[0] == "lit_rlhf" else evaluate.main(command)
        assert exit_info.value.code in (0, None), (stage.name, capsys.readouterr().err[-2000:])
