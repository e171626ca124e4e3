"""A small MedMNIST classifier: its accuracy is reported, and its penultimate layer is the feature
space of the GAN's domain Fréchet distance / KID (Inception weights cannot be had offline, and
ImageNet features say little about 28×28 medical images anyway)."""

from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MultilabelAccuracy

from lit_rlhf.errors import UserInputError, load_checkpoint, require_finite


def conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]


class MedMNISTClassifier(LightningModule):
    """Three conv stages (28 -> 14 -> 7 -> global average) -> `feature_dim` features -> class logits.

    Multi-class and binary flags (DermaMNIST, PneumoniaMNIST, BreastMNIST) train with cross-entropy,
    multi-label ones (ChestMNIST) with per-label BCE. `channels` / `num_classes` / `multi_label` come
    from the data module at `setup` and are stored in the checkpoint.
    """

    def __init__(
        self,
        channels: int | None = None,
        num_classes: int | None = None,
        multi_label: bool | None = None,
        width: int = 32,
        feature_dim: int = 128,
        optimizer: OptimizerCallable = torch.optim.Adam,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer = optimizer
        self.body: nn.Module | None = None
        if None not in (channels, num_classes, multi_label):
            self._build()

    def _build(self) -> None:
        hp = self.hparams
        w = hp.width
        self.body = nn.Sequential(
            *conv_block(hp.channels, w),
            *conv_block(w, w),
            nn.MaxPool2d(2),
            *conv_block(w, 2 * w),
            *conv_block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *conv_block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, hp.feature_dim),
            nn.ReLU(True),
        )
        self.head = nn.Linear(hp.feature_dim, hp.num_classes)
        if hp.multi_label:
            self.train_acc, self.val_acc = (MultilabelAccuracy(num_labels=hp.num_classes) for _ in range(2))
        else:
            self.train_acc, self.val_acc = (
                MulticlassAccuracy(num_classes=hp.num_classes, average="micro") for _ in range(2)
            )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data = tuple(getattr(datamodule, name, None) for name in ("channels", "num_classes", "multi_label"))
        if self.body is None:
            if None in data:
                raise UserInputError(
                    "MedMNISTClassifier needs channels/num_classes: a MedMNIST data module or a checkpoint."
                )
            self.hparams.channels, self.hparams.num_classes, self.hparams.multi_label = data
            self._build()
        elif None not in data and data != (self.hparams.channels, self.hparams.num_classes, self.hparams.multi_label):
            raise UserInputError(
                f"The data has (channels, classes, multi-label) {data}, the classifier was built for "
                f"{(self.hparams.channels, self.hparams.num_classes, self.hparams.multi_label)}."
            )

    @property
    def num_features(self) -> int:
        return self.hparams.feature_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations of [-1, 1] images: the GAN metrics' feature space."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))

    @property
    def histogram_bins(self) -> list[str]:
        """Names of `classify`'s bins: the classes, plus "no finding" first for multi-label flags."""
        names = [str(i) for i in range(self.hparams.num_classes)]
        return ["none", *names] if self.hparams.multi_label else names

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One histogram bin per image and the classifier's confidence in it.

        Multi-class: the argmax class and its softmax probability. Multi-label: bin 0 ("no
        finding", confidence 1 - the top label probability) when no label reaches 0.5, else
        1 + the most likely label and its probability.
        """
        logits = self(images)
        if not self.hparams.multi_label:
            confidence, label = logits.softmax(-1).max(-1)
            return label, confidence
        best, label = logits.sigmoid().max(-1)
        found = best >= 0.5
        return torch.where(found, label + 1, torch.zeros_like(label)), torch.where(found, best, 1 - best)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.hparams.multi_label:
            return F.binary_cross_entropy_with_logits(logits, labels)
        return F.cross_entropy(logits, labels)

    def _targets(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.long() if self.hparams.multi_label else labels

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self._loss(logits, labels)
        require_finite("train/loss", loss, self.global_step)
        self.train_acc(logits, self._targets(labels))
        self.log_dict({"train/loss": loss, "train/acc": self.train_acc}, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, self._targets(labels))
        self.log_dict({"val/loss": self._loss(logits, labels), "val/acc": self.val_acc}, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, self._targets(labels))
        self.log_dict({"test/loss": self._loss(logits, labels), "test/acc": self.val_acc})

    def configure_optimizers(self):
        return self.optimizer(self.parameters())


def load_classifier(
    path: str | Path, option: str, flag: str | None, channels: int, missing_hint: str = ""
) -> MedMNISTClassifier:
    """A trained classifier (weights-only load, eval mode) for the DCGAN's images: `channels` of them,
    from `flag` (checked against the flag in the checkpoint's data module settings, when both are
    known: two binary grayscale flags have the same shapes but not the same features). A checkpoint of
    another stage is refused here rather than deep inside `load_from_checkpoint`."""
    retrain = f"python -m lit_rlhf fit --config configs/dcgan/classifier.yaml --data.flag {flag}"
    if not Path(path).expanduser().exists():
        raise UserInputError(
            f"{option} '{path}' does not exist: train the classifier of {flag} first ({retrain}; it "
            "writes checkpoints/best.ckpt under its trainer.default_root_dir) or pass the path of one."
            f"{missing_hint}"
        )
    checkpoint = load_checkpoint(path, f"classifier checkpoint ({option})")
    hparams = checkpoint.get("hyper_parameters") or {}
    if any(hparams.get(key) is None for key in ("channels", "num_classes", "multi_label", "feature_dim")):
        raise UserInputError(
            f"{option} '{path}' is not a MedMNISTClassifier checkpoint (no channels/num_classes/feature_dim in its "
            "hyper-parameters). Pass a checkpoint of configs/dcgan/classifier.yaml."
        )
    trained_on = (checkpoint.get("datamodule_hyper_parameters") or {}).get("flag")
    if hparams["channels"] != channels:
        raise UserInputError(
            f"The classifier {option} '{path}' takes {hparams['channels']}-channel images, the DCGAN "
            f"makes {channels}-channel ones: train one on {flag} ({retrain})."
        )
    if None not in (trained_on, flag) and trained_on != flag:
        raise UserInputError(
            f"The classifier {option} '{path}' was trained on {trained_on}, the DCGAN on {flag}: its "
            f"features would measure the wrong domain. Pass a classifier of {flag}, or train one "
            f"({retrain})."
        )
    return MedMNISTClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
