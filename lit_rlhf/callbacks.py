"""Callbacks every `python -m lit_rlhf` run gets (added by the CLI, see `lit_rlhf.cli`), and the
export callback the RLHF modules add themselves (`configure_callbacks`)."""

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import RichProgressBar

from lit_rlhf.artifacts import export_policy


def _portable(states: dict) -> dict:
    """RNG states as tensors, tuples and ints only, so checkpoints load with `weights_only=True`."""
    name, keys, pos, has_gauss, gauss = states["numpy"]
    return {**states, "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def _native(states: dict) -> dict:
    name, keys, pos, has_gauss, gauss = states["numpy"]
    return {**states, "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)}


class RandomStatePerRank(Callback):
    """Distinct random streams per rank, saved in checkpoints and restored on resume.

    `seed_everything` gives every DDP rank the same seed, so ranks would draw the same GAN noise
    and the same rollout samples; rank r is re-seeded with seed + r (rank 0 keeps the seed, so
    one-device runs are unchanged). Lightning restores weights, optimizers and loop counters but
    not random states: this callback stores every rank's torch/numpy/python state in each
    checkpoint, so a resumed run draws the same dropout masks and samples as one that never stopped.
    """

    def __init__(self) -> None:
        self._to_restore: list[dict] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1 and trainer.global_rank > 0:
            torch.manual_seed(torch.initial_seed() + trainer.global_rank)
            np.random.seed((torch.initial_seed() + trainer.global_rank) % 2**32)
        self._rank, self._world = trainer.global_rank, trainer.world_size

    def state_dict(self) -> dict:
        states = _portable(_collect_rng_states(include_cuda=torch.cuda.is_available()))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            return {"ranks": gathered}
        return {"ranks": [states]}

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_restore = state_dict["ranks"]

    def on_train_start(self, trainer, pl_module) -> None:
        """Restore here, after the sanity check and just before the first resumed step."""
        if self._to_restore is None:
            return
        if len(self._to_restore) == trainer.world_size:
            _set_rng_states(_native(self._to_restore[trainer.global_rank]))
        else:
            print(
                f"[lit_rlhf] the checkpoint holds random states of {len(self._to_restore)} ranks, this run has "
                f"{trainer.world_size}: continuing with fresh per-rank random streams."
            )
        self._to_restore = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _steps_drive(trainer) -> bool:
    """True when `max_steps` ends the run (no epoch limit: Lightning then sets max_epochs to -1)."""
    return trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class ProgressLines(Callback):
    """Progress as plain lines when stdout is not a terminal (CI, nohup, a log file), where no progress
    bar is drawn: the first training batch, then one line every `every_s` seconds (each PPO/GRPO/RLOO
    iteration on a CPU, every few reward-model steps), with the step, seconds per batch, ETA and the
    headline metrics logged so far; one line per validation. Silent on a terminal and on ranks > 0.
    """

    HEADLINE = (
        "objective/scores",
        "objective/kl",
        "objective/kl_per_token",
        "kl_coef",
        "train/loss",
        "train/accuracy",
        "train/rewards/accuracies",
        "train/pairs_per_sec",
        "train/tokens_per_sec",
        "train/images_per_sec",
        "train/loss_d",
        "train/loss_g",
        "train/reward",
        "train/keyword_rate",
    )

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = every_s
        self._on = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._on = trainer.is_global_zero and not sys.stdout.isatty()
        self._start = self._last = time.perf_counter()
        self._batches_since, self._printed = 0, False

    def _fraction(self, trainer, batch_idx: int) -> float | None:
        """The share of the run done: by steps when max_steps is set, by batches when epochs are, the
        larger of the two (the run ends at the first limit)."""
        fractions = []
        if trainer.max_steps > 0:
            fractions.append(trainer.global_step / trainer.max_steps)
        per_epoch = trainer.num_training_batches
        if trainer.max_epochs not in (None, -1) and math.isfinite(per_epoch) and per_epoch > 0:
            fractions.append((trainer.current_epoch * per_epoch + batch_idx + 1) / (trainer.max_epochs * per_epoch))
        return min(max(fractions), 1.0) if fractions else None

    def _where(self, trainer, batch_idx: int) -> str:
        if _steps_drive(trainer):
            return f"step {trainer.global_step}/{trainer.max_steps}"
        per_epoch = trainer.num_training_batches
        batches = f"{batch_idx + 1}/{per_epoch}" if math.isfinite(per_epoch) else f"{batch_idx + 1}"
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs not in (None, -1) else ""
        return f"epoch {trainer.current_epoch + 1}{epochs}, batch {batches}, step {trainer.global_step}"

    @staticmethod
    def _metrics(trainer, names) -> str:
        shown = []
        for name in names:
            value = trainer.callback_metrics.get(name)
            if value is not None and value.numel() == 1:
                shown.append(f"{name} {value.item():.4g}")
        return " | ".join(shown)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._on:
            return
        now = time.perf_counter()
        self._batches_since += 1
        if self._printed and now - self._last < self.every_s:
            return
        elapsed, fraction = now - self._start, self._fraction(trainer, batch_idx)
        parts = [
            self._where(trainer, batch_idx),
            f"{(now - self._last) / self._batches_since:.1f} s/batch",
            f"elapsed {_duration(elapsed)}",
        ]
        if fraction:
            parts.append(f"ETA {_duration(elapsed * (1 - fraction) / fraction)}")
        metrics = self._metrics(trainer, self.HEADLINE)
        print(f"[lit_rlhf] {' | '.join(parts)}{' | ' + metrics if metrics else ''}", flush=True)
        self._last, self._batches_since, self._printed = now, 0, True

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._on and not trainer.sanity_checking:
            names = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
            print(f"[lit_rlhf] validation at step {trainer.global_step}: {self._metrics(trainer, names)}", flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._on:
            took = _duration(time.perf_counter() - self._start)
            print(f"[lit_rlhf] training done: step {trainer.global_step} in {took}", flush=True)


class LogLastStep(Callback):
    """Lightning logs training metrics every `log_every_n_steps` batches only, so a run shorter than
    that (or the tail after the last multiple) never reached `metrics.csv` or W&B: the last batch's
    training metrics are logged when training ends."""

    def on_train_start(self, trainer, pl_module) -> None:
        self._batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1

    def on_train_end(self, trainer, pl_module) -> None:
        every = trainer.log_every_n_steps
        if not trainer.loggers or not every or self._batches == 0 or self._batches % every == 0:
            return
        metrics = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if not key.startswith("val") and torch.is_tensor(value) and value.numel() == 1
        }
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)  # Lightning's x-axis
        for logger in trainer.loggers if metrics else []:
            logger.log_metrics(metrics, step=max(step - 1, 0))
            logger.save()


class StepsProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, labelled "Step k/max_steps" when max_steps ends the run: its
    own label then reads "Epoch 0/-2" (max_epochs is -1)."""

    def _get_train_description(self, current_epoch: int) -> str:
        if _steps_drive(self.trainer):
            return f"Step {self.trainer.global_step}/{self.trainer.max_steps}"
        return super()._get_train_description(current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if _steps_drive(trainer) and self.progress is not None and self.train_progress_bar_id is not None:
            description = self._get_train_description(trainer.current_epoch)
            style = self.theme.description
            description = f"[{style}]{description}" if style else description
            self.progress.update(self.train_progress_bar_id, description=description)


def took_a_step(trainer) -> bool:
    """No export from a run that never took an optimizer step (e.g. no training batch): its model is
    the untrained one, and the next stage would accept it."""
    if trainer.global_step > 0:
        return True
    if trainer.is_global_zero:
        print(
            "[lit_rlhf] nothing exported: the run took no optimizer step (no training batch?), so its model is "
            "the untrained one.",
            file=sys.stderr,
        )
    return False


class ExportPolicy(Callback):
    """When `fit` ends, the module's final policy -> `<default_root_dir>/policy` (HF folder) or
    `policy_adapter` (peft folder, `lora` modules): PPO, GRPO, RLOO and DPO add it themselves."""

    def on_fit_end(self, trainer, pl_module) -> None:
        if not took_a_step(trainer):
            return
        if trainer.is_global_zero:
            lora = bool(pl_module.hparams.lora)
            record = pl_module.export_record() if hasattr(pl_module, "export_record") else {}
            folder = export_policy(pl_module.policy, pl_module.tokenizer, Path(trainer.default_root_dir), lora, record)
            print(f"[lit_rlhf] exported the trained {type(pl_module).__name__} policy to {folder}")
        trainer.strategy.barrier()


class ExportBest(Callback):
    """When `fit` ends, `pl_module.export_run(best)`: `best` is the ModelCheckpoint monitoring
    `monitor` that holds a best model, or None (then the module exports its final weights)."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor

    def on_fit_end(self, trainer, pl_module) -> None:
        if not took_a_step(trainer):
            return
        best = next(
            (
                cb
                for cb in trainer.checkpoint_callbacks
                if getattr(cb, "monitor", None) == self.monitor and cb.best_model_path
            ),
            None,
        )
        pl_module.export_run(best)
