"""MedMNIST (DermaMNIST / ChestMNIST) read through the `medmnist` package, held as one tensor.

A 28×28 MedMNIST set is a few tens of MB of uint8, so the whole split lives in memory (on the
training device once the trainer is known) and a batch is one indexing op; nothing is decoded to
PIL per sample as `medmnist`'s own `__getitem__` does.
"""

import zipfile
from pathlib import Path

import medmnist
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from medmnist import INFO
from torch.utils.data import DataLoader, Dataset

from lit_rlhf.data.loaders import resumable_loader
from lit_rlhf.errors import UserInputError

FLAGS = ("dermamnist", "chestmnist")
SPLITS = ("train", "val", "test")


def npz_name(flag: str, size: int) -> str:
    """The file name `medmnist` looks for: `dermamnist.npz` at 28 px, `dermamnist_64.npz` at 64."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def to_signed_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range of the generator's Tanh."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (for image files and Inception)."""
    return images.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def save_medmnist_npz(root: str | Path, flag: str, splits: dict, size: int = 28) -> Path:
    """Write `{split}_images` / `{split}_labels` arrays in MedMNIST's exact `.npz` layout.

    `splits` maps "train"/"val"/"test" to (images, labels): uint8 images (N, H, W) for 1-channel
    flags or (N, H, W, 3) for 3-channel ones, labels (N, 1) class ids or (N, L) multi-hot.
    """
    info = INFO[flag]
    arrays = {}
    for split, (images, labels) in splits.items():
        images, labels = np.asarray(images), np.asarray(labels)
        expected = (size, size) if info["n_channels"] == 1 else (size, size, 3)
        if images.dtype != np.uint8 or images.shape[1:] != expected:
            raise ValueError(f"{flag} {split} images must be uint8 (N, {', '.join(map(str, expected))}), got "
                             f"{images.dtype} {images.shape}")
        n_labels = len(info["label"]) if info["task"].startswith("multi-label") else 1
        if labels.shape != (len(images), n_labels):
            raise ValueError(f"{flag} {split} labels must have shape (N, {n_labels}), got {labels.shape}")
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.astype(np.uint8)
    path = Path(root).expanduser() / npz_name(flag, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def load_split(flag: str, split: str, root: str | Path, size: int = 28, download: bool = False):
    """(images, labels) numpy arrays of one split through `medmnist.<Flag>MNIST`.

    The arrays are read from the dataset object's `imgs` / `labels`: `medmnist`'s `__len__`
    asserts the official sample counts, which a subset or a stand-in file in the same format
    would fail.
    """
    if flag not in FLAGS:
        raise UserInputError(f"MedMNIST flag '{flag}' is not supported here; use one of {', '.join(FLAGS)}.")
    info = INFO[flag]
    folder = Path(root).expanduser()
    file = folder / npz_name(flag, size)
    if download:
        folder.mkdir(parents=True, exist_ok=True)
    elif not file.exists():
        raise UserInputError(
            f"MedMNIST file '{file.name}' not found in '{folder.resolve()}'. Place {file.name} (from "
            f"{info['url' if size == 28 else f'url_{size}']}) in that folder, point --data.root at the folder "
            "that holds it, or pass --data.download true on a machine with internet access. Offline, "
            "scripts/make_medmnist_standin.py writes a stand-in file in the same format."
        )
    dataset_class = getattr(medmnist, info["python_class"])
    try:
        dataset = dataset_class(split=split, root=str(folder), size=size, download=download)
    except (KeyError, zipfile.BadZipFile, ValueError) as error:
        raise UserInputError(
            f"'{file}' is not a readable MedMNIST file: it should be an .npz holding the arrays "
            f"'{split}_images' and '{split}_labels' ({type(error).__name__}: {error}). Replace it with the official "
            f"{file.name} or write a stand-in with scripts/make_medmnist_standin.py."
        ) from error
    except RuntimeError as error:
        raise UserInputError(
            f"Could not download MedMNIST '{file.name}' into '{folder.resolve()}' (the machine is probably "
            f"offline, or an existing file there is not the official one: its MD5 differs). Place {file.name} "
            f"in that folder yourself and run with --data.download false. ({str(error).strip().splitlines()[0]})"
        ) from error
    return dataset.imgs, dataset.labels


class InMemoryImages(Dataset):
    """uint8 images (N, C, H, W) + labels as tensors; `__getitems__` returns a whole batch
    (images scaled to [-1, 1]) with one fancy-indexing op. Use with `collate_fn=as_batch`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.size(0)

    def __getitem__(self, index: int):
        return to_signed_unit(self.images[index]), self.labels[index]

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices, device=self.images.device)
        return to_signed_unit(self.images[index]), self.labels[index]

    def to(self, device: torch.device) -> "InMemoryImages":
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self


def as_batch(batch):
    """`__getitems__` already returns the collated batch."""
    return batch


class MedMNISTDataModule(LightningDataModule):
    """DermaMNIST (3 channels, 7 classes) or ChestMNIST (1 channel, 14 labels) at 28 (or 64) px.

    Args:
        flag: `dermamnist` or `chestmnist`.
        size: 28 (`<flag>.npz`) or 64 (`<flag>_64.npz`).
        root: folder holding the `.npz` (medmnist's default is ~/.medmnist).
        download: fetch the official file from Zenodo if it is missing (needs internet).
        train_splits: the splits trained on (a GAN may use ["train", "val"]).
        val_split / test_split: the held-out splits (None: no such loader).
        batch_size: images per step; the last incomplete training batch is dropped (BatchNorm).
    """

    def __init__(
        self,
        flag: str = "dermamnist",
        size: int = 28,
        root: str = "~/.medmnist",
        download: bool = False,
        train_splits: tuple[str, ...] = ("train",),
        val_split: str | None = "val",
        test_split: str | None = "test",
        batch_size: int = 128,
    ):
        super().__init__()
        if flag not in FLAGS:
            raise UserInputError(f"MedMNIST flag '{flag}' is not supported here; use one of {', '.join(FLAGS)}.")
        if size not in (28, 64):
            raise UserInputError(f"MedMNIST size {size} is not supported by the DCGAN stage; use 28 or 64.")
        for split in (*train_splits, val_split, test_split):
            if split is not None and split not in SPLITS:
                raise UserInputError(f"Unknown MedMNIST split '{split}'; the splits are {', '.join(SPLITS)}.")
        self.save_hyperparameters()
        self._splits: dict[str, InMemoryImages] = {}

    @property
    def info(self) -> dict:
        return INFO[self.hparams.flag]

    @property
    def channels(self) -> int:
        return self.info["n_channels"]

    @property
    def multi_label(self) -> bool:
        return self.info["task"].startswith("multi-label")

    @property
    def num_classes(self) -> int:
        return len(self.info["label"])

    def split(self, name: str) -> InMemoryImages:
        """One split as tensors (N, C, H, W) uint8 + labels: class ids (N,) or multi-hot float (N, L)."""
        if name not in self._splits:
            hp = self.hparams
            images, labels = load_split(hp.flag, name, hp.root, hp.size, hp.download)
            images = torch.from_numpy(np.ascontiguousarray(images))
            images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2).contiguous()
            labels = torch.from_numpy(labels.astype(np.int64))
            labels = labels.float() if self.multi_label else labels[:, 0]
            self._splits[name] = InMemoryImages(images, labels)
        return self._splits[name]

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit"):
            parts = [self.split(name) for name in hp.train_splits]
            self.train_set = InMemoryImages(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
            if len(self.train_set) < hp.batch_size:
                raise UserInputError(
                    f"The {'+'.join(hp.train_splits)} split of {hp.flag} has {len(self.train_set)} images, fewer than "
                    f"batch_size {hp.batch_size}: lower --data.batch_size."
                )
        if stage in (None, "fit", "validate") and hp.val_split:
            self.val_set = self.split(hp.val_split)
        if stage in (None, "test") and hp.test_split:
            self.test_set = self.split(hp.test_split)

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _loader(self, dataset: InMemoryImages, train: bool) -> DataLoader:
        loader = resumable_loader if train else DataLoader
        return loader(
            dataset.to(self._device()),
            batch_size=self.hparams.batch_size,
            shuffle=train,
            drop_last=train,
            collate_fn=as_batch,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False) if self.hparams.val_split else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False) if self.hparams.test_split else []
