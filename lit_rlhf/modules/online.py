"""What every online RL method (PPO, GRPO, RLOO) shares, so each method module holds only its maths.

The policy is trained in full (the reference is a frozen copy) or through LoRA adapters (the
reference is the same network with its adapters disabled, no second copy). Responses are sampled
with their log-probs collected during `generate`, scored by the frozen reward model exactly as it
was trained (settings read from its export record; a response cut at `max_new_tokens` as an open
turn), and updates run on length-grouped micro-batches.

Every model runs in eval mode, updates included (as TRL disables dropout): with dropout on in the
updates and off in the rollout, the probability ratio at the first update would not be 1, and
clipping would fire on dropout noise. Hence LoRA here has no dropout setting.
"""

import math
import time
from collections.abc import Callable

import torch
from lightning.pytorch import LightningModule
from peft import PeftModel
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from lit_rlhf.artifacts import reward_model_scoring
from lit_rlhf.callbacks import ExportPolicy
from lit_rlhf.errors import NonFiniteError
from lit_rlhf.models.hf import load_sequence_scorer, load_tokenizer
from lit_rlhf.models.policy import (
    LoraSettings,
    count_trainable,
    freeze,
    keep_trainable_weights,
    peak_rss_gb,
    policy_and_reference,
)
from lit_rlhf.models.scoring import score_responses
from lit_rlhf.rl.common import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    kl_estimate,
    kl_horizon_for_run,
    logprobs_from_logits,
    masked_mean,
)
from lit_rlhf.tables import log_table
from lit_rlhf.text import pad_sequences, require_system_prompt_renders


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


