"""Seconds per training step, response tokens/s and peak memory of lit_rlhf's GRPOModule and
RLOOModule against TRL's `GRPOTrainer` and `RLOOTrainer` (trl 1.16, the project's own dependency)
at equal settings. Goal: lit_rlhf's time per step <= 0.8x TRL's.

    python bench/bench_critic_free.py --out bench_critic_free.json   # ~4-5 min on 2 CPU cores
    python bench/bench_critic_free.py --reward-model runs/reward_model/reward_model   # a trained reward model
    python bench/bench_critic_free.py --prompts-per-step 4 --max-new-tokens 32 --steps 4 --threads 2  # idle machine
    python bench/bench_critic_free.py --dry-run --in-process --out /tmp/cf.json   # tiny models: the code path only

Equal on both sides: the policy folder (default: the embedded SmolLM2-135M-Instruct), the reward
folder, the prompts (root prompts of the packaged oasst1 sample, chat-templated by the policy's
template with the generation prompt; only prompts that fit `--max-prompt-length` are used, so
neither side truncates; the TRL worker checks that its prompt ids are lit_rlhf's), prompts per step
x generations per prompt, max new tokens, temperature (top-k 0, top-p 1), one optimizer step per
generation batch (num_iterations 1, no mini-batches), micro-batch (`--forward-batch-size` = TRL's
per-device batch, the rest gradient accumulation), beta, epsilon, loss ("grpo": per-response token
mean, scale_rewards "group"; RLOO: k1 KL off the reward, no advantage whitening), fused AdamW (lr,
eps 1e-5, no weight decay, constant schedule), max_grad_norm 1, fp32 on CPU, torch threads, dropout
off, no gradient checkpointing, no vLLM, TRL's dataset shuffle off (same prompts, same order).

Each side runs in its own process (its peak RSS is its own), one after the other, never together.
A step's time runs from the end of the previous step to the end of this one (everything the trainer
does counts); the first step (warm-up) is left out of the means. Wall and CPU seconds (the
process's, all threads) are both reported: on a CPU shared with other jobs the wall time of the
side that happened to run under more load grows, its CPU time much less. The rollout is split
into generate, log-prob forwards (reference; TRL's RLOO also recomputes the rollout policy's) and
reward; the update is the rest of the step. Defaults are sized for a shared 2-core CPU: 3 steps
of 2 prompts x 4 generations, 12 new tokens, prompts up to 48 tokens, 1 torch thread (with 2,
OpenMP barriers stall whenever another job takes a core: generation ran ~8x slower).
Without `--reward-model` the reward folder is the policy with a seeded fresh scalar head: right for
timing, meaningless for scores (a speed benchmark, not a training run).
"""

import argparse
import gzip
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]
from lit_rlhf.data.oasst1 import read_oasst1_rows  # noqa: E402
from lit_rlhf.data.oasst1_prompts import split_prompts  # noqa: E402
from lit_rlhf.models.hf import load_sequence_scorer, load_tokenizer, resolve_model_path  # noqa: E402

WORKER = Path(__file__).resolve().parent / "critic_free_worker.py"
SAMPLE = REPO / "lit_rlhf" / "samples" / "oasst1_en.jsonl.gz"
METHOD_BETA = {"grpo": 0.04, "rloo": 0.05}  # each trainer's default (TRL's and configs/<method>.yaml)
WARMUP_STEPS = 1


