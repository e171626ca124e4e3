"""PPO fine-tuning of a causal LM against a frozen reward model (RLHF), full or LoRA.

One module, two configs: `lora: null` trains every policy weight and keeps a frozen copy as the
reference; with `lora` set, only the q_proj/v_proj adapters train and the reference is the same
network with its adapters disabled (no second copy). The critic starts from the reward model.
Metric names follow TRL's PPO trainer (`objective/kl`, `objective/scores`, `policy/approxkl_avg`...).

Every model runs in eval mode, updates included (as TRL disables dropout): with dropout on in the
updates and off in the rollout, the probability ratio at the first PPO step would not be 1, and
clipping would fire on dropout noise. Hence LoRA here has no dropout setting.
"""

import copy
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from lit_rlhf.artifacts import reward_model_scoring
from lit_rlhf.errors import NonFiniteError, UserInputError
from lit_rlhf.logging import log_table
from lit_rlhf.models.hf import DEFAULT_MODEL, load_causal_lm, load_sequence_scorer, load_tokenizer
from lit_rlhf.models.scoring import score_responses
from lit_rlhf.rl.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_estimate,
    kl_horizon_for_run,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
)


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 32
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


def _lora_config(settings: LoraSettings, task_type: str) -> LoraConfig:
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=0.0,
        target_modules=list(settings.target_modules),
        task_type=task_type,
    )


