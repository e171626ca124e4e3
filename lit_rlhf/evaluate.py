r"""Evaluate the base model and any number of trained policies and write the RLHF report.

    python -m lit_rlhf.evaluate --config configs/rlhf/evaluate.yaml [--out_dir ...]
    python -m lit_rlhf.evaluate --config configs/rlhf/evaluate.yaml \
        --policies '{"PPO (full)": "runs/ppo_full", "GRPO": "runs/grpo", "DPO": "runs/dpo"}' \
        --judge_reward_model runs/judge_reward_model/reward_model

Generates responses to the unseen prompts held out by the first policy run (or `--eval_prompts`),
with the same seed and decoding for every model, scores them with the training and judge reward
models, and writes under `out_dir`: `rewards.csv` (one row per answer: model, prompt, sample), `summary.json`,
`kl.png`, the human-evaluation tables and `report.md`; the same results go to an offline W&B run in
`out_dir/wandb`. `out_dir` is created only once every reward is in and finite.
"""

import sys
from pathlib import Path

from jsonargparse import ActionConfigFile

from lit_rlhf.cli import KeepLinesFormatter, LitRLHFParser, resolve_config_args
from lit_rlhf.errors import UserInputError, as_paragraph
from lit_rlhf.eval.rlhf import EvalSettings, evaluate
from lit_rlhf.eval.rlhf_report import log_to_wandb, write_outputs
from lit_rlhf.tracking import wandb_mode


def main(argv: list[str] | None = None) -> Path:
    parser = LitRLHFParser(
        prog="python -m lit_rlhf.evaluate",
        description=__doc__,  # bad options: one paragraph
        formatter_class=KeepLinesFormatter,
    )
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(EvalSettings, nested_key=None)
    cfg = parser.parse_args(resolve_config_args(sys.argv[1:] if argv is None else argv))  # configs/ from any folder
    settings = EvalSettings(**{k: v for k, v in vars(cfg).items() if k in EvalSettings.__dataclass_fields__})
    try:
        settings.wandb_mode = settings.wandb_mode or wandb_mode()  # checked before the long evaluation
        result = evaluate(settings)
        out = Path(settings.out_dir)
        report = write_outputs(result, out)
        log_to_wandb(result, out, report)
    except UserInputError as error:
        print(as_paragraph(error), file=sys.stderr)
        sys.exit(2)
    print(f"[lit_rlhf] report: {report}")
    return report


if __name__ == "__main__":
    main()
