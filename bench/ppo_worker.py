"""One side of `bench_ppo.py`, in its own process so its peak memory is its own.

    python bench/ppo_worker.py lit  SPEC.json   # lit_rlhf PPOModule under a Lightning Trainer
    <trl env python> bench/ppo_worker.py trl SPEC.json   # trl 0.29.1 experimental PPOTrainer
    <trl env python> bench/ppo_worker.py maths SPEC.json # TRL's maths on one rollout vs lit_rlhf.rl

SPEC (written by bench_ppo.py) names the policy and reward folders, the prompts file and the
settings; the worker prints one JSON line prefixed `RESULT ` with its figures.
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


def response_tokens(responses: torch.Tensor, eos_token_id: int) -> int:
    """Tokens generated per row: up to and including the first EOS, else the full width."""
    is_eos = responses == eos_token_id
    length = torch.where(
        is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], responses.size(1), dtype=torch.float)
    )
    return int(length.sum())


def run_lit(spec: dict) -> dict:
    from lightning.pytorch import Callback, Trainer, seed_everything
    from torch.utils.data import DataLoader

    from lit_rlhf.data.oasst1_prompts import OASST1PromptDataModule
    from lit_rlhf.modules.ppo import LoraSettings, PPOModule

    seed_everything(spec["seed"])
    prompts = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines()]
    prompts = prompts[: spec["batch_size"] * spec["iterations"]]
    module = PPOModule(
        model_name_or_path=spec["policy"],
        reward_model_path=spec["reward_model"],
        lora=LoraSettings() if spec["variant"] == "lora" else None,
        policy_optimizer=lambda p: torch.optim.AdamW(p, lr=spec["lr"], eps=1e-5, weight_decay=0.0, fused=True),
        value_optimizer=lambda p: torch.optim.AdamW(p, lr=spec["lr"], eps=1e-5, weight_decay=0.0, fused=True),
        forward_batch_size=spec["forward_batch_size"],
        ppo_epochs=spec["ppo_epochs"],
        max_new_tokens=spec["max_new_tokens"],
        temperature=spec["temperature"],
        kl_target=None,
        init_kl_coef=spec["kl_coef"],
        sample_every_n_steps=0,
    )

    class Timer(Callback):
        def __init__(self):
            self.seconds, self.tokens, self.scores, self.rollout_seconds = [], [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seconds.append(time.perf_counter() - self.start)
            metrics = trainer.callback_metrics
            self.tokens.append(float(metrics["val/response_length"]) * len(batch["prompt"]))
            self.scores.append(float(metrics["objective/scores"]))
            self.rollout_seconds.append(float(metrics["time/rollout_s"]))

    timer = Timer()
    loader = DataLoader(
        prompts, batch_size=spec["batch_size"], shuffle=False, collate_fn=OASST1PromptDataModule.collate
    )
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(
            accelerator=spec["device"],
            devices=1,
            precision="bf16-mixed" if spec["device"] == "cuda" else "32-true",
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
            default_root_dir=root,
        )
        trainer.fit(module, train_dataloaders=loader)
    return {
        "seconds": timer.seconds,
        "tokens": timer.tokens,
        "scores": timer.scores,
        "rollout_seconds": timer.rollout_seconds,
    }


def trl_objects(spec: dict):
    """TRL's side: the same folders, with a pad token distinct from EOS (TRL masks every pad id
    as padding, and SmolLM2's pad = EOS = <|im_end|> also closes every chat turn of the prompt)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    tokenizer.pad_token = "<|endoftext|>"
    prompts = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines()]
    prompts = prompts[: spec["batch_size"] * spec["iterations"]]
    dataset = Dataset.from_dict({"input_ids": [p["input_ids"] for p in prompts]})
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=torch.float32)
    for model in (value, reward):
        model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = (
        LoraConfig(r=8, lora_alpha=32, lora_dropout=0.2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        if spec["variant"] == "lora"
        else None
    )
    return tokenizer, dataset, policy, value, reward, peft_config


def trl_config(spec: dict, output_dir: str, lr: float):
    from trl.experimental.ppo import PPOConfig

    return PPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=spec["forward_batch_size"],
        gradient_accumulation_steps=spec["batch_size"] // spec["forward_batch_size"],
        local_rollout_forward_batch_size=spec["forward_batch_size"],
        num_mini_batches=1,
        num_ppo_epochs=spec["ppo_epochs"],
        total_episodes=spec["batch_size"] * spec["iterations"],
        response_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        kl_coef=spec["kl_coef"],
        stop_token="eos",
        learning_rate=lr,
        lr_scheduler_type="constant",
        adam_epsilon=1e-5,
        weight_decay=0.0,
        max_grad_norm=1.0,
        num_sample_generations=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=spec["seed"],
        use_cpu=spec["device"] == "cpu",
        bf16=spec["device"] == "cuda",
        fp16=False,
    )


