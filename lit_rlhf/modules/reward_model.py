"""Reward model: a causal LM with a scalar head, trained on preference pairs (Bradley-Terry loss).

The best `val/loss` weights are exported at the end of `fit` as a plain Hugging Face folder
(`<default_root_dir>/reward_model/`, model + tokenizer + `lit_rlhf_export.json`, see
lit_rlhf/artifacts.py) that PPO, its critic and evaluation load with
`lit_rlhf.models.hf.load_sequence_scorer(path, pad_token_id)`.
"""

import copy
import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from scipy.stats import bootstrap
from torch import nn
from torchmetrics import CatMetric, MeanMetric, PearsonCorrCoef
from torchmetrics.classification import BinaryAccuracy

from lit_rlhf.artifacts import REWARD_MODEL, REWARD_MODEL_INFO, reward_model_info, save_folder_atomically
from lit_rlhf.callbacks import ExportBest
from lit_rlhf.errors import UserInputError, load_checkpoint, require_finite
from lit_rlhf.models.frozen_trunk import (
    FrozenTrunkCache,
    last_token_index,
    run_blocks,
    run_blocks_sharing_prompts,
    sequence_keys,
    trunk_description,
    unique_rows,
    unsupported_reason,
)
from lit_rlhf.models.hf import DEFAULT_MODEL, has_odin_head, load_causal_lm, load_sequence_scorer, load_tokenizer
from lit_rlhf.rl.odin import length_disentangle_loss, orthogonality_loss
from lit_rlhf.tables import log_table, markdown_table, run_dir

# bucket edges of `test/accuracy_ratio_*` (SHP's score ratios: chosen score / rejected score)
SCORE_RATIO_EDGES = (2.0, 3.0, 5.0, 10.0)
# test-report rows: (metric prefix, label) and subsets: (metric suffix, label)
METHODS = (
    ("accuracy", "reward model"),
    ("baseline_longer_reply", "longer reply wins (characters)"),
    ("baseline_zero_shot_logprob", "zero-shot mean log-prob of the base model"),
)
ODIN_METHODS = (("accuracy_quality", "quality output alone"), ("accuracy_length", "length output alone"))
SUBSETS = (
    ("", "all pairs"),
    ("_chosen_shorter", "chosen is the shorter reply"),
    ("_chosen_longer", "chosen is the longer reply"),
)


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


