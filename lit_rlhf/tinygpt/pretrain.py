"""Char-level TinyGPT pretraining (the reference report's "Pre-training" step)."""

import math
import time

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from pydantic import NonNegativeInt, PositiveInt
from torchmetrics import MeanMetric

from lit_rlhf.errors import UserInputError, load_checkpoint, require_finite
from lit_rlhf.tables import log_table
from lit_rlhf.tinygpt.model import TinyGPT, TinyGPTConfig
from lit_rlhf.tinygpt.tokenizer import CharTokenizer

# Hyper-parameters that fix the shape of a TinyGPT (with `vocab`); every TinyGPT-family module
# (pretraining, SFT, RL-lite) stores them, so any of their checkpoints can start another stage.
ARCHITECTURE = ("block_size", "n_layer", "n_head", "n_embd")
SAMPLE_TEMPERATURE = 0.8  # of the sample completions logged during training


def read_tinygpt_checkpoint(path: str) -> tuple[list[str], dict, dict[str, torch.Tensor]]:
    """Vocabulary, architecture and TinyGPT weights of a TinyGPT-family Lightning checkpoint, read
    with `weights_only=True` (a checkpoint is data; loading it must not run code)."""
    checkpoint = load_checkpoint(path, "init_from")
    hparams = checkpoint.get("hyper_parameters") or {}
    if not hparams.get("vocab") or any(key not in hparams for key in ARCHITECTURE):
        writer = f"; it is a {hparams['_class_path']} checkpoint" if "_class_path" in hparams else ""
        raise UserInputError(
            f"'{path}' is not a TinyGPT checkpoint (no vocabulary/architecture in its hyper-parameters{writer}). "
            "Pass a checkpoint written by the pretrain_tinygpt, sft_tinygpt or rl_lite stages."
        )
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    return list(hparams["vocab"]), {key: hparams[key] for key in ARCHITECTURE}, state


class TinyGPTModule(LightningModule):
    """Char-level next-character prediction (TinyGPT pretraining).

    The vocabulary comes from the data module at `setup` and is stored in the checkpoint's
    hyper-parameters, so `load_from_checkpoint` can sample right away.

    `init_from`: a TinyGPT-family checkpoint to start from; its vocabulary, architecture and weights
    replace `vocab`/`block_size`/`n_layer`/`n_head`/`n_embd` (it is read only while `vocab` is unset,
    so reloading this module's own checkpoint does not need the file any more).
    """

    def __init__(
        self,
        vocab: list[str] | None = None,
        block_size: PositiveInt = 64,
        n_layer: PositiveInt = 2,
        n_head: PositiveInt = 4,
        n_embd: PositiveInt = 64,
        dropout: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        sample_prompts: tuple[str, ...] = ("The ", "In 1990 , "),
        sample_chars: NonNegativeInt = 120,
        init_from: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer = optimizer
        self.model: TinyGPT | None = None
        self.val_loss = MeanMetric()
        self._last_batch_end: float | None = None
        if vocab is None and init_from is not None:
            vocab, architecture, state = read_tinygpt_checkpoint(init_from)
            self.hparams.update(architecture)
            self._build(vocab)
            self.model.load_state_dict(state)
        elif vocab is not None:
            self._build(vocab)

    def _build(self, vocab: list[str]) -> None:
        hp = self.hparams
        hp.vocab = list(vocab)
        self.tokenizer = CharTokenizer(hp.vocab)
        config = TinyGPTConfig(
            vocab_size=self.tokenizer.vocab_size,
            block_size=hp.block_size,
            n_layer=hp.n_layer,
            n_head=hp.n_head,
            n_embd=hp.n_embd,
            dropout=hp.dropout,
        )
        self.model = TinyGPT(config)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_vocab = getattr(datamodule, "vocab", None)
        if self.model is None:
            if data_vocab is None:
                raise UserInputError("TinyGPTModule needs a vocabulary: a data module with `vocab` or a checkpoint.")
            self._build(data_vocab)
        elif data_vocab is not None and list(data_vocab) != self.hparams.vocab:
            raise UserInputError(
                "The data's character vocabulary differs from the model's (checkpoint trained on other text). "
                "Pass the checkpoint's vocabulary to the data module or train a new model."
            )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch) -> torch.Tensor:
        """Mean cross-entropy over the targets that are not `-100` (all of them in pretraining)."""
        x, y = batch[0], batch[1]
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        require_finite("train/loss", loss, self.global_step)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's loss under DDP
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            tokens = batch[0].numel() * self.trainer.world_size
            self.log("train/tokens_per_sec", tokens / (now - self._last_batch_end))
        self._last_batch_end = now

    def validation_step(self, batch, batch_idx: int) -> None:
        self.val_loss.update(self._loss(batch), weight=(batch[1] != -100).sum())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log_dict({"val/loss": loss, "val/ppl": torch.exp(loss), "val/bpc": loss / math.log(2)}, prog_bar=True)
        self._last_batch_end = None
        if not self.trainer.sanity_checking:
            self.log_samples()

    def log_samples(self) -> None:
        rows = [[p, s] for p, s in zip(self.hparams.sample_prompts, self.sample(self.hparams.sample_prompts))]
        log_table(self.trainer, "samples/tinygpt", ["prompt", "completion"], rows)

    @torch.no_grad()
    def sample(self, prompts, max_new_chars: int | None = None, seed: int = 0) -> list[str]:
        """Completions (without the prompt) for each prompt, from a fixed seed."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        outputs = []
        for prompt in prompts:
            idx = self.tokenizer.encode(prompt).unsqueeze(0).to(self.device)
            out = self.model.generate(
                idx,
                max_new_chars or self.hparams.sample_chars,
                temperature=SAMPLE_TEMPERATURE,
                generator=generator,
            )
            outputs.append(self.tokenizer.decode(out[0, idx.size(1) :]))
        self.train(was_training)
        return outputs

    def configure_optimizers(self):
        return self.optimizer(self.parameters())
