"""Any 2D MedMNIST flag (DermaMNIST, ChestMNIST, PneumoniaMNIST, BreastMNIST, ...) read through the
`medmnist` package, described by its `INFO` (channels, task, class names), held as one tensor.

A 28×28 MedMNIST set is a few tens of MB of uint8, so the whole split lives in memory (on the
training device once the trainer is known) and a batch is one indexing op; nothing is decoded to
PIL per sample as `medmnist`'s own `__getitem__` does.
"""

import difflib
import warnings
import zipfile
from pathlib import Path

import medmnist
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from medmnist import INFO
from medmnist.dataset import MedMNIST2D
from pydantic import PositiveInt
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.utils import calculate_md5

from lit_rlhf.data.loaders import resumable_loader
from lit_rlhf.errors import UserInputError

FLAGS = tuple(flag for flag, info in INFO.items() if issubclass(getattr(medmnist, info["python_class"]), MedMNIST2D))
SIZES = (28, 64)  # the DCGAN's generator / discriminator stacks
SPLITS = ("train", "val", "test")


def check_flag(flag: str) -> dict:
    """`INFO[flag]` of a 2D flag, or one paragraph naming the flags `medmnist` knows."""
    if flag in FLAGS:
        return INFO[flag]
    if flag in INFO:
        problem = f"'{flag}' is a 3D MedMNIST flag (volumes); the DCGAN and the classifier take 2D images."
    else:
        close = difflib.get_close_matches(flag, FLAGS, n=1)
        problem = f"MedMNIST flag '{flag}' is unknown to medmnist {medmnist.__version__}" + (
            f" (did you mean '{close[0]}'?)." if close else "."
        )
    raise UserInputError(f"{problem} Set --data.flag to one of the 2D flags of medmnist's INFO: {', '.join(FLAGS)}.")


def npz_name(flag: str, size: int) -> str:
    """The file name `medmnist` looks for: `dermamnist.npz` at 28 px, `dermamnist_64.npz` at 64."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def _size_key(key: str, size: int) -> str:
    """INFO's per-size keys: `url` / `MD5` at 28 px, `url_64` / `MD5_64` at 64."""
    return key if size == 28 else f"{key}_{size}"


def to_signed_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range of the generator's Tanh."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (for image files and Inception)."""
    return images.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def layout_problems(flag: str, size: int, images: np.ndarray, labels: np.ndarray) -> list[str]:
    """How arrays differ from what INFO says `flag` holds (dtype, image shape = channels, label
    columns, label values); empty when they fit."""
    info = INFO[flag]
    expected = (size, size) if info["n_channels"] == 1 else (size, size, 3)
    multi_label = info["task"].startswith("multi-label")
    n_columns, n_values = (len(info["label"]), 2) if multi_label else (1, len(info["label"]))
    problems = []
    if images.dtype != np.uint8 or images.shape[1:] != expected:
        problems.append(
            f"images {images.dtype} (N, {', '.join(map(str, images.shape[1:]))}) where {flag} has uint8 "
            f"(N, {', '.join(map(str, expected))}) ({info['n_channels']} channel(s))"
        )
    if labels.shape != (len(images), n_columns):
        problems.append(f"labels of shape {labels.shape} where {flag} ({info['task']}) has (N, {n_columns})")
    elif labels.size and (labels.min() < 0 or labels.max() >= n_values):
        problems.append(
            f"label values {labels.min()}..{labels.max()} where {flag} has "
            f"{'0/1 per label' if multi_label else f'classes 0..{n_values - 1}'}"
        )
    return problems


