"""Critic-free RLHF: GRPO and RLOO against the frozen reward model, full or LoRA.

Each prompt gets `num_generations` sampled responses; a response's advantage is its reward against
its siblings' (`lit_rlhf.rl.grpo`), so there is no value network to train or run: about half of
PPO's backward work per sample. Sampling, scoring, KL control, LoRA, checkpoints and export are
PPO's (`lit_rlhf.modules.online`). Metric names follow TRL's GRPOTrainer / RLOOTrainer where they
exist (`reward_std`, `frac_reward_zero_std`, `clip_ratio/region_mean`), the shared ones PPO's.
"""

import time

import torch
from lightning.pytorch.cli import OptimizerCallable
from pydantic import NonNegativeInt, PositiveInt

from lit_rlhf.errors import UserInputError
from lit_rlhf.models.hf import DEFAULT_MODEL
from lit_rlhf.models.policy import LoraSettings
from lit_rlhf.modules.online import OnlineRLModule
from lit_rlhf.rl.common import k3_kl
from lit_rlhf.rl.grpo import group_advantages, grpo_loss, leave_one_out_advantages, rloo_loss


class GRPOModule(OnlineRLModule):
    """GRPO: responses judged within their prompt's group, clipped updates, k3 KL in the loss.

    Each training step samples `num_generations` responses per prompt, normalises their rewards
    within the group, then runs `num_iterations` passes of clipped updates (`beta` x k3 KL added).

    Args:
        num_generations: responses per prompt (k, at least 2); a rollout is batch_size x k responses.
        num_iterations: passes over each rollout (TRL's name; 1 = on-policy, the ratio stays 1).
        beta: KL coefficient (TRL's name); with `kl_target` set it is the adaptive controller's start,
            and the controller measures the estimator the loss penalises (k3, `penalised_kl`).
        loss_type: "grpo" (mean over each response's tokens, then over responses) or "bnpo"
            (mean over all tokens), as in TRL.
        scale_rewards: divide advantages by the group's std ("group"), the batch's ("batch") or not ("none").
        epsilon_low, epsilon_high: the clip range of the ratio, 1 - low .. 1 + high.
        mini_batch_size: prompts per optimizer step, each with all its `num_generations` responses
            (default: the whole rollout batch).
        Other arguments as in `PPOModule`.
    """

    method = "GRPO"

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        reward_model_path: str = "runs/reward_model/reward_model",
        lora: LoraSettings | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        num_generations: PositiveInt = 4,
        forward_batch_size: PositiveInt = 16,
        generation_batch_size: PositiveInt | None = None,
        mini_batch_size: PositiveInt | None = None,
        num_iterations: PositiveInt = 1,
        max_new_tokens: PositiveInt = 128,
        temperature: float = 0.7,
        missing_eos_penalty: float | None = None,
        beta: float = 0.04,
        kl_target: float | None = None,
        kl_horizon_fraction: float = 0.04,
        loss_type: str = "grpo",
        scale_rewards: str = "group",
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        max_grad_norm: float = 1.0,
        reward_max_length: PositiveInt | None = None,
        sample_every_n_steps: NonNegativeInt = 5,
        trust_remote_code: bool = False,
        system_prompt: str | None = None,
    ):
        lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        if num_generations < 2:
            raise UserInputError(
                f"num_generations must be at least 2 (a response is compared with its siblings), not {num_generations}."
            )
        if loss_type not in {"grpo", "bnpo"} or scale_rewards not in {"group", "batch", "none"}:
            raise UserInputError(
                f"loss_type must be 'grpo' or 'bnpo' (got '{loss_type}') and scale_rewards 'group', 'batch' "
                f"or 'none' (got '{scale_rewards}')."
            )
        super().__init__(
            model_name_or_path,
            reward_model_path,
            lora,
            forward_batch_size,
            generation_batch_size,
            max_new_tokens,
            temperature,
            missing_eos_penalty,
            beta,
            kl_target,
            kl_horizon_fraction,
            reward_max_length,
            trust_remote_code,
            system_prompt=system_prompt,
        )
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer = optimizer
        self.describe_trainable()

    def penalised_kl(self) -> str:
        """The KL estimator the objective penalises (k3, in the loss): the one the adaptive controller
        steers `beta` on and the one logged as `objective/kl*`."""
        return "k3"

    def advantages(self, ro: dict, kl: torch.Tensor) -> torch.Tensor:
        return group_advantages(ro["scores"], self.hparams.num_generations, self.hparams.scale_rewards)

    def micro_loss(self, ro: dict, advantages: torch.Tensor):
        hp = self.hparams

        def loss(rows, columns, width, n_sequences, n_tokens):
            kept = (rows, slice(0, width))
            out = grpo_loss(
                self.policy_logprobs(ro, rows, columns, width),
                ro["logprobs"][kept],
                advantages[rows],
                ro["mask"][kept],
                hp.epsilon_low,
                hp.epsilon_high,
                self.kl_controller.value,
                ro["ref_logprobs"][kept],
                hp.loss_type,
                n_sequences,
                n_tokens,
            )
            own_mean = n_tokens / ro["mask"][kept].sum() if hp.loss_type == "bnpo" else n_sequences / len(rows)
            return out.loss, {"loss": out.loss * own_mean, "clip_ratio/region_mean": out.clipfrac, "kl": out.kl}

        return loss

    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp = self.hparams
        started = time.perf_counter()
        with torch.no_grad():
            ro = self.sample(batch, repeats=hp.num_generations)
            ro["ref_logprobs"] = self.reference_logprobs(ro)
            ro["scores"] = self.scores(ro)
        rollout_seconds = time.perf_counter() - started
        kl, kl_per_token = self.kl_penalty(ro, batch_idx, self.penalised_kl())
        advantages = self.advantages(ro, kl)
        self.policy.eval()  # no dropout, as in the rollout (see lit_rlhf.modules.online)
        loss, k = self.micro_loss(ro, advantages), hp.num_generations
        stats = self.update(ro, hp.num_iterations, hp.mini_batch_size, loss, hp.max_grad_norm, group_size=k)
        group_std = ro["scores"].view(-1, hp.num_generations).std(1)
        metrics = {"reward_std": group_std.mean(), "frac_reward_zero_std": (group_std < 1e-6).float().mean(), **stats}
        self.log_iteration(ro, kl, kl_per_token, started, rollout_seconds, metrics, batch_idx)
        self.update_kl_controller(kl_per_token, ro["mask"].size(0))

    def configure_optimizers(self):
        return self.optimizer([p for p in self.policy.parameters() if p.requires_grad])