# One micro-batch's loss: (rows, columns, response_width, n_sequences, n_tokens) -> (loss, {stat: value}).
MicroLoss = Callable[[torch.Tensor, slice, int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


class OnlineRLModule(LightningModule):
    """Policy, reference, frozen reward model, sampling, scoring, KL control, updates and export.

    Subclasses implement `training_step` with `sample`, `reference_logprobs`, `scores`,
    `kl_penalty` and `update`, and log through `log_iteration`.
    """

    method = "online RL"

    def __init__(
        self,
        model_name_or_path: str,
        reward_model_path: str,
        lora: LoraSettings | None,
        forward_batch_size: int,
        generation_batch_size: int | None,
        max_new_tokens: int,
        temperature: float,
        missing_eos_penalty: float | None,
        kl_coef: float,
        kl_target: float | None,
        kl_horizon_fraction: float,
        reward_max_length: int | None,
        trust_remote_code: bool,
        system_prompt: str | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only what training changes, see on_save_checkpoint
        self.tokenizer = load_tokenizer(model_name_or_path, padding_side="left", trust_remote_code=trust_remote_code)
        self.reward_tokenizer = load_tokenizer(
            reward_model_path,
            padding_side="right",
            trust_remote_code=trust_remote_code,
            option="model.reward_model_path",
        )
        require_system_prompt_renders(self.tokenizer, system_prompt)  # before loading any weights
        self.policy, self.ref_policy = policy_and_reference(model_name_or_path, lora, trust_remote_code)
        self.reward_model = freeze(
            load_sequence_scorer(
                reward_model_path, self.reward_tokenizer.pad_token_id, trust_remote_code, trained_head=True
            )
        )
        self.reward_scoring = reward_model_scoring(reward_model_path)
        if reward_max_length is not None and reward_max_length != self.reward_scoring["max_length"]:
            print(
                f"[lit_rlhf] warning: scoring with reward_max_length {reward_max_length}, but the reward model "
                f"was trained with max length {self.reward_scoring['max_length']} ({reward_model_path})."
            )
            self.reward_scoring["max_length"] = reward_max_length
        # The adaptive controller's horizon follows the run's length (set at each update).
        self.kl_controller = (
            AdaptiveKLController(kl_coef, kl_target, 1) if kl_target is not None else FixedKLController(kl_coef, 0.0, 1)
        )
        self.trainable_params = {"policy": count_trainable(self.policy)}
        self.settings = dict(
            forward_batch_size=forward_batch_size,
            generation_batch_size=generation_batch_size,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            missing_eos_penalty=missing_eos_penalty,
            kl_horizon_fraction=kl_horizon_fraction,
        )
        names = [n for n, p in self.policy.named_parameters() if p.requires_grad]
        if lora is not None and not all("lora_" in n for n in names):
            raise AssertionError(f"LoRA variant trains non-adapter policy weights: {names[:3]}")

    def describe_trainable(self) -> None:
        total = sum(p.numel() for p in self.policy.parameters())
        extra = "".join(f"; {name} {n:,}" for name, n in self.trainable_params.items() if name != "policy")
        variant = "LoRA" if self.hparams.lora else "full"
        print(
            f"[lit_rlhf] {self.method} {variant}: trainable policy params "
            f"{self.trainable_params['policy']:,} / {total:,}{extra}"
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
        return out.logits[:, :-1] / (self.settings["temperature"] + 1e-7)

    def _reference_logits(self, sequences, attention_mask, response_length: int) -> torch.Tensor:
        if self.ref_policy is not None:
            return self._response_logits(self.ref_policy, sequences, attention_mask, response_length)
        with self.policy.disable_adapter():
            return self._response_logits(self.policy, sequences, attention_mask, response_length)

    def policy_logprobs(self, ro: dict, rows: torch.Tensor, columns: slice, response_width: int) -> torch.Tensor:
        """The current policy's log-probs of a micro-batch's response tokens (with gradients)."""
        seq, att = ro["sequences"][rows, columns], ro["attention_mask"][rows, columns]
        logits = self._response_logits(self.policy, seq, att, response_width)
        return logprobs_from_logits(logits, ro["responses"][rows, :response_width])

    def score(self, prompts: list, responses: list[str], ended: list[bool]) -> torch.Tensor:
        """Scores read as the reward model was trained (max length, prompt budget from its export);
        a response that did not end (no EOS) is scored as the open turn it is."""
        return score_responses(
            self.reward_model,
            self.reward_tokenizer,
            prompts,
            responses,
            self.reward_scoring["max_length"],
            self.settings["forward_batch_size"],
            min_prompt_tokens=self.reward_scoring["min_prompt_tokens"],
            ended=ended,
        )

    # ---------------------------------------------------------------- sampling
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
        for chunk in rows.split(self.settings["forward_batch_size"]):
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
            temperature=self.settings["temperature"],
            top_k=0,
            top_p=1.0,
            max_new_tokens=self.settings["max_new_tokens"],
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        model = self.policy.get_base_model() if isinstance(self.policy, PeftModel) else self.policy
        model.generation_config = config
        return config

    @torch.no_grad()
    def sample(self, batch: dict, repeats: int = 1) -> dict:
        """Sample `repeats` responses per prompt (the copies of a prompt stay adjacent), with each
        sampled token's log-prob and entropy collected during `generate` (KV cache, eval mode)."""
        ids = [ids for ids in batch["input_ids"] for _ in range(repeats)]
        texts = [prompt for prompt in batch["prompt"] for _ in range(repeats)]
        # longest prompts first (stable: a prompt's copies stay together), so generation chunks pad little
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        prompts = [texts[i] for i in order]
        queries, query_mask = pad_sequences(
            [ids[i] for i in order], self.tokenizer.pad_token_id, side="left", device=self.device
        )
        generation = self.generation_config()
        self.policy.eval()
        responses, logprobs, entropy = [], [], []
        chunk = self.settings["generation_batch_size"] or len(prompts)
        for q, m in zip(queries.split(chunk), query_mask.split(chunk)):
            start = int(m.amax(0).nonzero()[0])  # drop the columns that are padding for the whole chunk
            stats = SampledTokenStats(self.settings["temperature"])
            out = self.policy.generate(
                input_ids=q[:, start:],
                attention_mask=m[:, start:],
                generation_config=generation,
                logits_processor=LogitsProcessorList([stats]),
            )
            responses.append(out[:, q.size(1) - start :])
            for values, kept in zip(stats.result(out), (logprobs, entropy)):
                kept.append(values)
        width = max(r.size(1) for r in responses)
        responses = torch.cat([self._pad_to(r, width, self.tokenizer.pad_token_id) for r in responses])
        mask, has_eos = self._response_mask(responses)
        responses = responses.masked_fill(mask == 0, self.tokenizer.pad_token_id)
        return {
            "sequences": torch.cat([queries, responses], 1),
            "attention_mask": torch.cat([query_mask, mask], 1),
            "query_width": queries.size(1),
            "responses": responses,
            "mask": mask.float(),
            "logprobs": torch.cat([self._pad_to(v, width) for v in logprobs]),
            "entropy": torch.cat([self._pad_to(v, width) for v in entropy]),
            "prompts": prompts,
            "texts": self.tokenizer.batch_decode(responses, skip_special_tokens=True),
            "has_eos": has_eos,
        }

    @torch.no_grad()
    def reference_logprobs(self, ro: dict) -> torch.Tensor:
        ref = torch.zeros_like(ro["mask"])
        all_rows = torch.arange(ro["mask"].size(0), device=ro["mask"].device)
        for rows, columns, width in self._micro_batches(all_rows, ro["attention_mask"], ro["query_width"]):
            s, a = ro["sequences"][rows, columns], ro["attention_mask"][rows, columns]
            ref[rows, :width] = logprobs_from_logits(self._reference_logits(s, a, width), ro["responses"][rows, :width])
        return ref

    def scores(self, ro: dict) -> torch.Tensor:
        """Reward-model scores (cut responses scored as open turns), less `missing_eos_penalty` (TRL's
        meaning) for responses cut at `max_new_tokens`."""
        scores = self.score(ro["prompts"], ro["texts"], ro["has_eos"].tolist())
        penalty = self.settings["missing_eos_penalty"]
        return scores if penalty is None else scores - penalty * (~ro["has_eos"]).float()

    # ---------------------------------------------------------------- KL and updates
    def kl_penalty(self, ro: dict, step: int, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token KL to the reference on response tokens, its global per-token mean); stops every
        rank together (the non-finite count is all-reduced) when a score or the KL is not finite."""
        kl = kl_estimate(ro["logprobs"], ro["ref_logprobs"], estimator) * ro["mask"]
        kl_per_token = masked_mean(kl, ro["mask"], sum_across=self._sum_across_ranks)
        if self._sum_across_ranks((~torch.isfinite(ro["scores"])).sum() + (~torch.isfinite(kl_per_token))) > 0:
            raise NonFiniteError(
                f"{self.method} iteration {step}: the reward model returned non-finite scores or the KL is "
                "non-finite. Check the reward model folder (reward_model_path) and lower the learning rate; "
                "training stopped instead of optimising garbage."
            )
        return kl, kl_per_token

    def update_kl_controller(self, kl_per_token: torch.Tensor, rows: int) -> None:
        """One controller step on the global KL and batch (every rank takes the same step)."""
        global_batch = rows * self.trainer.world_size
        self.kl_controller.horizon = kl_horizon_for_run(
            self._run_iterations() * global_batch, self.settings["kl_horizon_fraction"]
        )
        self.kl_controller.update(kl_per_token.item(), n_steps=global_batch)

    def _run_iterations(self) -> int:
        """Iterations (training steps) of the whole run: `max_epochs` passes over the prompts, or
        fewer when `max_steps` (which counts optimizer steps, several per iteration) ends it first."""
        trainer = self.trainer
        iterations = trainer.num_training_batches * trainer.max_epochs if trainer.max_epochs > 0 else math.inf
        if trainer.max_steps > 0:
            iterations = min(iterations, math.ceil(trainer.max_steps / self._optimizer_steps_per_iteration))
        return int(iterations)

    def _sum_across_ranks(self, total: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(total, reduce_op="sum") if self.trainer.world_size > 1 else total

    def update(
        self,
        ro: dict,
        epochs: int,
        mini_batch_size: int | None,
        micro_loss: MicroLoss,
        max_grad_norm: float,
        group_size: int = 1,
    ) -> dict:
        """`epochs` passes over the rollout in shuffled mini-batches of `mini_batch_size` prompts (all
        their `group_size` adjacent responses together; None: the whole rollout), one optimizer step
        each, gradients accumulated over length-grouped micro-batches.

        `micro_loss` gets the mini-batch's sequence and token counts (global under DDP, divided
        by the world size since DDP averages gradients) and returns sums over its rows divided by
        them, so a mini-batch's loss does not depend on `forward_batch_size`. Statistics are
        token-weighted means over each mini-batch, averaged over mini-batches; approx-KL statistics
        are also given for the first epoch alone (`..._first_epoch`).
        """
        optimizers = self.optimizers()
        optimizers = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
        mask = ro["mask"]
        batch = mask.size(0)
        totals: dict[str, torch.Tensor] = {}
        n_mini, first_epoch = 0, {}
        groups, members = batch // group_size, torch.arange(group_size, device=mask.device)
        for epoch in range(epochs):
            for chosen in torch.randperm(groups, device=mask.device).split(mini_batch_size or groups):
                mini_idx = (chosen.unsqueeze(1) * group_size + members).flatten()
                for optimizer in optimizers:
                    optimizer.zero_grad()
                local_tokens = mask[mini_idx].sum()
                world = self.trainer.world_size
                n_sequences = self._sum_across_ranks(torch.tensor(float(len(mini_idx)), device=mask.device)) / world
                n_tokens = self._sum_across_ranks(local_tokens.clone()).clamp(min=1) / world
                non_finite = torch.zeros((), device=mask.device)
                for rows, columns, width in self._micro_batches(mini_idx, ro["attention_mask"], ro["query_width"]):
                    loss, stats = micro_loss(rows, columns, width, n_sequences, n_tokens)
                    non_finite += ~torch.isfinite(loss.detach())
                    self.manual_backward(loss)
                    share = mask[rows].sum() / local_tokens.clamp(min=1)
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + value.detach() * share
                if self._sum_across_ranks(non_finite) > 0:  # all ranks stop together
                    raise NonFiniteError(
                        f"{self.method} loss became NaN/inf: lower the learning rate(s) or max_grad_norm."
                    )
                for optimizer in optimizers:
                    self.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
                    optimizer.step()
                n_mini += 1
            if epoch == 0:  # the ratio's first pass: approx KL here is ~0 unless rollout and update differ
                first_epoch = {
                    f"{key}_first_epoch": value / n_mini for key, value in totals.items() if "approxkl" in key
                }
        self._optimizer_steps_per_iteration = n_mini * len(optimizers)
        return {**{key: value / n_mini for key, value in totals.items()}, **first_epoch}

    def log_iteration(
        self,
        ro: dict,
        kl: torch.Tensor,
        kl_per_token: torch.Tensor,
        started: float,
        rollout_seconds: float,
        metrics: dict,
        batch_idx: int,
    ) -> None:
        """The metrics every method logs (TRL's names), then the method's own, and a few samples."""
        mask = ro["mask"]
        common = {
            "objective/kl": kl.sum(1).mean(),
            "objective/kl_per_token": kl_per_token,
            "objective/entropy": (ro["entropy"] * mask).sum(1).mean(),
            "objective/scores": ro["scores"].mean(),
            "val/num_eos_tokens": ro["has_eos"].sum().float(),
            "val/truncated_share": (~ro["has_eos"]).float().mean(),
            "val/response_length": mask.sum(1).mean(),
            "kl_coef": torch.tensor(self.kl_controller.value),
            "time/rollout_s": torch.tensor(rollout_seconds),
            "time/iteration_s": torch.tensor(time.perf_counter() - started),
            "perf/peak_rss_gb": torch.tensor(peak_rss_gb()),
        }
        self.log_dict({**common, **metrics}, on_step=True, on_epoch=False, batch_size=mask.size(0), sync_dist=True)
        self.log("objective/scores_pb", common["objective/scores"], prog_bar=True, logger=False)
        every = self.hparams.sample_every_n_steps
        if every and batch_idx % every == 0:
            rows = [
                [p, t, f"{s:.3f}"] for p, t, s in zip(ro["prompts"][:4], ro["texts"][:4], ro["scores"][:4].tolist())
            ]
            log_table(self.trainer, f"samples/{type(self).__name__}", ["prompt", "response", "score"], rows, echo=False)

    # ---------------------------------------------------------------- checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only trainable weights: the reference and reward model reload from their paths."""
        keep_trainable_weights(self, checkpoint)
        checkpoint["kl_controller"] = self.kl_controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "kl_controller" in checkpoint:
            self.kl_controller.load_state_dict(checkpoint["kl_controller"])

    def export_record(self) -> dict:
        """What the evaluation must know about the exported policy: the system instruction its prompts
        carried in training (the evaluation gives it to this policy and to the base model alike)."""
        return {"system_prompt": self.hparams.system_prompt}

    def configure_callbacks(self):
        return [ExportPolicy()]
