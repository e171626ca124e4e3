"""The RLHF pipeline in one command: pairs -> reward models -> policies -> evaluation.

    python -m lit_rlhf.pipeline --setting quickstart --root runs/quickstart   # `make quickstart`: the packaged sample
    python -m lit_rlhf.pipeline --setting cpu --root runs/cpu --prompt_data <oasst1 rows, file or folder>
    python -m lit_rlhf.pipeline --setting real --root runs/rlhf               # hub data, SmolLM2, GPU
    ... [--stages pairs,reward_model,ppo_lora,evaluation] [--eval_prompts FILE] [--model M]

The `pairs` stage cuts the oasst1 rows by message tree (`lit_rlhf.data.rlhf_splits`): pairs for the
training reward model, pairs of other trees for a judge reward model that only the evaluation
uses, prompts for the policies, and held-out root prompts for the evaluation. Each stage runs its
config (`configs/rlhf/<method>.yaml`, the setting's `configs/cpu/<method>.yaml`, ..., and for a
LoRA variant `configs/lora/<method>.yaml` and the setting's `configs/cpu/<method>_lora.yaml`) in a
fresh process, feeds the next by path, and records its command beside its output: a stage is
skipped only when its output is complete and was made by the same command; otherwise its folder
is cleared and it runs again, saying why.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lit_rlhf.artifacts import EVAL_PROMPTS, POLICY, POLICY_ADAPTER, REWARD_MODEL
from lit_rlhf.errors import UserInputError, as_paragraph

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SAMPLE = Path(__file__).parent / "samples" / "oasst1_en.jsonl.gz"
RECORD = "pipeline_stage.json"

# Per setting: the base model, default data, and the override folders stacked on each stage config.
SETTINGS = {
    "quickstart": {"model": "embedded:smollm2", "prompt_data": str(SAMPLE), "overrides": ["cpu", "quickstart"]},
    "cpu": {"model": "embedded:smollm2", "prompt_data": None, "overrides": ["cpu"]},
    "real": {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "prompt_data": "OpenAssistant/oasst1",
        "preference_data": "stanfordnlp/SHP",
        "overrides": [],
    },
}
# Policy stages: (method config, LoRA variant).
POLICIES = {
    "ppo_full": ("ppo", False),
    "ppo_lora": ("ppo", True),
    "grpo": ("grpo", False),
    "rloo": ("rloo", False),
    "dpo": ("dpo", False),
}
STAGES = ("pairs", "reward_model", "judge_reward_model", *POLICIES, "evaluation")
DEFAULT_STAGES = ("pairs", "reward_model", "judge_reward_model", "ppo_full", "ppo_lora", "evaluation")
NAMES = {"ppo_full": "PPO (full)", "ppo_lora": "PPO (LoRA)", "grpo": "GRPO", "rloo": "RLOO", "dpo": "DPO"}


@dataclass
class Stage:
    name: str
    command: list[str]  # after `python -m`
    folder: Path
    output: Path  # a file that exists only once the stage finished

    def record(self) -> dict:
        return {"command": self.command}

    def run(self, run_stage=None) -> None:
        """Skip when done with the same command, else clear the folder and run."""
        record = self.folder / RECORD
        if self.output.exists() and record.exists() and json.loads(record.read_text()) == self.record():
            print(f"[pipeline] {self.name}: done already ({self.output}), skipped")
            return
        if self.folder.exists():
            why = "its settings changed" if self.output.exists() else "it did not finish"
            print(f"[pipeline] {self.name}: running again ({why}); clearing {self.folder}")
            shutil.rmtree(self.folder)
        started = time.perf_counter()
        print(f"[pipeline] {self.name}: python -m {' '.join(self.command)}", flush=True)
        (run_stage or _run_module)(self.command)
        if not self.output.exists():
            raise UserInputError(f"Stage '{self.name}' finished without writing {self.output}; see its log above.")
        self.folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(self.record(), indent=2))
        print(f"[pipeline] {self.name}: finished in {time.perf_counter() - started:.0f} s -> {self.output}", flush=True)


def _run_module(command: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", *command])
    if result.returncode != 0:
        sys.exit(
            f"[pipeline] stage failed (exit {result.returncode}); fix it and run the same command again to resume."
        )


def stage_configs(method: str, overrides: list[str], lora: bool = False) -> list[str]:
    """`--config` for the method's config, each of the setting's overrides that exists and, for the
    LoRA variant, the LoRA override and the setting's `<method>_lora.yaml` after them."""
    files = [CONFIGS / "rlhf" / f"{method}.yaml"] + [CONFIGS / folder / f"{method}.yaml" for folder in overrides]
    if lora:
        files += [CONFIGS / "lora" / f"{method}.yaml"] + [
            CONFIGS / folder / f"{method}_lora.yaml" for folder in overrides
        ]
    return [arg for file in files if file.exists() for arg in ("--config", str(file))]