def count_trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def _save_atomically(folder: Path, save) -> None:
    """Write a model folder next to its destination, then swap it in: no half-written folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save(staging)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class SampledTokenStats(LogitsProcessor):
    """Collects, while `generate` samples, each sampled token's log-prob and the entropy under the
    sampling distribution (logits / temperature). The policy then needs no second forward pass over
    its rollout, and only one step's (B, V) log-softmax is held at a time, never (B, T, V) logits.
    It runs before `generate`'s own temperature warper, hence the division here."""

    def __init__(self, temperature: float):
        self.temperature, self.logprobs, self.entropy, self._last = temperature, [], [], None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last is not None:  # input_ids now ends with the token sampled from the last step
            self.logprobs.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1))
        logits = scores.float() / (self.temperature + 1e-7)
        self._last = torch.log_softmax(logits, dim=-1)
        self.entropy.append(entropy_from_logits(logits))
        return scores

    def result(self, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropy), each (B, generated tokens)."""
        self.logprobs.append(self._last.gather(1, sequences[:, -1:]).squeeze(1))
        return torch.stack(self.logprobs, 1), torch.stack(self.entropy, 1)


class PPOModule(LightningModule):
    """Each training step is one PPO iteration: roll out a batch of prompts, score it, then run
    `ppo_epochs` passes of clipped policy/value updates over it in mini-batches.

    Args:
        model_name_or_path: the policy's starting model (hub id, local folder or `embedded:smollm2`).
        reward_model_path: the frozen reward-model folder exported by the reward-model stage.
        value_model_path: where the critic starts (default: the reward model).
        lora: LoRA settings for the policy; None trains all weights (the "full" variant).
        critic_lora: also put LoRA on the critic (its scalar head stays fully trainable).
        forward_batch_size: micro-batch for every forward and backward pass.
        generation_batch_size: prompts per `generate` call (default: the whole rollout batch).
            Sampling a token costs about the same for 4 rows as for 64 on a CPU (overhead-bound),
            and no (B, T, V) logits are kept, so larger is faster until memory runs out.
        mini_batch_size: prompts per optimizer step (default: the whole rollout batch).
        kl_target: per-token KL the adaptive controller steers to; None keeps `init_kl_coef` fixed.
        kl_horizon_fraction: the controller's horizon as a share of the run's rollout samples
            (`lit_rlhf.rl.ppo.kl_horizon_for_run`): 0.04 lets `kl_coef` double within 14% of the run.
        missing_eos_penalty: subtracted from the score of responses that never emit EOS.
        reward_max_length: override of the max length the reward model was trained with (read
            from its export record; an override that differs is printed as a warning).
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        reward_model_path: str = "runs/reward_model/reward_model",
        value_model_path: str | None = None,
        lora: LoraSettings | None = None,
        critic_lora: bool = False,
        policy_optimizer: OptimizerCallable = torch.optim.AdamW,
        value_optimizer: OptimizerCallable = torch.optim.AdamW,
        forward_batch_size: int = 16,
        generation_batch_size: int | None = None,
        mini_batch_size: int | None = None,
        ppo_epochs: int = 4,
        max_new_tokens: int = 128,
        temperature: float = 0.7,
        missing_eos_penalty: float | None = None,
        kl_estimator: str = "k1",
        init_kl_coef: float = 0.05,
        kl_target: float | None = 0.05,
        kl_horizon_fraction: float = 0.04,
        gamma: float = 1.0,
        lam: float = 0.95,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        whiten_rewards: bool = False,
        max_grad_norm: float = 1.0,
        reward_max_length: int | None = None,
        sample_every_n_steps: int = 5,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        if isinstance(lora, dict):  # as stored in checkpoints (plain types load with weights_only=True)
            lora = LoraSettings(**lora)
        self.save_hyperparameters(ignore=["policy_optimizer", "value_optimizer"])
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only what training changes, see on_save_checkpoint
        self.policy_optimizer, self.value_optimizer = policy_optimizer, value_optimizer
        if kl_estimator not in {"k1", "k3"}:
            raise UserInputError(f"kl_estimator must be 'k1' or 'k3', not '{kl_estimator}'.")

        self.tokenizer = load_tokenizer(model_name_or_path, padding_side="left", trust_remote_code=trust_remote_code)
        self.reward_tokenizer = load_tokenizer(reward_model_path, padding_side="right", trust_remote_code=trust_remote_code)
        policy = load_causal_lm(model_name_or_path, trust_remote_code=trust_remote_code)
        if lora is None:
            self.ref_policy = _freeze(copy.deepcopy(policy))
            self.policy = policy
        else:
            self.ref_policy = None  # the reference is the policy with its adapters disabled
            self.policy = get_peft_model(policy, _lora_config(lora, "CAUSAL_LM"))
        self.reward_model = _freeze(
            load_sequence_scorer(reward_model_path, self.reward_tokenizer.pad_token_id, trust_remote_code, trained_head=True)
        )
        critic = load_sequence_scorer(
            value_model_path or reward_model_path, self.tokenizer.pad_token_id, trust_remote_code
        )
        self.critic = get_peft_model(critic, _lora_config(lora or LoraSettings(), "SEQ_CLS")) if critic_lora else critic
        self.reward_scoring = reward_model_scoring(reward_model_path)
        if reward_max_length is not None and reward_max_length != self.reward_scoring["max_length"]:
            print(
                f"[lit_rlhf] warning: scoring with reward_max_length {reward_max_length}, but the reward model "
                f"was trained with max length {self.reward_scoring['max_length']} ({reward_model_path})."
            )
            self.reward_scoring["max_length"] = reward_max_length
        # The horizon is set from the run's length in on_fit_start.
        self.kl_controller = (
            AdaptiveKLController(init_kl_coef, kl_target, 1)
            if kl_target is not None
            else FixedKLController(init_kl_coef, 0.0, 1)
        )
        self.trainable_params = {"policy": count_trainable(self.policy), "critic": count_trainable(self.critic)}
        self._check_trainable()

    def _check_trainable(self) -> None:
        names = [n for n, p in self.policy.named_parameters() if p.requires_grad]
        if self.hparams.lora is not None and not all("lora_" in n for n in names):
            raise AssertionError(f"LoRA variant trains non-adapter policy weights: {names[:3]}")
        print(
            f"[lit_rlhf] PPO {'LoRA' if self.hparams.lora else 'full'}: trainable policy params "
            f"{self.trainable_params['policy']:,} / {sum(p.numel() for p in self.policy.parameters()):,}; "
            f"critic {self.trainable_params['critic']:,}"
        )

    # ---------------------------------------------------------------- forward passes
    @staticmethod
    def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions that skip left padding, matching what `generate` used."""
        return (attention_mask.cumsum(1) - 1).clamp(min=0)

    def _response_logits(self, model, sequences, attention_mask, response_length: int) -> torch.Tensor:
        out = model(
            input_ids=sequences,
            attention_mask=attention_mask,
            position_ids=self._position_ids(attention_mask),
            use_cache=False,
            logits_to_keep=response_length + 1,
        )
        return out.logits[:, :-1] / (self.hparams.temperature + 1e-7)

    def _values(self, sequences, attention_mask, response_length: int) -> torch.Tensor:
        critic = self.critic.get_base_model() if isinstance(self.critic, PeftModel) else self.critic
        backbone = getattr(critic, critic.base_model_prefix)
        hidden = backbone(
            input_ids=sequences, attention_mask=attention_mask, position_ids=self._position_ids(attention_mask)
        ).last_hidden_state
        return critic.score(hidden[:, -response_length - 1 : -1]).squeeze(-1).float()

    def _reference_logits(self, sequences, attention_mask, response_length: int) -> torch.Tensor:
        if self.ref_policy is not None:
            return self._response_logits(self.ref_policy, sequences, attention_mask, response_length)
        with self.policy.disable_adapter():
            return self._response_logits(self.policy, sequences, attention_mask, response_length)

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Scores read as the reward model was trained (max length, prompt budget from its export)."""
        return score_responses(
            self.reward_model, self.reward_tokenizer, prompts, responses, self.reward_scoring["max_length"],
            self.hparams.forward_batch_size, min_prompt_tokens=self.reward_scoring["min_prompt_tokens"],
        )

    # ---------------------------------------------------------------- rollout
    def _left_pad(self, id_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in id_lists)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in id_lists], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in id_lists], device=self.device)
        return ids, mask

    def _response_mask(self, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, has_eos): mask is 1 up to and including the first EOS. Pad may equal EOS (SmolLM2),
        so padding is found by position, not by token id."""
        is_eos = responses == self.tokenizer.eos_token_id
        has_eos = is_eos.any(1)
        full = torch.full_like(has_eos, responses.size(1), dtype=torch.long)
        length = torch.where(has_eos, is_eos.float().argmax(1).long() + 1, full)
        return (torch.arange(responses.size(1), device=responses.device) < length.unsqueeze(1)).long(), has_eos

    def _micro_batches(self, rows: torch.Tensor, attention: torch.Tensor, query_width: int):
        """Split `rows` into micro-batches of similar length, each cut to the columns it uses.

        Rows are sorted by real length, so a micro-batch of short prompts is not padded to the
        longest prompt of the batch (length-grouped dynamic padding). Yields (rows, columns,
        response_width): `columns` keeps the last left-padded query column onward and the response
        columns up to the longest response in the micro-batch.
        """
        rows = rows[attention[rows].sum(1).argsort(descending=True, stable=True)]
        for chunk in rows.split(self.hparams.forward_batch_size):
            used = attention[chunk].amax(0).nonzero().squeeze(1)
            first, last = int(used[0]), int(used[-1])
            response_width = max(last + 1 - query_width, 1)
            yield chunk, slice(min(first, query_width - 1), query_width + response_width), response_width

    @staticmethod
    def _pad_to(values: torch.Tensor, width: int, value: float = 0) -> torch.Tensor:
        return torch.nn.functional.pad(values, (0, width - values.size(1)), value=value)

    def generation_config(self) -> GenerationConfig:
        """Pure sampling at `temperature`, with nothing taken from the model's own generation_config.

        `generate` fills every field left unset from the model's `generation_config` (a repetition
        penalty, top-k, ...), which the training forward pass would not apply: the rollout's
        log-probs would then not be the policy's. Hence the model's config is replaced by this one.
        """
        config = GenerationConfig(
            do_sample=True,
            temperature=self.hparams.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=self.hparams.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        model = self.policy.get_base_model() if isinstance(self.policy, PeftModel) else self.policy
        model.generation_config = config
        return config

    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        """Generate responses and compute everything PPO needs about them, in micro-batches.

        The policy's log-probs and entropy are collected while `generate` samples (KV cache, eval
        mode; `SampledTokenStats`), so the policy needs no second forward pass over the rollout.
        """
        hp = self.hparams
        # longest prompts first: each generation micro-batch is padded to similar lengths only
        order = sorted(range(len(batch["input_ids"])), key=lambda i: -len(batch["input_ids"][i]))
        prompts = [batch["prompt"][i] for i in order]
        queries, query_mask = self._left_pad([batch["input_ids"][i] for i in order])
        generation = self.generation_config()
        self.policy.eval()
        self.critic.eval()
        responses, logprobs, entropy = [], [], []
        chunk = hp.generation_batch_size or len(prompts)
        for q, m in zip(queries.split(chunk), query_mask.split(chunk)):
            start = int(m.amax(0).nonzero()[0])  # drop the columns that are padding for the whole chunk
            stats = SampledTokenStats(hp.temperature)
            out = self.policy.generate(
                input_ids=q[:, start:], attention_mask=m[:, start:], generation_config=generation,
                logits_processor=LogitsProcessorList([stats]),
            )
            responses.append(out[:, q.size(1) - start :])
            for values, kept in zip(stats.result(out), (logprobs, entropy)):
                kept.append(values)
        width = max(r.size(1) for r in responses)
        responses = torch.cat([self._pad_to(r, width, self.tokenizer.pad_token_id) for r in responses])
        logprobs = torch.cat([self._pad_to(v, width) for v in logprobs])
        entropy = torch.cat([self._pad_to(v, width) for v in entropy])
        mask, has_eos = self._response_mask(responses)
        responses = responses.masked_fill(mask == 0, self.tokenizer.pad_token_id)
        sequences = torch.cat([queries, responses], 1)
        attention = torch.cat([query_mask, mask], 1)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)

        ref_logprobs, values = torch.zeros_like(mask, dtype=torch.float), torch.zeros_like(mask, dtype=torch.float)
        all_rows = torch.arange(len(prompts), device=mask.device)
        for rows, columns, response_width in self._micro_batches(all_rows, attention, queries.size(1)):
            s, a = sequences[rows, columns], attention[rows, columns]
            r = responses[rows, :response_width]
            ref_logprobs[rows, :response_width] = logprobs_from_logits(self._reference_logits(s, a, response_width), r)
            values[rows, :response_width] = self._values(s, a, response_width)
        scores = self.score(prompts, texts)
        rollout = {
            "sequences": sequences,
            "attention_mask": attention,
            "query_width": queries.size(1),
            "responses": responses,
            "mask": mask.float(),
            "logprobs": logprobs,
            "ref_logprobs": ref_logprobs,
            "values": values,
            "entropy": entropy,
            "scores": scores,
            "prompts": prompts,
            "texts": texts,
            "has_eos": has_eos,
        }
        if hp.missing_eos_penalty is not None:
            rollout["scores"] = rollout["scores"] - hp.missing_eos_penalty * (~rollout["has_eos"]).float()
        return rollout

    # ---------------------------------------------------------------- PPO iteration
    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp = self.hparams
        started = time.perf_counter()
        ro = self.rollout(batch)
        rollout_seconds = time.perf_counter() - started
        mask = ro["mask"]
        kl = kl_estimate(ro["logprobs"], ro["ref_logprobs"], hp.kl_estimator) * mask
        kl_per_token = masked_mean(kl, mask, sum_across=self._sum_across_ranks)
        non_finite = self._sum_across_ranks((~torch.isfinite(ro["scores"])).sum() + (~torch.isfinite(kl_per_token)))
        if non_finite > 0:  # every rank sees the global count, so all stop together (no rank hangs)
            raise NonFiniteError(
                f"PPO iteration {batch_idx}: the reward model returned non-finite scores or the KL is "
                "non-finite. Check the reward model folder (reward_model_path) and lower the learning rate; "
                "training stopped instead of optimising garbage."
            )
        kl_coef = self.kl_controller.value
        rewards, non_score_reward = token_rewards(ro["scores"], kl, mask, kl_coef)
        if hp.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, sum_across=self._sum_across_ranks)
        advantages, returns = gae(rewards, ro["values"], mask, hp.gamma, hp.lam)
        advantages = masked_whiten(advantages, mask, sum_across=self._sum_across_ranks)
        stats = self._optimise(ro, advantages, returns)
        # the global KL and batch size: every rank takes the same controller step
        global_batch = mask.size(0) * self.trainer.world_size
        self.kl_controller.horizon = kl_horizon_for_run(
            self.trainer.estimated_stepping_batches * global_batch, hp.kl_horizon_fraction
        )
        self.kl_controller.update(kl_per_token.item(), n_steps=global_batch)

        metrics = {
            "objective/kl": kl.sum(1).mean(),
            "objective/kl_per_token": kl_per_token,
            "objective/entropy": (ro["entropy"] * mask).sum(1).mean(),
            "objective/non_score_reward": non_score_reward.sum(1).mean(),
            "objective/rlhf_reward": (ro["scores"] + non_score_reward.sum(1)).mean(),
            "objective/scores": ro["scores"].mean(),
            "val/num_eos_tokens": ro["has_eos"].sum().float(),
            "val/truncated_share": (~ro["has_eos"]).float().mean(),
            "val/response_length": mask.sum(1).mean(),
            "kl_coef": torch.tensor(kl_coef),
            "time/rollout_s": torch.tensor(rollout_seconds),
            "time/iteration_s": torch.tensor(time.perf_counter() - started),
            **stats,
        }
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, batch_size=mask.size(0), sync_dist=True)
        self.log("objective/scores_pb", metrics["objective/scores"], prog_bar=True, logger=False)
        if hp.sample_every_n_steps and self.trainer.fit_loop.epoch_loop._batches_that_stepped % hp.sample_every_n_steps == 0:
            rows = [[p, t, f"{s:.3f}"] for p, t, s in zip(ro["prompts"][:4], ro["texts"][:4], ro["scores"][:4].tolist())]
            log_table(self.trainer, "samples/ppo", ["prompt", "response", "score"], rows, echo=False)

    def _sum_across_ranks(self, total: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(total, reduce_op="sum") if self.trainer.world_size > 1 else total

    def _optimise(self, ro: dict, advantages: torch.Tensor, returns: torch.Tensor) -> dict:
        """`ppo_epochs` passes of clipped updates in mini-batches, each accumulated over micro-batches.

        The losses are sums over a micro-batch's tokens divided by the mini-batch's token count
        (global under DDP, times the world size since DDP averages gradients): a token mean over
        the mini-batch, the same for any `forward_batch_size`. Statistics are token-weighted means.
        """
        hp = self.hparams
        opt_policy, opt_value = self.optimizers()
        batch = advantages.size(0)
        mini = hp.mini_batch_size or batch
        totals = {"policy/approxkl_avg": 0.0, "policy/clipfrac_avg": 0.0, "loss/policy_avg": 0.0,
                  "loss/value_avg": 0.0, "val/clipfrac_avg": 0.0, "val/ratio": 0.0}
        n_mini = 0
        self.policy.eval()  # no dropout, as in the rollout (see the module docstring)
        self.critic.eval()
        for _ in range(hp.ppo_epochs):
            order = torch.randperm(batch, device=advantages.device)
            for mini_idx in order.split(mini):
                opt_policy.zero_grad()
                opt_value.zero_grad()
                local_tokens = ro["mask"][mini_idx].sum()
                n_tokens = self._sum_across_ranks(local_tokens.clone()).clamp(min=1) / self.trainer.world_size
                non_finite = torch.zeros((), device=advantages.device)
                for idx, columns, response_width in self._micro_batches(mini_idx, ro["attention_mask"], ro["query_width"]):
                    seq, att = ro["sequences"][idx, columns], ro["attention_mask"][idx, columns]
                    m = ro["mask"][idx, :response_width]
                    logits = self._response_logits(self.policy, seq, att, response_width)
                    new_logprobs = logprobs_from_logits(logits, ro["responses"][idx, :response_width])
                    del logits
                    kept = (idx, slice(0, response_width))
                    pl = ppo_policy_loss(
                        new_logprobs, ro["logprobs"][kept], advantages[kept], m, hp.clip_range, n_tokens
                    )
                    new_values = self._values(seq, att, response_width)
                    vl, v_clipfrac = ppo_value_loss(
                        new_values, ro["values"][kept], returns[kept], m, hp.clip_range_value, n_tokens
                    )
                    loss = pl.loss + vl
                    non_finite += ~torch.isfinite(loss.detach())
                    self.manual_backward(loss)
                    share = m.sum() / local_tokens.clamp(min=1)
                    totals["loss/policy_avg"] += pl.loss.detach() * n_tokens / local_tokens.clamp(min=1)
                    totals["loss/value_avg"] += vl.detach() * n_tokens / local_tokens.clamp(min=1)
                    for key, value in (("policy/approxkl_avg", pl.approxkl), ("policy/clipfrac_avg", pl.clipfrac),
                                       ("val/clipfrac_avg", v_clipfrac), ("val/ratio", pl.ratio)):
                        totals[key] += value.detach() * share
                if self._sum_across_ranks(non_finite) > 0:  # all ranks stop together
                    raise NonFiniteError("PPO loss became NaN/inf: lower policy/value learning rates or max_grad_norm.")
                self.clip_gradients(opt_policy, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                self.clip_gradients(opt_value, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                opt_policy.step()
                opt_value.step()
                n_mini += 1
        return {key: value / n_mini for key, value in totals.items()}

    def configure_optimizers(self):
        policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        critic_params = [p for p in self.critic.parameters() if p.requires_grad]
        return self.policy_optimizer(policy_params), self.value_optimizer(critic_params)

    # ---------------------------------------------------------------- checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only trainable weights: the reference and reward model reload from their paths."""
        trainable = {f"{name}" for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["kl_controller"] = self.kl_controller.state_dict()
        lora = checkpoint["hyper_parameters"].get("lora")  # a dataclass or, from the CLI, a Namespace
        if lora is not None and not isinstance(lora, dict):
            checkpoint["hyper_parameters"]["lora"] = asdict(lora) if is_dataclass(lora) else lora.as_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "kl_controller" in checkpoint:
            self.kl_controller.load_state_dict(checkpoint["kl_controller"])

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            self.export(Path(self.trainer.default_root_dir))

    def export(self, root: Path) -> Path:
        """Full variant -> `<root>/policy` (HF folder); LoRA -> `<root>/policy_adapter` (peft folder)."""
        folder = root / ("policy_adapter" if self.hparams.lora else "policy")

        def save(staging: Path) -> None:
            self.policy.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)

        _save_atomically(folder, save)
        print(f"[lit_rlhf] exported the trained policy to {folder}")
        return folder