def seeded_reward_model(policy: str, folder: Path, seed: int) -> str:
    """The policy with a fresh scalar head, saved with its weights (timing only: its scores mean nothing)."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(policy)
    scorer = load_sequence_scorer(policy, tokenizer.pad_token_id)
    scorer.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_policy(folder: Path, tokenizer_source: str, seed: int) -> str:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template (random weights), for --dry-run."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_prompts(data_path: str, policy: str, count: int, max_prompt_length: int, seed: int, out: Path) -> dict:
    """`count` root prompts (lang en) whose chat-templated ids fit `max_prompt_length`, as JSONL."""
    from lit_rlhf.text import chat_prompt_ids

    tokenizer = load_tokenizer(policy)
    if data_path.endswith(".gz"):  # the packaged sample: read through a plain .jsonl copy
        plain = out.with_name(Path(data_path).name[: -len(".gz")])
        plain.write_bytes(gzip.decompress(Path(data_path).read_bytes()))
        data_path = str(plain)
    pool, _ = split_prompts(read_oasst1_rows(data_path), "en", 10**9, 0, seed)
    kept, too_long = [], 0
    for prompt in pool:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt["prompt"]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        if len(ids) > max_prompt_length:
            too_long += 1
            continue
        assert chat_prompt_ids(tokenizer, prompt["prompt"], max_prompt_length)[0] == ids  # lit_rlhf's own encoding
        kept.append({"prompt": prompt["prompt"], "input_ids": ids})
        if len(kept) == count:
            break
    if len(kept) < count:
        raise SystemExit(f"only {len(kept)} root prompts of {data_path} fit {max_prompt_length} tokens; {count} needed")
    out.write_text("".join(json.dumps(p) + "\n" for p in kept))
    lengths = [len(p["input_ids"]) for p in kept]
    return {
        "prompts": len(kept),
        "prompt_tokens_mean": sum(lengths) / len(lengths),
        "prompt_tokens_max": max(lengths),
        "longer_prompts_skipped": too_long,
    }


def run_side(side: str, spec_path: Path, in_process: bool = False) -> dict:
    started = time.perf_counter()
    if in_process:  # --in-process: no start-up cost, but peak RSS is then this process's so far
        import critic_free_worker

        spec, threads = json.loads(spec_path.read_text()), torch.get_num_threads()
        torch.manual_seed(spec["seed"])
        try:
            result = {"lit": critic_free_worker.run_lit, "trl": critic_free_worker.run_trl}[side](spec)
        finally:
            torch.set_num_threads(threads)
        result["peak_rss_gb"] = critic_free_worker.peak_rss_gb()
        result["process_wall_s"] = time.perf_counter() - started
        return result
    threads = str(json.loads(spec_path.read_text())["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    # the worker's stderr (progress, warnings, a traceback) goes straight to ours
    command = [sys.executable, str(WORKER), side, str(spec_path)]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{side} worker failed (exit {out.returncode}); its traceback is in the stderr above")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["process_wall_s"] = time.perf_counter() - started
    return result


def summary(run: dict) -> dict:
    """Means over the timed steps (the first, warm-up step left out): wall and CPU seconds per step,
    their rollout (generate, log-prob forwards, reward) and update parts, response tokens/s."""
    steps = run["steps"][WARMUP_STEPS:]
    if not steps:
        raise RuntimeError(f"no timed step after the {WARMUP_STEPS} warm-up step(s): run with --steps >= 2")

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    out = {}
    for clock in ("wall", "cpu"):
        out[f"{clock}_s_per_step"] = mean(step[f"{clock}_s"] for step in steps)
        out[f"{clock}_rollout_s_per_step"] = mean(step[f"rollout_{clock}_s"] for step in steps)
        out[f"{clock}_update_s_per_step"] = out[f"{clock}_s_per_step"] - out[f"{clock}_rollout_s_per_step"]
        parts = sorted({name for step in steps for name in step[f"parts_{clock}_s"]})
        out[f"{clock}_rollout_parts_s_per_step"] = {
            name: mean(step[f"parts_{clock}_s"].get(name, 0.0) for step in steps) for name in parts
        }
    tokens = sum(step["tokens"] for step in steps)
    return {
        "s_per_step": out["wall_s_per_step"],
        "cpu_s_per_step": out["cpu_s_per_step"],
        "tokens_per_s": tokens / sum(step["wall_s"] for step in steps),
        "tokens_per_cpu_s": tokens / sum(step["cpu_s"] for step in steps),
        "response_tokens_per_step": tokens / len(steps),
        "peak_rss_gb": run["peak_rss_gb"],
        "timed_steps": len(steps),
        "warmup_step_s": run["steps"][0]["wall_s"],
        **out,
        "raw": run,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["grpo", "rloo"], choices=["grpo", "rloo"])
    parser.add_argument("--policy", default="embedded:smollm2")
    parser.add_argument("--reward-model", default=None, help="a sequence-classification folder (default: seeded head)")
    parser.add_argument("--data-path", default=str(SAMPLE), help="oasst1 message rows (default: the packaged sample)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per side, the first one untimed")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--forward-batch-size", type=int, default=4, help="micro-batch (TRL: per-device batch)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--max-prompt-length", type=int, default=48, help="longer prompts are skipped, not cut")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--beta", type=float, default=None, help="default: 0.04 for GRPO, 0.05 for RLOO")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per side (1: on a shared CPU, 2 threads stall at OpenMP barriers)",
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny random 2-layer models, 2 steps of 2x2, 8 tokens")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run both sides in this process (quick checks; peak RSS is then not per side)",
    )
    parser.add_argument("--out", default="bench_critic_free.json")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.steps, args.prompts_per_step, args.num_generations = 2, 2, 2
        args.forward_batch_size, args.max_new_tokens = 2, 8
    rows = args.prompts_per_step * args.num_generations
    if rows % args.forward_batch_size:
        parser.error(
            "prompts-per-step x num-generations must be a multiple of --forward-batch-size "
            "(TRL's gradient accumulation)"
        )

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_critic_free-"))  # models and prompts of this run, removed at the end
    try:
        return run(args, work, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, started: float) -> dict:
    policy = resolve_model_path(args.policy)
    if args.dry_run:
        policy = tiny_policy(work / "policy", policy, args.seed)
    reward_model = args.reward_model or seeded_reward_model(policy, work / "reward_model", args.seed)
    prompts = work / "prompts.jsonl"
    prompt_stats = write_prompts(
        args.data_path, policy, args.prompts_per_step * args.steps, args.max_prompt_length, args.seed, prompts
    )

    import trl

    result = {
        "config": vars(args),
        "policy": policy,
        "reward_model": reward_model if args.reward_model else f"{policy} + seeded fresh scalar head (timing only)",
        "prompts": prompt_stats,
        "torch": torch.__version__,
        "trl": trl.__version__,
        "machine": platform.machine(),
        "warmup_steps_left_out": WARMUP_STEPS,
        "peak_rss": "this process's, both sides (--in-process)" if args.in_process else "per side (own process)",
        "pad_token": "SmolLM2's pad = EOS kept on both sides: TRL 1.16's GRPO/RLOO mask prompts by length and cut "
        "completions at the first EOS (checked: TRL's unpadded prompt ids equal lit_rlhf's)",
        "methods": {},
    }
    for method in args.methods:
        spec = {
            "method": method,
            "policy": policy,
            "reward_model": reward_model,
            "prompts": str(prompts),
            "steps": args.steps,
            "prompts_per_step": args.prompts_per_step,
            "num_generations": args.num_generations,
            "forward_batch_size": args.forward_batch_size,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "lr": args.lr,
            "adam_eps": 1e-5,
            "max_grad_norm": 1.0,
            "epsilon": 0.2,
            "beta": METHOD_BETA[method] if args.beta is None else args.beta,
            "loss_type": "grpo",
            "scale_rewards": "group",
            "seed": args.seed,
            "threads": args.threads,
        }
        spec_path = work / f"spec_{method}.json"
        spec_path.write_text(json.dumps(spec))
        entry: dict = {"settings": spec}
        for side, key in (("lit", "lit_rlhf"), ("trl", f"trl_{trl.__version__}")):
            try:
                entry[key] = summary(run_side(side, spec_path, args.in_process))
            except Exception as error:  # recorded; the other side and method still run
                entry[key] = {"error": str(error)}
        ours, reference = entry["lit_rlhf"], entry[f"trl_{trl.__version__}"]
        if "error" not in ours and "error" not in reference:
            entry["time_ratio"] = ours["s_per_step"] / reference["s_per_step"]
            entry["cpu_time_ratio"] = ours["cpu_s_per_step"] / reference["cpu_s_per_step"]
            entry["tokens_per_s_ratio"] = ours["tokens_per_s"] / reference["tokens_per_s"]
            entry["memory_ratio"] = ours["peak_rss_gb"] / reference["peak_rss_gb"]
            for clock, name in (("wall", "s/step"), ("cpu", "CPU s/step")):
                o, r = ours, reference
                print(
                    f"[{method}] {name} lit_rlhf {o[f'{clock}_s_per_step']:.2f} vs TRL {r[f'{clock}_s_per_step']:.2f} "
                    f"-> ratio {o[f'{clock}_s_per_step'] / r[f'{clock}_s_per_step']:.2f} (goal <= 0.8); rollout "
                    f"{o[f'{clock}_rollout_s_per_step']:.2f} vs {r[f'{clock}_rollout_s_per_step']:.2f}, update "
                    f"{o[f'{clock}_update_s_per_step']:.2f} vs {r[f'{clock}_update_s_per_step']:.2f}",
                    flush=True,
                )
            print(
                f"[{method}] response tokens/s {ours['tokens_per_s']:.2f} vs {reference['tokens_per_s']:.2f}; "
                f"peak RSS {ours['peak_rss_gb']:.2f} vs {reference['peak_rss_gb']:.2f} GB",
                flush=True,
            )
        else:
            print(f"[{method}] failed: {ours.get('error') or reference.get('error')}", flush=True)
        result["methods"][method] = entry
        result["wall_s"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(result, indent=2))  # after each method: a cut-off run keeps its figures
    print(f"-> {args.out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` then stops the running worker too
    main()
