"""PPO iteration time, tokens generated/s and peak memory of lit_rlhf's PPOModule against TRL's
PPO trainer (`trl.experimental.ppo.PPOTrainer`, trl 0.29.1 in a side environment, see trl_env.py),
full and LoRA, same policy/reward/value folders, prompts, rollout batch, micro-batch, response
length, PPO epochs and mini-batches. Goal: lit_rlhf time per iteration <= 0.7x TRL's.

    python bench/bench_ppo.py --data-path $LIT_RLHF_DATA/oasst1 --out bench_ppo.json
    python bench/bench_ppo.py --reward-model runs/reward_model/reward_model ...  # reward gains too
    python bench/bench_ppo.py --device cuda ...  # both sides on the GPU in bf16 (+ peak GPU memory)

Each side runs in its own process (its peak RSS is its own), one after the other, never together
(they would share the cores). Time per iteration = whole-run training time / iterations, over the
same prompt set (TRL shuffles it). A third process feeds one TRL rollout to lit_rlhf's PPO
functions and reports how far the advantages, returns and losses are apart (`maths`).

Without `--reward-model` the reward/value folder is the policy with a seeded scalar head: right
for timing, meaningless for scores.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_env import trl_python  # noqa: E402

from lit_rlhf.data.oasst1_prompts import OASST1PromptDataModule  # noqa: E402
from lit_rlhf.models.hf import load_sequence_scorer, load_tokenizer, resolve_model_path  # noqa: E402

WORKER = Path(__file__).resolve().parent / "ppo_worker.py"


def seeded_reward_model(policy: str, folder: Path, seed: int) -> str:
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(policy)
    scorer = load_sequence_scorer(policy, tokenizer.pad_token_id)
    scorer.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run_side(python: str, side: str, spec_path: Path) -> dict:
    out = subprocess.run([python, str(WORKER), side, str(spec_path)], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{side} worker failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def summary(run: dict) -> dict:
    seconds, tokens = sum(run["seconds"]), sum(run["tokens"])
    return {
        "s_per_iteration": seconds / len(run["seconds"]),
        "rollout_s_per_iteration": sum(run["rollout_seconds"]) / len(run["rollout_seconds"]),
        "median_s_per_iteration": statistics.median(run["seconds"]),
        "tokens_per_s": tokens / seconds,
        "peak_rss_gb": run["peak_rss_gb"],
        "peak_gpu_gb": run["peak_gpu_gb"],
        "scores_first_last": [run["scores"][0], run["scores"][-1]],
        "iterations": len(run["seconds"]),
        "raw": run,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="embedded:smollm2")
    parser.add_argument("--reward-model", default=None, help="a reward_model/ folder (default: seeded head)")
    parser.add_argument("--data-path", default="OpenAssistant/oasst1")
    parser.add_argument("--variants", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--forward-batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: bf16-mixed for lit_rlhf, bf16=True for TRL (the maths check stays on CPU, fp32)",
    )
    parser.add_argument("--skip-maths", action="store_true")
    parser.add_argument("--out", default="bench_ppo.json")
    args = parser.parse_args(argv)
    if args.batch_size % args.forward_batch_size:
        parser.error("--batch-size must be a multiple of --forward-batch-size (TRL's gradient accumulation)")

    reference_python = str(trl_python())
    work = Path(tempfile.mkdtemp(prefix="bench_ppo-"))
    policy = resolve_model_path(args.policy)
    reward_model = args.reward_model or seeded_reward_model(policy, work / "reward_model", args.seed)
    data = OASST1PromptDataModule(
        path=args.data_path,
        tokenizer_name_or_path=policy,
        num_train_prompts=args.batch_size * args.iterations,
        num_eval_prompts=1,
        max_prompt_length=args.max_prompt_length,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    data.setup("fit")
    prompts = work / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p["prompt"], "input_ids": p["input_ids"]}) + "\n" for p in data.train_prompts)
    )

    result = {"config": vars(args), "torch": torch.__version__, "machine": platform.machine(), "variants": {}}
    for variant in args.variants:
        spec = {
            "variant": variant,
            "policy": policy,
            "reward_model": reward_model,
            "prompts": str(prompts),
            "batch_size": args.batch_size,
            "forward_batch_size": args.forward_batch_size,
            "max_new_tokens": args.max_new_tokens,
            "ppo_epochs": args.ppo_epochs,
            "iterations": args.iterations,
            "lr": args.lr * (10 if variant == "lora" else 1),
            "temperature": 0.7,
            "kl_coef": 0.05,
            "seed": args.seed,
            "device": args.device,
        }
        spec_path = work / f"spec_{variant}.json"
        spec_path.write_text(json.dumps(spec))
        ours = summary(run_side(sys.executable, "lit", spec_path))
        reference = summary(run_side(reference_python, "trl", spec_path))
        entry = {
            "lit_rlhf": ours,
            "trl_0.29.1": reference,
            "time_ratio": ours["s_per_iteration"] / reference["s_per_iteration"],
            "tokens_per_s_ratio": ours["tokens_per_s"] / reference["tokens_per_s"],
            "memory_ratio": ours["peak_rss_gb"] / reference["peak_rss_gb"],
        }
        if args.device == "cuda":
            entry["gpu_memory_ratio"] = ours["peak_gpu_gb"] / reference["peak_gpu_gb"]
        if not args.skip_maths:
            entry["maths"] = run_side(reference_python, "maths", spec_path)
        result["variants"][variant] = entry
        print(
            f"[{variant}] s/iteration lit_rlhf {ours['s_per_iteration']:.1f} vs TRL {reference['s_per_iteration']:.1f} "
            f"-> ratio {entry['time_ratio']:.2f} (goal <= 0.7); tokens/s {ours['tokens_per_s']:.1f} vs "
            f"{reference['tokens_per_s']:.1f}; peak RSS {ours['peak_rss_gb']:.2f} vs "
            f"{reference['peak_rss_gb']:.2f} GB; "
            f"rollout part {ours['rollout_s_per_iteration']:.1f} vs {reference['rollout_s_per_iteration']:.1f} s",
            flush=True,
        )
        if "maths" in entry:
            print(
                f"[{variant}] maths, max |lit_rlhf - TRL| on one rollout: {entry['maths']['max_abs_diff']}", flush=True
            )
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