def run_trl(spec: dict) -> dict:
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    tokenizer, dataset, policy, value, reward, peft_config = trl_objects(spec)
    tokens, rollout_started, rollout_seconds = [], [], []
    generate, forward = trl_ppo.batch_generation, trl_ppo.forward

    def counting_generation(model, queries, *args, **kwargs):
        rollout_started.append(time.perf_counter())
        query_responses, logits = generate(model, queries, *args, **kwargs)
        tokens.append(response_tokens(query_responses[:, queries.size(1) :], tokenizer.eos_token_id))
        return query_responses, logits

    def timed_forward(model, *args, **kwargs):
        # the first policy+value forward of an iteration ends its rollout
        if isinstance(model, trl_ppo.PolicyAndValueWrapper) and len(rollout_seconds) < len(rollout_started):
            rollout_seconds.append(time.perf_counter() - rollout_started[-1])
        return forward(model, *args, **kwargs)

    trl_ppo.batch_generation, trl_ppo.forward = counting_generation, timed_forward

    class Timer(TrainerCallback):
        def __init__(self):
            self.seconds, self.scores, self.last = [], [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                self.scores.append(logs["objective/scores"])

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

    timer = Timer()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = PPOTrainer(
            args=trl_config(spec, output_dir, spec["lr"]),
            processing_class=tokenizer,
            model=policy,
            ref_model=None,
            reward_model=reward,
            train_dataset=dataset,
            value_model=value,
            peft_config=peft_config,
            callbacks=[timer],
        )
        # TRL times the first data-loader fetch and sets up in train(): start the clock there, as Lightning's
        timer.last = time.perf_counter()
        trainer.train()
    return {
        "seconds": timer.seconds,
        "tokens": tokens,
        "scores": timer.scores,
        "rollout_seconds": rollout_seconds,
        "optim": str(trainer.args.optim),
    }


def run_maths(spec: dict) -> dict:
    """Feed one TRL rollout to lit_rlhf's PPO functions and compare advantages, returns and losses.

    TRL's conventions are mapped explicitly: it adds the score one position *after* the EOS token
    (`padding_mask_p1`) while lit_rlhf adds it on the EOS token itself, so lit_rlhf's `gae` runs
    on TRL's p1 mask here. With lr 0 and a single micro-batch every PPO epoch sees the rollout
    policy, so TRL's logged losses are the losses of that rollout.
    """
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from lit_rlhf.rl import common
    from lit_rlhf.rl import ppo as ours

    # responses long enough that some end with EOS, so TRL's p1 convention is exercised
    # on CPU in fp32 whatever --device says: this compares arithmetic, not speed
    spec = {**spec, "iterations": 1, "forward_batch_size": spec["batch_size"], "max_new_tokens": 96, "device": "cpu"}
    tokenizer, dataset, policy, value, reward, peft_config = trl_objects(spec)
    dataset = dataset.select(range(spec["batch_size"]))
    seen: dict = {"get_reward": [], "log_softmax": []}
    get_reward, selective_log_softmax, masked_whiten = (
        trl_ppo.get_reward,
        trl_ppo.selective_log_softmax,
        trl_ppo.masked_whiten,
    )

    def spy_reward(model, *args, **kwargs):
        out = get_reward(model, *args, **kwargs)
        seen["get_reward"].append(out)
        return out

    def spy_log_softmax(logits, index):
        out = selective_log_softmax(logits, index)
        seen["log_softmax"].append(out)
        return out

    def spy_whiten(values, mask, shift_mean=True):
        out = masked_whiten(values, mask, shift_mean)
        seen.setdefault("whiten", (values.clone(), mask.clone(), out.clone()))
        return out

    logged: dict = {}
    trl_ppo.get_reward, trl_ppo.selective_log_softmax, trl_ppo.masked_whiten = spy_reward, spy_log_softmax, spy_whiten

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.update(logs or {})

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = PPOTrainer(
            args=trl_config(spec, output_dir, lr=0.0),
            processing_class=tokenizer,
            model=policy,
            ref_model=None,
            reward_model=reward,
            train_dataset=dataset,
            value_model=value,
            peft_config=peft_config,
            callbacks=[Logs()],
        )
        trainer.train()

    logprobs, ref_logprobs = seen["log_softmax"][0], seen["log_softmax"][1]
    (full_value, _, _), (_, scores, _) = seen["get_reward"][0], seen["get_reward"][1]
    raw_advantages, valid, trl_advantages = seen["whiten"]
    T = logprobs.size(1)
    context_length = full_value.size(1) - T
    values = full_value[:, context_length - 1 : -1].squeeze(-1)
    mask = valid.float()  # TRL's ~padding_mask: response tokens up to and including EOS
    lengths = mask.sum(1).long()
    mask_p1 = (torch.arange(T).unsqueeze(0) < (lengths + 1).clamp(max=T).unsqueeze(1)).float()
    values = values * mask_p1
    logprobs, ref_logprobs = logprobs * mask, ref_logprobs * mask

    kl = common.kl_estimate(logprobs, ref_logprobs, "k1") * mask
    rewards, non_score = ours.token_rewards(scores, kl, mask_p1, spec["kl_coef"])
    advantages, returns = ours.gae(rewards, values, mask_p1, 1.0, 0.95)
    whitened = common.masked_whiten(advantages, mask)
    # the first PPO epoch at the rollout policy: new log-probs/values = old ones
    policy_loss = ours.ppo_policy_loss(logprobs, logprobs, whitened, mask, 0.2)
    value_loss, _ = ours.ppo_value_loss(values, values, returns, mask_p1, 0.2)

    def gap(a, b, m):
        return float(((a - b).abs() * m).max())

    return {
        "rows": int(mask.size(0)),
        "rows_ending_with_eos": int((lengths < T).sum()),
        "response_tokens": int(mask.sum()),
        "max_abs_diff": {
            "gae_advantages": gap(advantages, raw_advantages, mask_p1),
            "whitened_advantages": gap(whitened, trl_advantages, mask),
            "returns": gap(returns, raw_advantages + values, mask_p1),
            "policy_loss": abs(float(policy_loss.loss) - logged["loss/policy_avg"]),
            "value_loss": abs(float(value_loss) - logged["loss/value_avg"]),
            "objective/kl": abs(float(kl.sum(1).mean()) - logged["objective/kl"]),
            "objective/non_score_reward": abs(float(non_score.sum(1).mean()) - logged["objective/non_score_reward"]),
        },
        "trl": {k: logged[k] for k in ("loss/policy_avg", "loss/value_avg", "objective/kl", "policy/approxkl_avg")},
        "lit_rlhf": {"loss/policy_avg": float(policy_loss.loss), "loss/value_avg": float(value_loss)},
    }


if __name__ == "__main__":
    side, spec_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(spec["seed"])
    result = {"lit": run_lit, "trl": run_trl, "maths": run_maths}[side](spec)
    result["peak_rss_gb"] = peak_rss_gb()
    result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_initialized() else None
    print("RESULT " + json.dumps(result), flush=True)
