"""The RLHF pipeline in one command: reward model -> PPO full -> PPO LoRA -> evaluation.

    python -m lit_rlhf.pipeline --root runs/rlhf                        # real data from the hub
    python -m lit_rlhf.pipeline --root runs/rlhf --preference_data <SHP folder/file or pairs> \
        --prompt_data <oasst1 rows> --model embedded:smollm2            # local data, offline model
    python -m lit_rlhf.pipeline --root runs/quickstart --setting quickstart   # `make quickstart`

Each stage runs the stage's own config in a fresh process, feeds the next by path, and is skipped
when its output already exists, so an interrupted pipeline resumes where it stopped.
"""

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SAMPLES = Path(__file__).parent / "samples"

# Small settings that show every stage working on 2 CPU cores in minutes (see README).
QUICK_REWARD = ["--model.trainable_top_blocks", "2", "--model.optimizer.init_args.lr", "1e-4",
                "--data.max_length", "192", "--data.min_score_ratio", "1.0", "--trainer.max_epochs", "1"]
QUICK_PPO = ["--data.num_train_prompts", "16", "--data.num_eval_prompts", "50", "--data.batch_size", "8",
             "--data.max_prompt_length", "128", "--model.forward_batch_size", "8", "--model.max_new_tokens", "32",
             "--model.ppo_epochs", "2", "--trainer.max_epochs", "1"]
QUICK_EVAL = ["--max_new_tokens", "48", "--batch_size", "25", "--bootstrap_resamples", "2000"]
QUICK_TINYGPT = ["--trainer.max_steps", "300", "--trainer.val_check_interval", "150", "--trainer.limit_val_batches", "20"]


@dataclass
class Stage:
    name: str
    command: list[str]
    output: Path
    extra: list[str] = field(default_factory=list)

    def run(self) -> None:
        if self.output.exists():
            print(f"[pipeline] {self.name}: done already ({self.output}), skipped")
            return
        started = time.perf_counter()
        print(f"[pipeline] {self.name}: {' '.join(self.command + self.extra)}", flush=True)
        result = subprocess.run(self.command + self.extra)
        if result.returncode != 0:
            sys.exit(f"[pipeline] stage '{self.name}' failed (exit {result.returncode}); fix it and run again to resume.")
        print(f"[pipeline] {self.name}: finished in {time.perf_counter() - started:.0f} s -> {self.output}", flush=True)


def stages(root: Path, model: str, preference_data: str, prompt_data: str, quick: bool) -> list[Stage]:
    fit = [sys.executable, "-m", "lit_rlhf", "fit", "--config"]
    reward_model = root / "reward_model" / "reward_model"
    ppo = ["--model.model_name_or_path", model, "--data.tokenizer_name_or_path", model,
           "--model.reward_model_path", str(reward_model), "--data.path", prompt_data]
    result = []
    if quick:
        result.append(Stage("tinygpt", fit + ["configs/pretrain_tinygpt.yaml", "--data.path", "builtin:pydoc-topics",
                                              "--trainer.default_root_dir", str(root / "pretrain_tinygpt")],
                            root / "pretrain_tinygpt" / "checkpoints" / "last.ckpt", QUICK_TINYGPT))
    result += [
        Stage("reward_model", fit + ["configs/reward_model.yaml", "--model.model_name_or_path", model,
                                     "--data.path", preference_data, "--trainer.default_root_dir", str(root / "reward_model")],
              reward_model / "config.json", QUICK_REWARD if quick else []),
        Stage("ppo_full", fit + ["configs/ppo_full.yaml", *ppo, "--trainer.default_root_dir", str(root / "ppo_full")],
              root / "ppo_full" / "policy" / "config.json", QUICK_PPO if quick else []),
        Stage("ppo_lora", fit + ["configs/ppo_lora.yaml", *ppo, "--trainer.default_root_dir", str(root / "ppo_lora")],
              root / "ppo_lora" / "policy_adapter" / "adapter_config.json", QUICK_PPO if quick else []),
        Stage("evaluation", [sys.executable, "-m", "lit_rlhf.evaluate", "--config", "configs/evaluate.yaml",
                             "--reward_model", str(reward_model), "--base_model", model,
                             "--ppo_full", str(root / "ppo_full"), "--ppo_lora", str(root / "ppo_lora"),
                             "--reward_model_run", str(root / "reward_model"), "--out_dir", str(root / "evaluation"),
                             *(["--tinygpt_pretrain", str(root / "pretrain_tinygpt")] if quick else [])],
              root / "evaluation" / "report.md", QUICK_EVAL if quick else []),
    ]
    return result


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("runs/rlhf"))
    parser.add_argument("--setting", choices=["real", "quickstart"], default="real")
    parser.add_argument("--model", help="policy/reward base model (default: hub SmolLM2; quickstart: embedded)")
    parser.add_argument("--preference_data", help="SHP hub id, SHP files or prompt/chosen/rejected pairs")
    parser.add_argument("--prompt_data", help="oasst1 hub id or local message rows")
    args = parser.parse_args(argv)
    quick = args.setting == "quickstart"
    model = args.model or ("embedded:smollm2" if quick else "HuggingFaceTB/SmolLM2-135M-Instruct")
    preference = args.preference_data or (str(SAMPLES / "shp_sample.jsonl") if quick else "stanfordnlp/SHP")
    prompts = args.prompt_data or (str(SAMPLES / "oasst1_sample.jsonl") if quick else "OpenAssistant/oasst1")
    started = time.perf_counter()
    for stage in stages(args.root, model, preference, prompts, quick):
        stage.run()
    report = args.root / "evaluation" / "report.md"
    print(f"[pipeline] all stages done in {time.perf_counter() - started:.0f} s. Report: {report.resolve()}")
    return report


if __name__ == "__main__":
    main()
