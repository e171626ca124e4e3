"""Tiny `.npz` files in MedMNIST's exact layout (class-dependent images a small CNN tells apart, or
slices of the real PneumoniaMNIST / BreastMNIST files) and a tiny DCGAN fit."""

from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from medmnist import INFO

from lit_rlhf.dcgan.medmnist import MedMNISTDataModule, save_medmnist_npz
from lit_rlhf.dcgan.module import DCGAN


def tiny_split(flag: str, n: int, rng: np.random.Generator, size: int = 28):
    """Class k: a bright square at a k-dependent place on a k-dependent background, plus noise."""
    info = INFO[flag]
    n_classes = len(info["label"])
    classes = rng.integers(0, n_classes, n)
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((n, size, size, 3), np.float32)
    for i, k in enumerate(classes):
        top, left = 2 + 3 * (k % 7), 2 + 3 * (k // 7) * 3
        square = (yy >= top) & (yy < top + 6) & (xx >= left) & (xx < left + 6)
        background = np.array([40 + 25 * (k % 7), 120, 200 - 20 * (k % 7)], np.float32)
        images[i] = background + 180 * square[..., None] + rng.normal(0, 12, (size, size, 3))
    images = images.clip(0, 255).astype(np.uint8)
    if info["n_channels"] == 1:
        images = images.mean(-1).astype(np.uint8)
    if info["task"].startswith("multi-label"):
        labels = np.zeros((n, n_classes), np.uint8)
        labels[np.arange(n), classes] = 1
    else:
        labels = classes[:, None].astype(np.uint8)
    return images, labels


def write_tiny_medmnist(
    root: Path, flag: str, n_train: int = 64, n_val: int = 16, n_test: int = 16, size: int = 28, seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    splits = {
        split: tiny_split(flag, n, rng, size) for split, n in (("train", n_train), ("val", n_val), ("test", n_test))
    }
    return save_medmnist_npz(root, flag, splits, size=size)


def real_medmnist(data_root: Path, flag: str) -> Path:
    """The official `<flag>.npz` under LIT_RLHF_DATA/medmnist (the test is skipped without it)."""
    path = data_root / "medmnist" / f"{flag}.npz"
    if not path.exists():
        pytest.skip(f"{path} not found: the real MedMNIST files live in $LIT_RLHF_DATA/medmnist")
    return path


def real_arrays(data_root: Path, flag: str, split: str, start: int = 0, stop: int | None = None):
    """(images, labels) of `split`[start:stop] of the real file."""
    with np.load(real_medmnist(data_root, flag)) as arrays:
        return arrays[f"{split}_images"][start:stop], arrays[f"{split}_labels"][start:stop]


def write_real_slice(
    data_root: Path, root: Path, flag: str, n_train: int = 64, n_val: int = 16, n_test: int = 16
) -> Path:
    """The first images of each split of the real file, written in MedMNIST's layout under `root`."""
    counts = {"train": n_train, "val": n_val, "test": n_test}
    return save_medmnist_npz(
        root, flag, {split: real_arrays(data_root, flag, split, 0, n) for split, n in counts.items()}
    )


def fit_tiny_dcgan(
    root: Path, flag: str = "dermamnist", epochs: int = 2, data: Path | None = None, **model_args
) -> tuple[DCGAN, Trainer]:
    """A width-8 DCGAN fitted on 48 images (3 batches an epoch), run folder `root/run`: tiny synthetic
    ones, or those of the `.npz` already in `data`."""
    if data is None:
        data = root / "data"
        write_tiny_medmnist(data, flag, n_train=48)
    model = DCGAN(latent_dim=16, ngf=8, ndf=8, sample_every_n_epochs=1, plot_first_epochs=1, **model_args)
    trainer = Trainer(
        default_root_dir=root / "run",
        max_epochs=epochs,
        logger=CSVLogger(root / "run", name="csv"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    trainer.fit(model, MedMNISTDataModule(flag=flag, root=str(data), val_split=None, batch_size=16))
    return model, trainer
