"""Reward model: a causal LM with a scalar head, trained on preference pairs (Bradley-Terry loss).

The best `val/loss` weights are exported at the end of `fit` as a plain Hugging Face folder
(`<default_root_dir>/reward_model/`, model + tokenizer) that PPO, its critic and evaluation load
with `lit_rlhf.models.hf.load_sequence_scorer(path, pad_token_id)`.
"""

import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.classification import BinaryAccuracy

from lit_rlhf.errors import UserInputError, load_checkpoint, require_finite
from lit_rlhf.logging import log_table
from lit_rlhf.models.hf import DEFAULT_MODEL, load_sequence_scorer, load_tokenizer


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (`model.layers`, `transformer.h`, ...) of an HF model."""
    n_layers = model.config.get_text_config().num_hidden_layers
    for module in model.base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise UserInputError(f"Could not find the {n_layers} transformer blocks of {type(model).__name__}.")


def train_only_top_blocks(model: nn.Module, n_blocks: int) -> None:
    """Freeze everything but the top `n_blocks` blocks, the final norm and the scalar head.

    Backward then stops at the lowest trainable block, which is what makes CPU training of a
    135M-parameter model take minutes rather than hours.
    """
    blocks = transformer_blocks(model)
    if not 0 <= n_blocks <= len(blocks):
        raise UserInputError(f"trainable_top_blocks must be between 0 and {len(blocks)}, got {n_blocks}.")
    model.requires_grad_(False)
    for block in blocks[len(blocks) - n_blocks :]:
        block.requires_grad_(True)
    for child in model.base_model.children():  # final norm (no embeddings, no blocks)
        if child is not blocks and not isinstance(child, nn.Embedding):
            child.requires_grad_(True)
    for child in model.children():  # the head (`score`)
        if child is not model.base_model:
            child.requires_grad_(True)


class RewardModel(LightningModule):
    """Scalar reward r(prompt, response), read at the last non-pad token.

    Loss per pair: `-logsigmoid(r_chosen - r_rejected - margin)` (margin = `margin` + the data's
    per-pair margin), plus `center_rewards_coefficient * mean((r_chosen + r_rejected)^2)` to keep
    rewards centred on 0. Chosen and rejected sequences go through the model in one forward pass.

    Args:
        model_name_or_path: hub id, local HF folder (also an exported reward model: its trained
            head is loaded) or `embedded:smollm2`.
        trainable_top_blocks: train only the top N blocks + final norm + head (CPU setting);
            None trains everything.
        lora_r: when set, train LoRA adapters (peft) on `lora_target_modules` + the head instead;
            the export merges them into plain weights.
        score_ratio_edges: bucket edges for `test/accuracy_ratio_*` (SHP's score ratios).
        export_dir: where the best model is written, relative to trainer.default_root_dir.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        margin: float = 0.0,
        center_rewards_coefficient: float = 0.0,
        trainable_top_blocks: int | None = None,
        lora_r: int | None = None,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        score_ratio_edges: tuple[float, ...] = (2.0, 3.0, 5.0, 10.0),
        export_dir: str = "reward_model",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        if lora_r is not None and trainable_top_blocks is not None:
            raise UserInputError("Choose either lora_r or trainable_top_blocks, not both.")
        self.optimizer = optimizer
        self.tokenizer = load_tokenizer(model_name_or_path, padding_side="right", trust_remote_code=trust_remote_code)
        self.model = load_sequence_scorer(
            model_name_or_path, self.tokenizer.pad_token_id, trust_remote_code=trust_remote_code
        )
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if trainable_top_blocks is not None:
            train_only_top_blocks(self.model, trainable_top_blocks)
        if lora_r is not None:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                task_type="SEQ_CLS",
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=lora_target_modules or ["q_proj", "v_proj"],
            )
            self.model = get_peft_model(self.model, config)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it finds
        edges = torch.tensor(score_ratio_edges, dtype=torch.float32)
        self.register_buffer("score_ratio_edges", edges, persistent=False)
        self.val_loss, self.val_margin, self.val_accuracy = MeanMetric(), MeanMetric(), BinaryAccuracy()
        self.test_loss, self.test_margin, self.test_accuracy = MeanMetric(), MeanMetric(), BinaryAccuracy()
        self.test_correct, self.test_score_ratio, self.test_domain_id = (
            CatMetric(), CatMetric(nan_strategy="disable"), CatMetric()
        )
        self._last_batch_end: float | None = None
        self._test_start = 0.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One reward per sequence (fp32)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()

    def _pair_step(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = self(batch["input_ids"], batch["attention_mask"])
        chosen, rejected = rewards.chunk(2)
        diff = chosen - rejected
        loss = -F.logsigmoid(diff - self.hparams.margin - batch["margin"]).mean()
        if self.hparams.center_rewards_coefficient:
            loss = loss + self.hparams.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        return loss, diff

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, diff = self._pair_step(batch)
        require_finite("train/loss", loss, self.global_step)
        # sync_dist: under DDP the logged values are those of the global batch
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/accuracy", (diff > 0).float().mean(), sync_dist=True)
        self.log("train/margin", diff.mean(), sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            pairs = batch["margin"].numel() * self.trainer.world_size
            self.log("train/pairs_per_sec", pairs / (now - self._last_batch_end), prog_bar=True)
        self._last_batch_end = now

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, diff = self._pair_step(batch)
        n = diff.numel()
        self.val_loss.update(loss, weight=n)
        self.val_margin.update(diff)
        self.val_accuracy.update(torch.sigmoid(diff), torch.ones_like(diff, dtype=torch.long))

    def on_validation_epoch_end(self) -> None:
        metrics = {"val/loss": self.val_loss, "val/accuracy": self.val_accuracy, "val/margin": self.val_margin}
        self.log_dict({key: metric.compute() for key, metric in metrics.items()}, prog_bar=True)
        for metric in (self.val_loss, self.val_accuracy, self.val_margin):
            metric.reset()
        self._last_batch_end = None

    def on_test_epoch_start(self) -> None:
        self._test_start = time.perf_counter()

    def test_step(self, batch, batch_idx: int) -> None:
        loss, diff = self._pair_step(batch)
        self.test_loss.update(loss, weight=diff.numel())
        self.test_margin.update(diff)
        self.test_accuracy.update(torch.sigmoid(diff), torch.ones_like(diff, dtype=torch.long))
        self.test_correct.update((diff > 0).float())
        self.test_score_ratio.update(batch["score_ratio"])
        self.test_domain_id.update(batch["domain_id"].float())

    def on_test_epoch_end(self) -> None:
        correct = self.test_correct.compute()
        metrics = {
            "test/loss": self.test_loss.compute(),
            "test/accuracy": self.test_accuracy.compute(),
            "test/margin": self.test_margin.compute(),
            "test/pairs_per_sec": torch.tensor(correct.numel() / (time.perf_counter() - self._test_start)),
        }
        groups = self._group_accuracy(correct, self.test_score_ratio.compute(), self.test_domain_id.compute())
        metrics.update({f"test/accuracy_{name}": acc for name, (_, acc) in groups.items()})
        self.log_dict(metrics)
        if groups:
            rows = [[name, n, f"{acc.item():.3f}"] for name, (n, acc) in groups.items()]
            log_table(self.trainer, "test/reward_model_groups", ["group", "pairs", "accuracy"], rows)
        for metric in (self.test_loss, self.test_accuracy, self.test_margin, self.test_correct,
                       self.test_score_ratio, self.test_domain_id):  # fmt: skip
            metric.reset()

    def _group_accuracy(self, correct, score_ratio, domain_id) -> dict[str, tuple[int, torch.Tensor]]:
        """Accuracy per SHP score-ratio bucket and per domain, for the groups the data has."""
        groups = {}
        known = ~torch.isnan(score_ratio)
        if known.any():
            edges = self.score_ratio_edges.tolist()
            names = [f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]:g}"]
            buckets = torch.bucketize(score_ratio[known], self.score_ratio_edges.to(score_ratio.device), right=True)
            for index, name in enumerate(names):
                mask = buckets == index
                if mask.any():
                    groups[f"ratio_{name}"] = (int(mask.sum()), correct[known][mask].mean())
        domains = getattr(self.trainer.datamodule, "domains", []) if self.trainer.datamodule else []
        for index, name in enumerate(domains):
            mask = domain_id == index
            if mask.any():
                groups[f"domain_{name}"] = (int(mask.sum()), correct[mask].mean())
        return groups

    def configure_optimizers(self):
        return self.optimizer([p for p in self.parameters() if p.requires_grad])

    # -- export -------------------------------------------------------------------------------

    def on_fit_end(self) -> None:
        """Load the best `val/loss` checkpoint and export it as the frozen reward model folder."""
        best = next(
            (cb for cb in self.trainer.checkpoint_callbacks
             if isinstance(cb, ModelCheckpoint) and cb.monitor == "val/loss" and cb.best_model_path),
            None,
        )  # fmt: skip
        info = {"source": self.hparams.model_name_or_path, "global_step": self.global_step}
        if best is not None:
            state = load_checkpoint(best.best_model_path, "best val/loss checkpoint")["state_dict"]
            self.load_state_dict(state)
            info.update(checkpoint=best.best_model_path, best_val_loss=float(best.best_model_score))
        else:
            print("[lit_rlhf] no ModelCheckpoint on val/loss with a best model: exporting the final weights.")
        if self.trainer.is_global_zero:
            target = Path(self.hparams.export_dir)
            target = target if target.is_absolute() else Path(self.trainer.default_root_dir) / target
            self.export(target, info)
            print(f"[lit_rlhf] reward model exported to {target} ({info})")
        self.trainer.strategy.barrier()

    def export(self, target: Path, info: dict | None = None) -> Path:
        """Write model + tokenizer with `save_pretrained` to a temporary folder, then rename it."""
        model = self.model
        if self.hparams.lora_r is not None:
            model = copy.deepcopy(model).merge_and_unload()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; other runs and users read the export
        try:
            model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            (staging / "lit_rlhf_export.json").write_text(json.dumps(info or {}, indent=2) + "\n")
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
                os.replace(target, old / target.name)
                shutil.rmtree(old)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target