def plan(args: argparse.Namespace) -> list[Stage]:
    """Every stage of the experiment, wired by path; `main` runs the selected ones."""
    root, setting = args.root, SETTINGS[args.setting]
    model = args.model or setting["model"]
    prompt_data = args.prompt_data or setting["prompt_data"]
    pairs = root / "pairs"
    # oasst1 pairs for the training reward model unless other preference data (SHP) is given
    preference = args.preference_data or setting.get("preference_data") or str(pairs / "reward_model")
    eval_prompts = args.eval_prompts or str(pairs / EVAL_PROMPTS)
    reward_model = root / "reward_model" / REWARD_MODEL
    judge = root / "judge_reward_model" / REWARD_MODEL
    stages = [
        Stage(
            "pairs",
            ["lit_rlhf.data.rlhf_splits", str(prompt_data), str(pairs), "--seed", str(args.seed)],
            pairs,
            pairs / EVAL_PROMPTS,
        )
    ]
    for name, data in (("reward_model", preference), ("judge_reward_model", str(pairs / "judge"))):
        folder = root / name
        stages.append(
            Stage(
                name,
                [
                    "lit_rlhf",
                    "fit",
                    *stage_configs("reward_model", setting["overrides"]),
                    "--model.model_name_or_path",
                    model,
                    "--data.path",
                    data,
                    "--trainer.default_root_dir",
                    str(folder),
                ],
                folder,
                folder / REWARD_MODEL / "config.json",
            )
        )
    for name, (method, lora) in POLICIES.items():
        folder, export = root / name, POLICY_ADAPTER if lora else POLICY
        data = (
            ["--data.path", str(pairs / "reward_model")]
            if name == "dpo"
            else ["--data.path", str(pairs / "prompt_rows.jsonl"), "--model.reward_model_path", str(reward_model)]
        )
        stages.append(
            Stage(
                name,
                [
                    "lit_rlhf",
                    "fit",
                    *stage_configs(method, setting["overrides"], lora),
                    "--model.model_name_or_path",
                    model,
                    *data,
                    "--trainer.default_root_dir",
                    str(folder),
                ],
                folder,
                folder / export / ("adapter_config.json" if export == POLICY_ADAPTER else "config.json"),
            )
        )
    # every policy of this invocation and every one an earlier invocation finished under --root
    policies = {
        NAMES[s.name]: str(s.folder)
        for s in stages
        if s.name in POLICIES and (s.name in args.stages or s.output.exists())
    }
    note = f"pipeline setting '{args.setting}', prompts and pairs from {prompt_data}" + (
        f", training reward model on {preference}" if args.preference_data or setting.get("preference_data") else ""
    )
    stages.append(
        Stage(
            "evaluation",
            [
                "lit_rlhf.evaluate",
                *stage_configs("evaluate", setting["overrides"]),
                "--reward_model",
                str(reward_model),
                "--judge_reward_model",
                str(judge),
                "--base_model",
                model,
                "--policies",
                json.dumps(policies),
                "--eval_prompts",
                eval_prompts,
                "--reward_model_run",
                str(root / "reward_model"),
                "--out_dir",
                str(root / "evaluation"),
                "--data_note",
                note,
            ],
            root / "evaluation",
            root / "evaluation" / "report.md",
        )
    )
    return stages


# What each stage reads that an earlier stage writes.
NEEDS = {
    "reward_model": ["pairs"],
    "judge_reward_model": ["pairs"],
    "dpo": ["pairs"],
    **{name: ["pairs", "reward_model"] for name in POLICIES if name != "dpo"},
    "evaluation": ["pairs", "reward_model", "judge_reward_model"],
}


