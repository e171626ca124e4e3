"""DPO (or IPO) fine-tuning of a causal LM on preference pairs: offline, no reward model, no sampling.

The pairs are the reward model's (`PreferenceDataModule`: prompt + response through the chat template,
chosen rows then rejected rows in one right-padded batch); only response tokens are scored. One
module, full or LoRA like PPO: `lora: null` trains every weight against a frozen copy; with `lora`
set only the adapters train and the reference is the same network with its adapters disabled.
Metrics carry TRL's DPOTrainer names under this repo's stage prefixes (`train/rewards/accuracies`
is TRL's `rewards/accuracies`, `val/...` its `eval_...`). The final policy is exported like PPO's
(`policy/` or `policy_adapter/`), so `lit_rlhf.evaluate` loads it as a PPO variant.

The policy runs in eval mode, updates included (as TRL disables dropout): with dropout the policy's
log-probs at step 0 would differ from the reference's and the implicit rewards would start on noise.
"""

import time

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable

from lit_rlhf.callbacks import ExportPolicy
from lit_rlhf.errors import UserInputError, require_finite
from lit_rlhf.models.hf import DEFAULT_MODEL, load_tokenizer
from lit_rlhf.models.policy import LoraSettings, keep_trainable_weights, peak_rss_gb, policy_and_reference
from lit_rlhf.rl.common import logprobs_from_logits
from lit_rlhf.rl.dpo import dpo_loss, implicit_rewards, ipo_loss, response_token_mask, sequence_logps

LOSS_TYPES = ("sigmoid", "ipo")


class DPOModule(LightningModule):
    """Direct Preference Optimization (Rafailov et al. 2023) and its IPO variant (Azar et al. 2023).

    Args:
        model_name_or_path: the starting policy (hub id, local folder or `embedded:smollm2`); also
            the reference.
        lora: LoRA settings for the policy; None trains all weights (the "full" variant).
        loss_type: `sigmoid` (DPO) or `ipo` (`lit_rlhf.rl.dpo.ipo_loss`, beta is IPO's tau).
        beta: strength of the pull towards the reference (DPO's beta).
        label_smoothing: probability that a label is flipped (conservative DPO; sigmoid only).
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        lora: LoraSettings | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        if isinstance(lora, dict):  # as stored in checkpoints (plain types load with weights_only=True)
            lora = LoraSettings(**lora)
        self.save_hyperparameters(ignore=["optimizer"])
        self.strict_loading = False  # checkpoints hold only what training changes, see on_save_checkpoint
        if loss_type not in LOSS_TYPES:
            raise UserInputError(f"loss_type must be one of {LOSS_TYPES}, not '{loss_type}'.")
        if beta <= 0:
            raise UserInputError(f"beta must be positive (0.1 is usual for DPO), got {beta}.")
        if not 0 <= label_smoothing < 0.5:
            raise UserInputError(f"label_smoothing must be in [0, 0.5) (0 = plain DPO), got {label_smoothing}.")
        if label_smoothing and loss_type != "sigmoid":
            raise UserInputError(f"label_smoothing applies to loss_type 'sigmoid' only; set it to 0 for '{loss_type}'.")
        self.optimizer = optimizer
        self.tokenizer = load_tokenizer(model_name_or_path, padding_side="right", trust_remote_code=trust_remote_code)
        self.policy, self.ref_policy = policy_and_reference(model_name_or_path, lora, trust_remote_code)
        self.policy.eval()  # kept: Lightning restores each submodule's own mode after validation

    def response_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob of each row's response, its token count), each (2B,).

        Logits are computed only from the first column any row's response needs (`logits_to_keep`):
        the prompts' (B, T, V) logits are never built.
        """
        ids, attention = batch["input_ids"], batch["attention_mask"]
        mask = response_token_mask(attention, batch["prompt_tokens"])
        start = int(mask.any(0).float().argmax())
        logits = model(
            input_ids=ids, attention_mask=attention, use_cache=False, logits_to_keep=ids.size(1) - start
        ).logits[:, :-1]
        token_logps = logprobs_from_logits(logits, ids[:, start + 1 :])
        return sequence_logps(token_logps, mask[:, start:]), mask.sum(1)

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor:
        if self.ref_policy is not None:
            return self.response_logps(self.ref_policy, batch)[0]
        with self.policy.disable_adapter():
            return self.response_logps(self.policy, batch)[0]

    def _pair_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean loss over the batch's pairs and TRL's DPO metrics (unprefixed)."""
        hp = self.hparams
        logps, n_tokens = self.response_logps(self.policy, batch)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = self.reference_logps(batch).chunk(2)
        if hp.loss_type == "sigmoid":
            losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, hp.beta, hp.label_smoothing)
        else:
            losses = ipo_loss(chosen, rejected, ref_chosen, ref_rejected, *n_tokens.chunk(2), hp.beta)
        chosen_rewards = implicit_rewards(chosen.detach(), ref_chosen, hp.beta)
        rejected_rewards = implicit_rewards(rejected.detach(), ref_rejected, hp.beta)
        loss = losses.mean()
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }
        return loss, metrics

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, metrics = self._pair_step(batch)
        require_finite("train/loss", loss, self.global_step)
        pairs = batch["input_ids"].size(0) // 2
        # sync_dist: under DDP the logged values are those of the global batch
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=pairs, sync_dist=True)
        self.log("train/accuracy_pb", metrics["rewards/accuracies"], prog_bar=True, logger=False)
        return loss

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        """The cost the evaluation compares across methods (online methods log it per iteration)."""
        self.log_dict(
            {"time/step_s": time.perf_counter() - self._step_started, "perf/peak_rss_gb": peak_rss_gb()}, batch_size=1
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, metrics = self._pair_step(batch)
        pairs = batch["input_ids"].size(0) // 2
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=pairs, sync_dist=True)

    def configure_optimizers(self):
        return self.optimizer([p for p in self.policy.parameters() if p.requires_grad])

    # ---------------------------------------------------------------- checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only trainable weights: the reference (and LoRA's base) reload from model_name_or_path."""
        keep_trainable_weights(self, checkpoint)

    def configure_callbacks(self):
        return [ExportPolicy()]