class RLOOModule(GRPOModule):
    """RLOO (Ahmadian et al., 2024): leave-one-out advantages and a clipped ratio of whole responses.

    Args:
        kl_in: "reward" subtracts `beta` x the response's summed k1 KL from its reward before the
            baseline (TRL's RLOOTrainer); "loss" adds `beta` x its summed k3 KL to the loss instead.
        normalize_advantages: whiten the advantages over the batch (TRL's option).
        Other arguments as in `GRPOModule` (`loss_type` and `scale_rewards` do not apply).
    """

    method = "RLOO"

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        reward_model_path: str = "runs/reward_model/reward_model",
        lora: LoraSettings | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        num_generations: PositiveInt = 4,
        forward_batch_size: PositiveInt = 16,
        generation_batch_size: PositiveInt | None = None,
        mini_batch_size: PositiveInt | None = None,
        num_iterations: PositiveInt = 1,
        max_new_tokens: PositiveInt = 128,
        temperature: float = 0.7,
        missing_eos_penalty: float | None = None,
        beta: float = 0.05,
        kl_target: float | None = None,
        kl_horizon_fraction: float = 0.04,
        kl_in: str = "reward",
        normalize_advantages: bool = False,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        max_grad_norm: float = 1.0,
        reward_max_length: PositiveInt | None = None,
        sample_every_n_steps: NonNegativeInt = 5,
        trust_remote_code: bool = False,
        system_prompt: str | None = None,
    ):
        if kl_in not in {"reward", "loss"}:
            raise UserInputError(f"kl_in must be 'reward' or 'loss', not '{kl_in}'.")
        super().__init__(
            model_name_or_path,
            reward_model_path,
            lora,
            optimizer,
            num_generations,
            forward_batch_size,
            generation_batch_size,
            mini_batch_size,
            num_iterations,
            max_new_tokens,
            temperature,
            missing_eos_penalty,
            beta,
            kl_target,
            kl_horizon_fraction,
            "grpo",
            "none",
            epsilon_low,
            epsilon_high,
            max_grad_norm,
            reward_max_length,
            sample_every_n_steps,
            trust_remote_code,
            system_prompt,
        )

    def penalised_kl(self) -> str:
        """k1 when it is subtracted from the reward (`kl_in="reward"`), k3 when added to the loss."""
        return "k1" if self.hparams.kl_in == "reward" else "k3"

    def advantages(self, ro: dict, kl: torch.Tensor) -> torch.Tensor:
        rewards = ro["scores"]
        if self.hparams.kl_in == "reward":
            rewards = rewards - self.kl_controller.value * kl.sum(1)
        return leave_one_out_advantages(rewards, self.hparams.num_generations, self.hparams.normalize_advantages)

    def micro_loss(self, ro: dict, advantages: torch.Tensor):
        hp = self.hparams

        def loss(rows, columns, width, n_sequences, n_tokens):
            kept = (rows, slice(0, width))
            mask = ro["mask"][kept]
            logprobs = self.policy_logprobs(ro, rows, columns, width)
            out = rloo_loss(
                logprobs, ro["logprobs"][kept], advantages[rows], mask, hp.epsilon_low, hp.epsilon_high, n_sequences
            )
            total = out.loss
            if hp.kl_in == "loss":
                total = (
                    total
                    + self.kl_controller.value * (k3_kl(logprobs, ro["ref_logprobs"][kept]) * mask).sum() / n_sequences
                )
            return total, {"loss": total * n_sequences / len(rows), "clip_ratio/region_mean": out.clipfrac}

        return loss