def grouped_bootstrap_interval(
    values, groups, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of `values` and its percentile-bootstrap interval, resampling whole groups: the pairs
    of one prompt share replies, so they are not independent draws."""
    values = np.asarray(values, dtype=float)
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    sums, counts = np.bincount(group, weights=values), np.bincount(group)
    mean = float(values.mean())
    if len(sums) < 2 or np.all(values == values[0]):
        return mean, mean, mean
    result = bootstrap(
        (sums, counts),
        lambda s, c, axis=-1: s.sum(axis) / c.sum(axis),
        paired=True,
        vectorized=True,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)


@torch.no_grad()
def mean_response_logprob(
    lm_head: nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: torch.Tensor,
    chunk: int = 1024,
) -> torch.Tensor:
    """Per row, the mean log-prob of its tokens from `response_start` on given all tokens before
    them, from the causal LM's final hidden states (the head runs on those positions only)."""
    positions = torch.arange(1, input_ids.shape[1], device=input_ids.device)
    scored = (positions >= response_start.clamp(min=1)[:, None]) & (positions < attention_mask.sum(-1)[:, None])
    states, tokens = hidden[:, :-1][scored], input_ids[:, 1:][scored]
    logprob = torch.cat(
        [
            torch.log_softmax(lm_head(s).float(), -1).gather(-1, t[:, None]).squeeze(-1)
            for s, t in zip(states.split(chunk), tokens.split(chunk))
        ]
    )
    sums = torch.zeros(len(input_ids), device=logprob.device).index_add_(0, scored.nonzero()[:, 0], logprob)
    return sums / scored.sum(-1).clamp(min=1)


def _trim(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = int(attention_mask.sum(-1).max())
    return input_ids[:, :width], attention_mask[:, :width]


class RewardModel(LightningModule):
    """Scalar reward r(prompt, response), read at the last non-pad token.

    Loss per pair: `-logsigmoid(r_chosen - r_rejected - margin)` (margin = `margin` + the data's
    per-pair margin), times the data's per-pair `weight` when the batch has one (1 unless
    data.balance_length), averaged, plus `center_rewards_coefficient * mean((r_chosen + r_rejected)^2)` to keep
    rewards centred on 0. Chosen and rejected sequences go through the model in one forward pass.

    With `trainable_top_blocks`, the frozen blocks' output is computed once per distinct sequence
    (`FrozenTrunkCache`, in memory and in `trunk_cache_path`) and every later pass runs only the
    trainable blocks, the final norm and the head; a sequence in several pairs of a batch runs once.
    Same losses, gradients, metrics and export as without it, only faster.

    `head: odin` trains ODIN's length-disentangled head (`lit_rlhf.rl.odin`): two outputs, a quality
    and a length reward, whose sum takes the pairwise loss, plus `length_weight` * (|rho(quality,
    length)| - rho(length reward, length)) over each batch's replies (length: the reply's characters)
    and `orthogonal_weight` * |cos| of the two head vectors. The export keeps both outputs and records
    `reward_output`, the one that PPO, GRPO, RLOO and the evaluation score with (`load_sequence_scorer`).

    `test` reports accuracy with a 95% interval next to two baselines on the same pairs ("the
    longer reply wins" and the base model's zero-shot mean response log-prob), on all pairs and on
    the pairs whose chosen reply is the shorter / the longer one (console, loggers and
    `<default_root_dir>/test_accuracy.md`).

    Args:
        model_name_or_path: hub id, local HF folder (also an exported reward model: its trained
            head is loaded) or `embedded:smollm2`.
        head: `single` (one scalar reward) or `odin` (quality + length outputs); None: `odin` for
            an ODIN export, else `single`.
        length_weight: ODIN's lambda_L, the weight of the length-correlation term.
        orthogonal_weight: ODIN's lambda_O, the weight of the heads' orthogonality term.
        reward_output: what the ODIN export's scorers read: `quality` (ODIN's choice) or `sum`.
        trainable_top_blocks: train only the top N blocks + final norm + head (CPU setting);
            None trains everything.
        lora_r: when set, train LoRA adapters (peft) on q_proj / v_proj + the head instead;
            the export merges them into plain weights.
        cache_frozen_trunk: keep the frozen trunk's output (top-N-blocks setting, Llama-style
            models, no dropout in the frozen blocks); off by itself where it does not apply.
        trunk_cache_path: the cache file, relative to trainer.default_root_dir; None = memory only.
        baseline_model: the causal LM of the zero-shot log-prob baseline; default: the base model
            the export was trained from (its `lit_rlhf_export.json`), else `model_name_or_path`.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        margin: float = 0.0,
        center_rewards_coefficient: float = 0.0,
        head: Literal["single", "odin"] | None = None,
        length_weight: float = 1.0,
        orthogonal_weight: float = 1.0,
        reward_output: Literal["quality", "sum"] = "quality",
        trainable_top_blocks: int | None = None,
        lora_r: int | None = None,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        cache_frozen_trunk: bool = True,
        trunk_cache_path: str | None = "frozen_trunk_cache.safetensors",
        baseline_model: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        if lora_r is not None and trainable_top_blocks is not None:
            raise UserInputError("Choose either lora_r or trainable_top_blocks, not both.")
        self.optimizer = optimizer
        self.tokenizer = load_tokenizer(model_name_or_path, padding_side="right", trust_remote_code=trust_remote_code)
        self.odin = head == "odin" if head is not None else has_odin_head(model_name_or_path, trust_remote_code)
        self.model = load_sequence_scorer(
            model_name_or_path, self.tokenizer.pad_token_id, trust_remote_code=trust_remote_code, odin=self.odin
        )
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.frozen_blocks = 0  # > 0: the trunk cache keeps the output of this many bottom blocks
        if trainable_top_blocks is not None:
            train_only_top_blocks(self.model, trainable_top_blocks)
            n_frozen = len(transformer_blocks(self.model)) - trainable_top_blocks
            why_not = unsupported_reason(self.model, n_frozen) if cache_frozen_trunk else "cache_frozen_trunk is false"
            if why_not is None:
                self.frozen_blocks = n_frozen
            else:
                print(f"[lit_rlhf] frozen-trunk cache off: {why_not}")
        self.trunk_cache: FrozenTrunkCache | None = None
        self._baseline: tuple[nn.Module, bool] | None = None  # (base causal LM, shares the cached trunk)
        if lora_r is not None:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                task_type="SEQ_CLS",
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=["q_proj", "v_proj"],
            )
            self.model = get_peft_model(self.model, config)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it finds
        edges = torch.tensor(SCORE_RATIO_EDGES, dtype=torch.float32)
        self.register_buffer("score_ratio_edges", edges, persistent=False)
        self.val_loss, self.val_margin, self.val_accuracy = MeanMetric(), MeanMetric(), BinaryAccuracy()
        if self.odin:  # the quality output alone, and both outputs' correlation with the replies' length
            self.val_quality_accuracy, self.val_length_corr = BinaryAccuracy(), PearsonCorrCoef(num_outputs=2)
        self.test_loss, self.test_margin, self.test_accuracy = MeanMetric(), MeanMetric(), BinaryAccuracy()
        self.test_correct, self.test_score_ratio, self.test_domain_id = (
            CatMetric(),
            CatMetric(nan_strategy="disable"),
            CatMetric(),
        )
        self.domain_names: dict[int, str] = {}  # domain_id -> name, as the test batches carry them
        # per test pair: the baselines' verdicts (ties count one half), its replies' characters [chosen, rejected],
        # its post (conversation) and its rewards [chosen, rejected][output]
        self.test_length_correct, self.test_logprob_correct = CatMetric(), CatMetric()
        self.test_chars, self.test_post_index, self.test_rewards = CatMetric(), CatMetric(), CatMetric()
        self._last_batch_end: float | None = None
        self._test_start = 0.0

    def setup(self, stage: str) -> None:
        if not self.frozen_blocks or self.trunk_cache is not None:
            return
        strategy = self.trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            print(f"[lit_rlhf] frozen-trunk cache off: {type(strategy).__name__} shards the model")
            return
        path = None
        if self.hparams.trunk_cache_path is not None and self.trainer.world_size == 1:
            path = Path(self.hparams.trunk_cache_path)
            path = path if path.is_absolute() else Path(self.trainer.default_root_dir) / path
        self.trunk_cache = FrozenTrunkCache(
            self.model.base_model, self.frozen_blocks, path, str(self.trainer.precision)
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One reward per sequence (fp32; ODIN: [quality, length] per sequence). `prompt_tokens` (where
        each row's response starts) lets rows with the same prompt share its computation in the
        trainable blocks (trunk cache on)."""
        if self.trunk_cache is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()
        keys = sequence_keys(input_ids, attention_mask)
        rows, inverse = unique_rows(keys)
        prompts = prompt_tokens[rows] if prompt_tokens is not None else None
        input_ids, attention_mask = _trim(input_ids[rows], attention_mask[rows])
        hidden = self._from_trunk(self.model.base_model, [keys[r] for r in rows], input_ids, attention_mask, prompts)
        last = hidden[torch.arange(len(rows)), last_token_index(input_ids, self.model.config.pad_token_id)]
        return self.model.score(last).squeeze(-1).float()[inverse.to(last.device)]

    def _from_trunk(self, backbone: nn.Module, keys: list[str], input_ids, attention_mask, prompt_tokens=None):
        """`backbone`'s final hidden states from the cached trunk output: its blocks above the trunk
        (rows sharing a prompt run it once, except under gradient checkpointing, which drops the
        keys/values that sharing needs) + its final norm."""
        hidden = self.trunk_cache.hidden(keys, input_ids, attention_mask)
        blocks = backbone.layers[self.frozen_blocks :]
        if prompt_tokens is None or self.hparams.gradient_checkpointing:
            return backbone.norm(run_blocks(backbone, hidden, attention_mask, blocks))
        return backbone.norm(
            run_blocks_sharing_prompts(backbone, hidden, input_ids, attention_mask, prompt_tokens, blocks)
        )

    def _pair_outputs(self, batch) -> dict[str, torch.Tensor]:
        """`loss`, `diff` (chosen minus rejected reward per pair) and `rewards` (per sequence; ODIN:
        [quality, length], with the loss's `length_term` and `orthogonality`)."""
        rewards = self(batch["input_ids"], batch["attention_mask"], batch.get("prompt_tokens"))
        chosen, rejected = (rewards.sum(-1) if self.odin else rewards).chunk(2)
        diff = chosen - rejected
        loss = -F.logsigmoid(diff - self.hparams.margin - batch["margin"])
        loss = (loss * batch["weight"]).mean() if "weight" in batch else loss.mean()  # data.balance_length
        if self.hparams.center_rewards_coefficient:
            loss = loss + self.hparams.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        out = {"diff": diff, "rewards": rewards}
        if self.odin:
            if "response_chars" not in batch:
                raise UserInputError("head odin needs each reply's length: train it on a PreferenceDataModule.")
            out["length_term"] = length_disentangle_loss(rewards[:, 0], rewards[:, 1], batch["response_chars"])
            out["orthogonality"] = orthogonality_loss(self.model.score.weight)
            loss = loss + self.hparams.length_weight * out["length_term"]
            loss = loss + self.hparams.orthogonal_weight * out["orthogonality"]
        out["loss"] = loss
        return out

    def _pair_step(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._pair_outputs(batch)
        return out["loss"], out["diff"]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        out = self._pair_outputs(batch)
        loss, diff = out["loss"], out["diff"]
        require_finite("train/loss", loss, self.global_step)
        # sync_dist: under DDP the logged values are those of the global batch
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/accuracy", (diff > 0).float().mean(), sync_dist=True)
        self.log("train/margin", diff.mean(), sync_dist=True)
        if self.odin:
            self.log("train/odin_length_term", out["length_term"], sync_dist=True)
            self.log("train/odin_orthogonality", out["orthogonality"], sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            pairs = batch["margin"].numel() * self.trainer.world_size
            self.log("train/pairs_per_sec", pairs / (now - self._last_batch_end), prog_bar=True)
        self._last_batch_end = now

    def validation_step(self, batch, batch_idx: int) -> None:
        out = self._pair_outputs(batch)
        loss, diff = out["loss"], out["diff"]
        n = diff.numel()
        self.val_loss.update(loss, weight=n)
        self.val_margin.update(diff)
        self.val_accuracy.update(torch.sigmoid(diff), torch.ones_like(diff, dtype=torch.long))
        if self.odin:
            chosen, rejected = out["rewards"][:, 0].chunk(2)
            self.val_quality_accuracy.update(torch.sigmoid(chosen - rejected), torch.ones_like(diff, dtype=torch.long))
            self.val_length_corr.update(out["rewards"], batch["response_chars"].float()[:, None].expand(-1, 2))

    def on_validation_epoch_end(self) -> None:
        metrics = {"val/loss": self.val_loss, "val/accuracy": self.val_accuracy, "val/margin": self.val_margin}
        self.log_dict({key: metric.compute() for key, metric in metrics.items()}, prog_bar=True)
        for metric in metrics.values():
            metric.reset()
        if self.odin:
            quality_corr, length_corr = self.val_length_corr.compute()
            self.log_dict(
                {
                    "val/accuracy_quality": self.val_quality_accuracy.compute(),
                    "val/length_corr_quality": quality_corr,
                    "val/length_corr_length": length_corr,
                }
            )
            self.val_quality_accuracy.reset()
            self.val_length_corr.reset()
        self._last_batch_end = None

    def _build_trunk_cache(self, *loader_names: str) -> None:
        """The pre-pass: the frozen trunk's output for every sequence of the data module's loaders
        (replies to one prompt sharing the prompt), written to the cache file at once."""
        datamodule = self.trainer.datamodule
        if self.trunk_cache is None or datamodule is None:
            return
        loaders = [getattr(datamodule, name)() for name in loader_names]
        with self.trainer.precision_plugin.forward_context():
            self.trunk_cache.build(loaders)
        self.trunk_cache.save()

    def on_fit_start(self) -> None:
        validates = self.trainer.limit_val_batches != 0
        self._build_trunk_cache("train_dataloader", *(["val_dataloader"] if validates else []))

    def on_train_epoch_end(self) -> None:
        if self.trunk_cache is not None:
            self.trunk_cache.save()

    def on_test_start(self) -> None:
        """Load the base causal LM of the zero-shot baseline. When its embeddings and bottom blocks are
        the reward model's frozen trunk (a top-N-blocks model trained from it), it reads the cached
        trunk output too and runs only its own top blocks."""
        self._build_trunk_cache("test_dataloader")
        source = self.hparams.model_name_or_path
        base = self.hparams.baseline_model or reward_model_info(source).get("base_model", source)
        model = load_causal_lm(base, trust_remote_code=self.hparams.trust_remote_code).to(self.device).eval()
        shares = self.trunk_cache is not None and self.trunk_cache.description == trunk_description(
            model.base_model, self.frozen_blocks, str(self.trainer.precision)
        )
        self._baseline = (model, shares)
        print(
            f"[lit_rlhf] zero-shot baseline: mean response log-prob under {base}"
            + (" (sharing the cached frozen trunk)" if shares else "")
        )

    def on_test_end(self) -> None:
        self._baseline = None
        if self.trunk_cache is not None:
            self.trunk_cache.save()

    @torch.no_grad()
    def baseline_logprob(self, batch) -> torch.Tensor:
        """The base LM's mean log-prob of each row's response given its prompt (chosen rows first)."""
        model, shares = self._baseline
        keys = sequence_keys(batch["input_ids"], batch["attention_mask"])
        rows, inverse = unique_rows(keys)
        input_ids, attention_mask = _trim(batch["input_ids"][rows], batch["attention_mask"][rows])
        if shares:
            hidden = self._from_trunk(
                model.base_model, [keys[r] for r in rows], input_ids, attention_mask, batch["prompt_tokens"][rows]
            )
        else:
            hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logprob = mean_response_logprob(
            model.get_output_embeddings(), hidden, input_ids, attention_mask, batch["prompt_tokens"][rows]
        )
        return logprob[inverse.to(logprob.device)]

    def on_test_epoch_start(self) -> None:
        self._test_start = time.perf_counter()

    def test_step(self, batch, batch_idx: int) -> None:
        out = self._pair_outputs(batch)
        loss, diff = out["loss"], out["diff"]
        self.test_loss.update(loss, weight=diff.numel())
        self.test_margin.update(diff)
        self.test_accuracy.update(torch.sigmoid(diff), torch.ones_like(diff, dtype=torch.long))
        self.test_correct.update((diff > 0).float())
        self.test_score_ratio.update(batch["score_ratio"])
        self.test_domain_id.update(batch["domain_id"].float())
        self.domain_names.update(zip(batch["domain_id"].tolist(), batch["domain"]))
        self.test_post_index.update(batch["post_index"].float())
        chars_chosen, chars_rejected = batch["response_chars"].chunk(2)
        self.test_chars.update(torch.stack([chars_chosen, chars_rejected], 1).float())
        rewards = out["rewards"] if self.odin else out["rewards"][:, None]
        self.test_rewards.update(torch.stack(rewards.chunk(2), 1))
        self.test_length_correct.update(_verdict(chars_chosen.float(), chars_rejected.float()))
        self.test_logprob_correct.update(_verdict(*self.baseline_logprob(batch).chunk(2)))

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
        metrics.update(self._accuracy_report(correct))
        self.log_dict(metrics)
        if groups:
            rows = [[name, n, f"{acc.item():.3f}"] for name, (n, acc) in groups.items()]
            log_table(self.trainer, "test/reward_model_groups", ["group", "pairs", "accuracy"], rows)
        for metric in (
            self.test_loss,
            self.test_accuracy,
            self.test_margin,
            self.test_correct,
            self.test_score_ratio,
            self.test_domain_id,
            self.test_length_correct,
            self.test_logprob_correct,
            self.test_chars,
            self.test_post_index,
            self.test_rewards,
        ):
            metric.reset()
        self.domain_names.clear()

    def _accuracy_report(self, correct: torch.Tensor) -> dict[str, float]:
        """Accuracy of the reward model (ODIN: the sum, then each output alone) and of both baselines,
        on all pairs and on the pairs whose chosen reply is the shorter / longer one, each with a 95%
        interval resampling posts (conversations), and each model output's Pearson correlation with
        the replies' length; over all pairs and per source (`domain`). Logged, printed and written to
        `<default_root_dir>/test_accuracy.md`."""
        rewards = self.test_rewards.compute().cpu().numpy()  # [pairs, chosen/rejected, outputs]
        chars = self.test_chars.compute().cpu().numpy()
        verdicts = [
            correct.cpu().numpy(),
            self.test_length_correct.compute().cpu().numpy(),
            self.test_logprob_correct.compute().cpu().numpy(),
        ]
        # (metric prefix, label, per-pair verdicts, per-reply rewards or None)
        label = f"{METHODS[0][1]} (quality + length)" if self.odin else METHODS[0][1]
        methods = [(METHODS[0][0], label, verdicts[0], rewards.sum(-1))]
        if self.odin:
            methods += [
                (*ODIN_METHODS[i], (rewards[:, 0, i] > rewards[:, 1, i]).astype(float), rewards[..., i])
                for i in range(2)
            ]
        methods += [(*method, values, None) for method, values in zip(METHODS[1:], verdicts[1:])]
        posts, domains = self.test_post_index.compute().cpu().numpy(), self.test_domain_id.compute().cpu().numpy()
        metrics, tables = {}, []
        groups = [("", None, np.ones(len(chars), dtype=bool))]
        groups += [
            (f"{name}/", name, domains == index)
            for index, name in sorted(self.domain_names.items())
            if index >= 0 and (domains == index).any()
        ]
        for key, name, group in groups:
            group_metrics, columns, table = _method_table(methods, chars[group], posts[group], group)
            metrics.update({f"test/{key}{metric}": value for metric, value in group_metrics.items()})
            counts = [int(group.sum())] + [int(group_metrics[f"pairs{suffix}"]) for suffix, _ in SUBSETS[1:]]
            tables.append((f"{name} ({counts[0]}: {counts[1]} / {counts[2]})", columns, table))
        metrics.pop("test/accuracy")  # logged from the BinaryAccuracy metric (the same value)
        _, columns, table = tables[0]
        log_table(self.trainer, "test/reward_model_accuracy", columns, table)
        text = f"{markdown_table(columns, table)}\n"
        if len(tables) > 1:
            rows = [[name, *row] for name, _, table in tables[1:] for row in table]
            source_columns = [
                "source (pairs: chosen shorter / longer)",
                "method",
                *(label for _, label in SUBSETS),
                "Pearson r with length",
            ]
            log_table(self.trainer, "test/reward_model_accuracy_per_source", source_columns, rows)
            text += f"\n## Per source\n\n{markdown_table(source_columns, rows)}\n"
        if self.trainer.is_global_zero:
            out = run_dir(self.trainer) / "test_accuracy.md"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(
                f"# Reward model test accuracy ({self.hparams.model_name_or_path}, {len(chars)} held-out pairs)\n\n"
                f"{text}\nAccuracy [95% interval]: percentile bootstrap (10 000 resamples) over posts (with several "
                "sources: conversations), a post's pairs resampled together. Ties count one half for the baselines. "
                "Lengths are the untruncated replies' characters; pairs of equal length are in neither subset. "
                "Pearson r: each output's reward against the reply's length, over the chosen and rejected replies "
                "of the pairs.\n",
                encoding="utf-8",
            )
        return metrics

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
        for index, name in sorted(self.domain_names.items()):
            mask = domain_id == index
            if index >= 0 and mask.any():
                groups[f"domain_{name}"] = (int(mask.sum()), correct[mask].mean())
        return groups

    def configure_optimizers(self):
        return self.optimizer([p for p in self.parameters() if p.requires_grad])

    # -- export -------------------------------------------------------------------------------

    def configure_callbacks(self):
        return [ExportBest(monitor="val/loss")]

    def export_run(self, best=None) -> None:
        """The best `val/loss` checkpoint (`best`, else the final weights) as the frozen reward model folder."""
        source = self.hparams.model_name_or_path
        base = reward_model_info(source).get("base_model", source)
        info = {"source": source, "base_model": base, "global_step": self.global_step}
        info.update({"head": "odin", "reward_output": self.hparams.reward_output} if self.odin else {"head": "single"})
        record = getattr(self.trainer.datamodule, "export_record", None)  # scoring settings, trained_on
        if record is not None:
            info.update(record())
        if best is not None:
            state = load_checkpoint(best.best_model_path, "best val/loss checkpoint")["state_dict"]
            self.load_state_dict(state)
            info.update(checkpoint=best.best_model_path, best_val_loss=float(best.best_model_score))
        else:
            print("[lit_rlhf] no ModelCheckpoint on val/loss with a best model: exporting the final weights.")
        if self.trunk_cache is not None:
            self.trunk_cache.save()
        if self.trainer.is_global_zero:
            target = Path(self.trainer.default_root_dir) / REWARD_MODEL
            self.export(target, info)
            summary = {key: value for key, value in info.items() if key != "trained_on"}
            print(f"[lit_rlhf] reward model exported to {target} ({summary})")
        self.trainer.strategy.barrier()

    def export(self, target: Path, info: dict | None = None) -> Path:
        """Model + tokenizer (`save_pretrained`) and the export record, written atomically."""
        model = self.model
        if self.hparams.lora_r is not None:
            model = copy.deepcopy(model).merge_and_unload()

        def save(staging: Path) -> None:
            model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            (staging / REWARD_MODEL_INFO).write_text(json.dumps(info or {}, indent=2) + "\n")

        save_folder_atomically(target, save)
        return target


def _verdict(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1 when a baseline prefers the chosen reply, 0 when the rejected one, 1/2 on a tie."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


def _method_table(methods, chars: np.ndarray, posts: np.ndarray, group: np.ndarray) -> tuple[dict, list, list]:
    """Metrics and table rows of one group of test pairs: each method's accuracy with its interval on
    all pairs and the chosen-shorter / chosen-longer subsets, and each model output's Pearson r with
    the replies' length (`chars` [pairs, chosen/rejected])."""
    from torchmetrics.functional import pearson_corrcoef

    difference = chars[:, 0] - chars[:, 1]
    masks = [np.ones(len(difference), dtype=bool), difference < 0, difference > 0]
    metrics, table = {}, []
    for prefix, label, values, rewards in methods:
        values = values[group]
        cells = [label]
        for (suffix, _), mask in zip(SUBSETS, masks):
            if not mask.any():
                cells.append("-")
                continue
            mean, low, high = grouped_bootstrap_interval(values[mask], posts[mask])
            metrics.update(
                {f"{prefix}{suffix}": mean, f"{prefix}{suffix}_ci_low": low, f"{prefix}{suffix}_ci_high": high}
            )
            cells.append(f"{mean:.3f} [{low:.3f}, {high:.3f}]")
        if rewards is not None and len(difference) > 1:
            name = "length_corr" + prefix.removeprefix("accuracy")
            r = pearson_corrcoef(
                torch.from_numpy(rewards[group].reshape(-1)).double(), torch.from_numpy(chars.reshape(-1)).double()
            )
            metrics[name] = float(r)
            cells.append(f"{float(r):+.3f}")
        else:
            cells.append("-")
        table.append(cells)
    for (suffix, _), mask in zip(SUBSETS[1:], masks[1:]):
        metrics[f"pairs{suffix}"] = float(mask.sum())
    columns = ["method"] + [f"{label} ({int(mask.sum())})" for (_, label), mask in zip(SUBSETS, masks)]
    return metrics, columns + ["Pearson r with length"], table
