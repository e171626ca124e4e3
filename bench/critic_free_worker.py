"""One side of `bench_critic_free.py`, in its own process so its peak memory is its own.

    python bench/critic_free_worker.py lit SPEC.json   # lit_rlhf GRPOModule / RLOOModule under a Lightning Trainer
    python bench/critic_free_worker.py trl SPEC.json   # trl.GRPOTrainer / trl.RLOOTrainer (trl 1.16, the project's)

SPEC (written by bench_critic_free.py) names the method, the policy and reward folders, the prompts
file and the settings; the worker prints one JSON line prefixed `RESULT ` with, per training step,
its wall and CPU seconds (from the end of the previous step, so everything the trainer does between
steps counts), those of its rollout and of the rollout's parts (generate, log-prob forwards,
reward), its response tokens and its mean score; then the process's peak RSS.
"""

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class Clock:
    """Wall and CPU seconds (this process, all threads) of each training step, from the end of the
    previous step, and of named parts inside it (wrapped methods of an instance)."""

    def __init__(self, side: str, spec: dict):
        self.side, self.spec = side, spec
        self.steps: list[dict] = []
        self.parts: dict[str, list[float]] = {}
        self.active, self.last = True, None

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def start(self) -> None:
        self.last = self.now()

    def wrap(self, owner, name: str, part: str) -> None:
        method = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.active:
                return method(*args, **kwargs)
            wall, cpu = self.now()
            out = method(*args, **kwargs)
            spent = self.parts.setdefault(part, [0.0, 0.0])
            spent[0] += time.perf_counter() - wall
            spent[1] += time.process_time() - cpu
            return out

        setattr(owner, name, timed)

    def end_step(self, **extra) -> None:
        wall, cpu = self.now()
        step = {
            "wall_s": wall - self.last[0],
            "cpu_s": cpu - self.last[1],
            "parts_wall_s": {k: v[0] for k, v in self.parts.items()},
            "parts_cpu_s": {k: v[1] for k, v in self.parts.items()},
            **extra,
        }
        self.steps.append(step)
        self.parts, self.last = {}, (wall, cpu)
        print(
            f"[{self.side} {self.spec['method']}] step {len(self.steps)}/{self.spec['steps']}: "
            f"{step['wall_s']:.1f} s wall, {step['cpu_s']:.1f} s CPU",
            file=sys.stderr,
            flush=True,
        )


def read_prompts(spec: dict) -> list[dict]:
    prompts = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines() if line.strip()]
    return prompts[: spec["prompts_per_step"] * spec["steps"]]


def run_lit(spec: dict) -> dict:
    from lightning.pytorch import Callback, Trainer, seed_everything
    from torch.utils.data import DataLoader

    from lit_rlhf.data.oasst1_prompts import OASST1PromptDataModule
    from lit_rlhf.modules.grpo import GRPOModule, RLOOModule

    torch.set_num_threads(spec["threads"])
    seed_everything(spec["seed"])
    common = dict(
        model_name_or_path=spec["policy"],
        reward_model_path=spec["reward_model"],
        lora=None,
        optimizer=lambda p: torch.optim.AdamW(p, lr=spec["lr"], eps=spec["adam_eps"], weight_decay=0.0, fused=True),
        num_generations=spec["num_generations"],
        forward_batch_size=spec["forward_batch_size"],
        generation_batch_size=None,  # the whole rollout in one generate call, as TRL's generation batch
        mini_batch_size=None,  # one optimizer step per rollout
        num_iterations=1,
        max_new_tokens=spec["max_new_tokens"],
        temperature=spec["temperature"],
        missing_eos_penalty=None,
        beta=spec["beta"],
        kl_target=None,
        epsilon_low=spec["epsilon"],
        epsilon_high=spec["epsilon"],
        max_grad_norm=spec["max_grad_norm"],
        sample_every_n_steps=0,
    )
    if spec["method"] == "grpo":
        module = GRPOModule(**common, loss_type=spec["loss_type"], scale_rewards=spec["scale_rewards"])
    else:
        module = RLOOModule(**common, kl_in="reward", normalize_advantages=False)
    module.configure_callbacks = lambda: []  # no policy export at the end (TRL's side saves nothing either)
    clock = Clock("lit_rlhf", spec)
    # the rollout is these three calls (training_step's no-grad block), then the update
    clock.wrap(module, "sample", "generate")
    clock.wrap(module, "reference_logprobs", "logprob_forwards")
    clock.wrap(module, "scores", "reward")

    class Timer(Callback):
        def on_train_start(self, trainer, pl_module):
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = trainer.callback_metrics
            rows = len(batch["prompt"]) * spec["num_generations"]
            clock.end_step(
                tokens=round(float(metrics["val/response_length"]) * rows), score=float(metrics["objective/scores"])
            )

    prompts = read_prompts(spec)
    loader = DataLoader(
        prompts, batch_size=spec["prompts_per_step"], shuffle=False, collate_fn=OASST1PromptDataModule.collate
    )
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            precision="32-true",
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Timer()],
            default_root_dir=root,
        )
        trainer.fit(module, train_dataloaders=loader)
    for step in clock.steps:
        step["rollout_wall_s"] = sum(step["parts_wall_s"].values())
        step["rollout_cpu_s"] = sum(step["parts_cpu_s"].values())
    return {"steps": clock.steps, "optimizer": "torch.optim.AdamW(fused=True)"}


