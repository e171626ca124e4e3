"""RL-lite: REINFORCE on a TinyGPT towards the reference report's keyword + length reward."""

import copy

import torch
from lightning.pytorch.cli import OptimizerCallable
from pydantic import PositiveInt

from lit_rlhf.errors import UserInputError, require_finite
from lit_rlhf.rl.common import masked_mean
from lit_rlhf.rl.reinforce import keyword_length_reward, reinforce_loss, token_statistics, update_baseline
from lit_rlhf.tables import log_table
from lit_rlhf.tinygpt.pretrain import TinyGPTModule


def distinct_char_fraction(text: str) -> float:
    """Distinct characters / characters: ~0.3-0.5 for a line of prose, near 0 for "ssssss"."""
    return len(set(text)) / len(text) if text else 0.0


class RLLiteModule(TinyGPTModule):
    """REINFORCE from a TinyGPT-family checkpoint (`init_from`: SFT or pretraining).

    Each step samples `samples_per_prompt` completions of every prompt of the batch (a
    completion ends at `stop_char` or after `max_new_chars`), rewards them with
    `keyword_length_reward`, and takes one gradient step on the token-level REINFORCE loss with a
    per-prompt moving-average baseline, an entropy bonus and a KL penalty to the frozen start model.
    The sampled tokens are re-scored on-policy (same temperature, same cropped context as at
    sampling), so the gradient is the true REINFORCE gradient of the sampling policy.

    Why the report's run could not learn: it drew one completion per step for 40 steps, and a
    char-level model trained on WikiText writes "data" about once in 10^4 completions (the word
    is 3 times in 1.2M characters of the corpus), so every reward was length shaping only.
    Dozens of samples per step are not enough either; `partial_credit` > 0 rewards the keyword's
    prefixes ("d", "da", "dat"), which the model does write, so the policy is led towards the
    keyword. `train/keyword_rate` always counts the whole keyword only.
    """

    def __init__(
        self,
        init_from: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        keyword: str = "data",
        target_len: PositiveInt = 60,
        length_weight: float = 0.25,
        partial_credit: float = 0.0,
        samples_per_prompt: PositiveInt = 16,
        max_new_chars: PositiveInt = 80,
        temperature: float = 1.0,
        stop_char: str | None = "\n",
        baseline_momentum: float = 0.9,
        entropy_coef: float = 0.0,
        kl_coef: float = 0.0,
        log_samples_every_n_steps: PositiveInt = 50,
        **kwargs,
    ):
        super().__init__(init_from=init_from, optimizer=optimizer, **kwargs)
        if self.model is None:
            raise UserInputError("RL-lite starts from a TinyGPT checkpoint: set model.init_args.init_from.")
        if temperature <= 0:
            raise UserInputError(f"RL-lite samples its completions: temperature must be > 0, got {temperature}.")
        self.ref_model = copy.deepcopy(self.model).requires_grad_(False)
        self.baselines: dict[str, float] = {}

    @torch.no_grad()
    def sample_completions(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(prompt + completion ids (n, P + T), completion mask (n, T) up to and including the
        stop character, completion texts without it)."""
        hp = self.hparams
        prompt_ids = self.tokenizer.encode(prompt).to(self.device)
        was_training = self.model.training
        self.model.eval()
        seqs = self.model.generate(
            prompt_ids.expand(hp.samples_per_prompt, -1), hp.max_new_chars, temperature=hp.temperature
        )
        self.model.train(was_training)
        completion = seqs[:, len(prompt_ids) :]
        stop_id = self.tokenizer.index.get(hp.stop_char) if hp.stop_char else None
        is_stop = completion == stop_id if stop_id is not None else torch.zeros_like(completion, dtype=torch.bool)
        stops_before = is_stop.long().cumsum(1) - is_stop.long()
        mask = stops_before == 0
        lengths = (mask & ~is_stop).sum(1).tolist()
        texts = [self.tokenizer.decode(row[:n]) for row, n in zip(completion, lengths)]
        return seqs, mask, texts

    def training_step(self, batch: list[str], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        stats, rewards_all, texts_all, rows = [], [], [], []
        for prompt in batch:
            seqs, mask, texts = self.sample_completions(prompt)
            reward_args = (hp.keyword, hp.target_len, hp.length_weight, hp.partial_credit)
            rewards = torch.tensor([keyword_length_reward(t, *reward_args) for t in texts], device=self.device)
            baseline = self.baselines.get(prompt)
            advantages = rewards - (rewards.mean() if baseline is None else baseline)
            self.baselines[prompt] = update_baseline(baseline, rewards, hp.baseline_momentum)
            start = seqs.size(1) - mask.size(1) - 1  # the position that predicts the first completion token
            logits = self.model.sliding_logits(seqs[:, :-1])[:, start:] / hp.temperature
            with torch.no_grad():
                ref_logits = self.ref_model.sliding_logits(seqs[:, :-1])[:, start:] / hp.temperature
            logprobs, entropy, kl = token_statistics(logits, ref_logits, seqs[:, start + 1 :])
            stats.append((logprobs, advantages, mask, entropy, kl))
            rewards_all.append(rewards)
            texts_all += texts
            rows += [[prompt, t, f"{r:.3f}"] for t, r in zip(texts[:2], rewards[:2].tolist())]
        logprobs, advantages, mask, entropy, kl = (torch.cat(parts) for parts in zip(*stats))
        rewards = torch.cat(rewards_all)
        require_finite(
            "train/reward",
            rewards,
            self.global_step,
            "Check the reward settings (target_len, length_weight, partial_credit).",
        )
        loss = reinforce_loss(logprobs, advantages, mask, entropy, kl, hp.entropy_coef, hp.kl_coef)
        require_finite("train/loss", loss, self.global_step)
        n = len(texts_all)
        self.log_dict(
            {
                "train/loss": loss,
                "train/reward": rewards.mean(),
                "train/keyword_rate": sum(hp.keyword.lower() in t.lower() for t in texts_all) / n,
                "train/kl": masked_mean(kl, mask),
                "train/entropy": masked_mean(entropy, mask),
                "train/mean_length": sum(map(len, texts_all)) / n,
                "train/distinct_char_frac": sum(map(distinct_char_fraction, texts_all)) / n,
            },
            prog_bar=True,
            batch_size=n,
        )
        if self.global_step % hp.log_samples_every_n_steps == 0:
            log_table(self.trainer, "samples/rl_lite", ["prompt", "completion", "reward"], rows)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Pretraining's tokens/s does not apply: an RL step is dominated by sampling."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rl_baselines"] = dict(self.baselines)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.baselines = dict(checkpoint.get("rl_baselines", {}))