def check_inputs(stages: dict[str, Stage], selected: list[str], args: argparse.Namespace) -> None:
    """Refuse a stage whose inputs no selected stage makes and no earlier run left behind."""
    external_preferences = args.preference_data or SETTINGS[args.setting].get("preference_data")
    for stage in selected:
        needs = [] if stage == "reward_model" and external_preferences else NEEDS.get(stage, [])
        if stage == "evaluation":
            needs = needs + [s for s in selected if s in POLICIES]
        missing = [need for need in needs if need not in selected and not stages[need].output.exists()]
        if missing:
            raise UserInputError(
                f"Stage '{stage}' needs the output of {', '.join(missing)}, which is not under {args.root} "
                f"(looked for {', '.join(str(stages[m].output) for m in missing)}). Run those stages first, e.g. "
                f"--stages {','.join(missing + [stage])}."
            )


def check_eval_prompts(args: argparse.Namespace) -> None:
    """A given --eval_prompts file must hold prompts and share no message tree with what policies or
    reward models trained on (the pairs stage's outputs): that is what keeps "unseen" honest."""
    from lit_rlhf.data.rlhf_splits import PROMPT_ROWS, message_trees

    file = Path(args.eval_prompts)
    if not file.is_file() or not message_trees(file) and not file.read_text().strip():
        raise UserInputError(
            f"--eval_prompts '{file}' is missing or empty: give a JSONL of prompt, message_id, "
            "message_tree_id rows (or oasst1 message rows)."
        )
    pairs = args.root / "pairs"
    trained = set()
    for used in [
        pairs / PROMPT_ROWS,
        *sorted((pairs / "reward_model").glob("*.jsonl")),
        *sorted((pairs / "judge").glob("*.jsonl")),
    ]:
        if used.exists() and used.name != "test.jsonl":
            trained |= message_trees(used)
    shared = message_trees(file) & trained
    if shared:
        raise UserInputError(
            f"--eval_prompts '{file}' shares {len(shared)} message trees with the prompts or preference pairs the "
            f"policies and reward models train on (e.g. {sorted(shared)[0]}): those prompts are not unseen. Remove "
            "them, or let the pipeline use its own held-out prompts (omit --eval_prompts)."
        )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m lit_rlhf.pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path("runs/rlhf"), help="one folder per stage goes here")
    parser.add_argument(
        "--setting",
        choices=list(SETTINGS),
        default="real",
        help="quickstart: packaged sample, minutes; cpu: local data, small settings; real: hub data, GPU",
    )
    parser.add_argument("--model", help="base model of every stage (default: the setting's)")
    parser.add_argument("--prompt_data", help="oasst1 message rows (hub id, file or folder) cut into pairs and prompts")
    parser.add_argument("--preference_data", help="other preference data for the training reward model (e.g. SHP)")
    parser.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated subset of {','.join(STAGES)} (default: {','.join(DEFAULT_STAGES)})",
    )
    parser.add_argument("--eval_prompts", help="evaluate on this prompt JSONL instead of the held-out prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split by message tree")
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    try:
        unknown = [s for s in args.stages if s not in STAGES]
        if unknown:
            raise UserInputError(f"Unknown stage(s) {unknown} in --stages; the stages are {', '.join(STAGES)}.")
        if not (args.prompt_data or SETTINGS[args.setting]["prompt_data"]):
            raise UserInputError(
                f"--setting {args.setting} needs --prompt_data: oasst1 message rows (a .jsonl/.parquet "
                "file or folder, e.g. a local copy of OpenAssistant/oasst1)."
            )
        stages = {stage.name: stage for stage in plan(args)}
        check_inputs(stages, args.stages, args)
        started = time.perf_counter()
        for name in STAGES:
            if name in args.stages:
                if name == "evaluation" and args.eval_prompts:
                    check_eval_prompts(args)
                stages[name].run()
    except UserInputError as error:
        print(as_paragraph(error), file=sys.stderr)
        sys.exit(2)
    report = args.root / "evaluation" / "report.md"
    print(
        f"[pipeline] stages {','.join(args.stages)} done in {time.perf_counter() - started:.0f} s. "
        f"Report: {report.resolve()}"
    )
    return report


if __name__ == "__main__":
    main()