def trl_config(spec: dict, output_dir: str):
    from trl import GRPOConfig, RLOOConfig

    rows = spec["prompts_per_step"] * spec["num_generations"]
    common = dict(
        output_dir=output_dir,
        # one generation batch (prompts x generations) per optimizer step, in micro-batches of forward_batch_size
        per_device_train_batch_size=spec["forward_batch_size"],
        gradient_accumulation_steps=rows // spec["forward_batch_size"],
        num_generations=spec["num_generations"],
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        top_p=1.0,
        top_k=0,
        beta=spec["beta"],
        num_iterations=1,
        epsilon=spec["epsilon"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch_fused",
        adam_epsilon=spec["adam_eps"],
        weight_decay=0.0,
        max_grad_norm=spec["max_grad_norm"],
        max_steps=spec["steps"],
        shuffle_dataset=False,  # the same prompts in the same order as lit_rlhf's loader
        activation_checkpointing=False,  # transformers 5's name of TRL's gradient_checkpointing (TRL default: on)
        disable_dropout=True,
        use_vllm=False,
        logging_steps=1,
        log_completions=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=spec["seed"],
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
    )
    if spec["method"] == "grpo":
        return GRPOConfig(**common, loss_type=spec["loss_type"], scale_rewards=spec["scale_rewards"])
    return RLOOConfig(**common, normalize_advantages=False)


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer, RLOOTrainer

    torch.set_num_threads(spec["threads"])
    prompts = read_prompts(spec)
    expected_ids = {tuple(p["input_ids"]) for p in prompts}
    # TRL applies the policy's chat template itself (add_generation_prompt=True), as lit_rlhf's chat_prompt_ids
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p["prompt"]}] for p in prompts]})
    # SmolLM2's pad = EOS is kept: TRL 1.16's GRPO/RLOO trainers build prompt masks from lengths and cut
    # completions at the first EOS, never masking by pad id (checked below: `prompt_ids_match_lit`).
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    reward_tokenizer = AutoTokenizer.from_pretrained(spec["reward_model"])
    for tok in (tokenizer, reward_tokenizer):
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=torch.float32)
    reward.config.pad_token_id = reward_tokenizer.pad_token_id

    clock, rollout, scores, mismatched_prompts = Clock("trl", spec), {}, [], []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.end_step(**rollout)

        def on_log(self, args, state, control, logs=None, **kwargs):  # after on_step_end
            if logs and "reward" in logs:
                scores.append(logs["reward"])

    trainer_class = GRPOTrainer if spec["method"] == "grpo" else RLOOTrainer
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = trainer_class(
            model=policy,
            reward_funcs=reward,
            args=trl_config(spec, output_dir),
            train_dataset=dataset,
            processing_class=tokenizer,
            reward_processing_classes=reward_tokenizer,
            callbacks=[Timer()],
        )
        generate_and_score = trainer._generate_and_score_completions
        clock.wrap(trainer, "_generate", "generate")
        clock.wrap(trainer, "_calculate_rewards", "reward")
        # in the rollout: the reference's log-probs (RLOO: and the rollout policy's, its `old_logps`)
        clock.wrap(trainer, "_get_per_token_logps_and_entropies", "logprob_forwards")

        def timed_rollout(inputs):
            wall, cpu = clock.now()
            clock.active = True
            out = generate_and_score(inputs)
            clock.active = False  # the update's own forward passes are not rollout parts
            rollout.update(
                rollout_wall_s=time.perf_counter() - wall,
                rollout_cpu_s=time.process_time() - cpu,
                tokens=int(out["completion_mask"].sum()),
            )
            for ids, mask in zip(out["prompt_ids"], out["prompt_mask"]):
                if tuple(ids[mask.bool()].tolist()) not in expected_ids:
                    mismatched_prompts.append(len(ids))
            return out

        trainer._generate_and_score_completions = timed_rollout
        clock.start()  # TRL sets up in train() before its first step: the clock restarts at on_train_begin
        trainer.train()
    for step, score in zip(clock.steps, scores):
        step["score"] = score
    return {
        "steps": clock.steps,
        "optimizer": str(trainer.args.optim),
        "prompt_ids_match_lit": not mismatched_prompts,
        "generation_batch_size": trainer.args.generation_batch_size,
        "steps_per_generation": trainer.args.steps_per_generation,
        "activation_checkpointing": trainer.args.activation_checkpointing,
    }


if __name__ == "__main__":
    side, spec_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(spec["seed"])
    result = {"lit": run_lit, "trl": run_trl}[side](spec)
    result["peak_rss_gb"] = peak_rss_gb()
    result["torch_threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)