def save_medmnist_npz(root: str | Path, flag: str, splits: dict, size: int = 28) -> Path:
    """Write `{split}_images` / `{split}_labels` arrays in MedMNIST's exact `.npz` layout.

    `splits` maps "train"/"val"/"test" to (images, labels): uint8 images (N, H, W) for 1-channel
    flags or (N, H, W, 3) for 3-channel ones, labels (N, 1) class ids or (N, L) multi-hot.
    """
    arrays = {}
    for split, (images, labels) in splits.items():
        images, labels = np.asarray(images), np.asarray(labels)
        problems = layout_problems(flag, size, images, labels)
        if problems:
            raise ValueError(f"{flag} {split}: {'; '.join(problems)}")
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.astype(np.uint8)
    path = Path(root).expanduser() / npz_name(flag, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def check_md5(flag: str, size: int, file: Path) -> None:
    """Compare the file's MD5 with INFO's. Another flag's official file is refused (it would train
    on the wrong images under this flag's class names); any other difference (a subset, a re-saved
    file) is a warning, and the run goes on with the file."""
    md5 = calculate_md5(str(file))
    if md5 == INFO[flag][_size_key("MD5", size)]:
        return
    other = next((f for f in FLAGS for s in SIZES if INFO[f][_size_key("MD5", s)] == md5), None)
    if other is not None:
        raise UserInputError(
            f"'{file}' is the official {other} file (its MD5 {md5} is MedMNIST's for {other}), not {flag} data. "
            f"Set --data.flag {other} to use it, or put the official {file.name} "
            f"({INFO[flag][_size_key('url', size)]}) in --data.root."
        )
    warnings.warn(
        f"'{file}' is not the official MedMNIST {file.name}: its MD5 {md5} differs from the "
        f"{INFO[flag][_size_key('MD5', size)]} in medmnist's INFO. Continuing with this file as {flag} data; results "
        f"are not comparable with runs on the official file ({INFO[flag][_size_key('url', size)]}).",
        stacklevel=2,
    )


def load_split(
    flag: str, split: str, root: str | Path, size: int = 28, download: bool = False, verify_md5: bool = True
):
    """(images, labels) numpy arrays of one split through `medmnist.<Flag>MNIST`, checked against INFO.

    The arrays are read from the dataset object's `imgs` / `labels`: `medmnist`'s `__len__`
    asserts the official sample counts, which a subset in the same format would fail.
    `verify_md5`: compare the file with INFO's MD5 (`check_md5`; a download checks it itself).
    """
    info = check_flag(flag)
    folder = Path(root).expanduser()
    file = folder / npz_name(flag, size)
    url = info[_size_key("url", size)]
    if download:
        folder.mkdir(parents=True, exist_ok=True)
    elif not file.exists():
        raise UserInputError(
            f"MedMNIST file '{file.name}' not found in '{folder.resolve()}'. Place {file.name} (from {url}) in that "
            "folder, point --data.root at the folder that holds it, or pass --data.download true on a machine with "
            "internet access. Offline, use a flag whose file you have (--data.flag and --data.root; the project's "
            "real samples hold pneumoniamnist.npz and breastmnist.npz in $LIT_RLHF_DATA/medmnist)."
        )
    elif verify_md5:
        check_md5(flag, size, file)
    dataset_class = getattr(medmnist, info["python_class"])
    try:
        dataset = dataset_class(split=split, root=str(folder), size=size, download=download)
    except (KeyError, zipfile.BadZipFile, ValueError) as error:
        raise UserInputError(
            f"'{file}' is not a readable MedMNIST file: it should be an .npz holding the arrays "
            f"'{split}_images' and '{split}_labels' ({type(error).__name__}: {error}). Replace it with the official "
            f"{file.name} ({url})."
        ) from error
    except RuntimeError as error:
        raise UserInputError(
            f"Could not download MedMNIST '{file.name}' into '{folder.resolve()}' (the machine is probably "
            f"offline, or an existing file there is not the official one: its MD5 differs). Place {file.name} "
            f"in that folder yourself and run with --data.download false. ({str(error).strip().splitlines()[0]})"
        ) from error
    problems = layout_problems(flag, size, dataset.imgs, dataset.labels)
    if problems:
        raise UserInputError(
            f"'{file}' does not hold {flag} data as medmnist's INFO describes it: its {split} split has "
            f"{'; '.join(problems)}. It is probably another flag's file saved as {file.name}: set --data.flag to the "
            f"flag it holds, or replace it with the official {file.name} ({url})."
        )
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
    """Any 2D MedMNIST flag at 28 (or 64) px; channels, task and class names come from medmnist's
    `INFO` (DermaMNIST: 3 channels, 7 classes; ChestMNIST: 1 channel, 14 labels; PneumoniaMNIST and
    BreastMNIST: 1 channel, 2 classes).

    Args:
        flag: a 2D flag of `medmnist.INFO` (`FLAGS`), e.g. `dermamnist`, `pneumoniamnist`.
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
        batch_size: PositiveInt = 128,
    ):
        super().__init__()
        check_flag(flag)
        if size not in SIZES:
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

    @property
    def class_names(self) -> list[str]:
        return list(self.info["label"].values())

    def split(self, name: str) -> InMemoryImages:
        """One split as tensors (N, C, H, W) uint8 + labels: class ids (N,) or multi-hot float (N, L)."""
        if name not in self._splits:
            hp = self.hparams
            # the file's MD5 is checked once, with the first split read
            images, labels = load_split(hp.flag, name, hp.root, hp.size, hp.download, verify_md5=not self._splits)
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
