"""WikiText-2 (raw) as character windows for TinyGPT pretraining."""

from functools import cached_property

import torch
from lightning.pytorch import LightningDataModule
from pydantic import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, Dataset

from lit_rlhf.data.loaders import resumable_loader
from lit_rlhf.errors import UserInputError
from lit_rlhf.tinygpt.corpus import read_corpus
from lit_rlhf.tinygpt.tokenizer import CharTokenizer


class CharWindows(Dataset):
    """Non-overlapping (x, y) windows of `block_size` characters, y shifted by one."""

    def __init__(self, ids: torch.Tensor, block_size: int):
        self.ids = ids
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block_size

    def __getitem__(self, i: int):
        chunk = self.ids[i * self.block_size : (i + 1) * self.block_size + 1]
        return chunk[:-1], chunk[1:]


def split_train_val(corpus: dict[str, str], val_fraction: float) -> tuple[str, str]:
    """The corpus' own train/validation splits, else the one split cut contiguously (no overlap)."""
    if "train" in corpus and "validation" in corpus:
        return corpus["train"], corpus["validation"]
    text = corpus.get("train") or next(iter(corpus.values()))
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


class WikiText2DataModule(LightningDataModule):
    """Character-level WikiText-2.

    Args:
        path: hub dataset id (default `wikitext`), a local folder/file (`wiki.{train,valid,test}.raw`,
            `.txt`, `.parquet`), or `builtin:pydoc-topics` (Python's own docs, offline everywhere).
        name: hub config name.
        train_chars / val_chars: keep only the first N / M characters (the reference report used
            20 000 / 4 000); None keeps all.
        val_fraction: used when the source has a single split, cut contiguously.
    """

    def __init__(
        self,
        path: str = "wikitext",
        name: str | None = "wikitext-2-raw-v1",
        block_size: PositiveInt = 64,
        batch_size: PositiveInt = 16,
        train_chars: PositiveInt | None = None,
        val_chars: PositiveInt | None = None,
        val_fraction: float = 0.1,
        num_workers: NonNegativeInt = 0,
    ):
        super().__init__()
        self.save_hyperparameters()

    @cached_property
    def texts(self) -> tuple[str, str]:
        hp = self.hparams
        train, val = split_train_val(read_corpus(hp.path, hp.name), hp.val_fraction)
        train, val = train[: hp.train_chars], val[: hp.val_chars]
        for split, text in (("train", train), ("validation", val)):
            if len(text) <= hp.block_size:
                raise UserInputError(
                    f"The {split} text of '{hp.path}' has {len(text)} characters after slicing, but "
                    f"block_size is {hp.block_size}: at least block_size + 1 characters are needed. "
                    "Raise train_chars/val_chars or lower block_size."
                )
        return train, val

    @cached_property
    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer.from_text(self.texts[0])

    @property
    def vocab(self) -> list[str]:
        return self.tokenizer.chars

    def setup(self, stage: str | None = None) -> None:
        train, val = self.texts
        unknown = self.tokenizer.count_unknown(val)
        if unknown:
            print(f"[lit_rlhf] {unknown} validation characters never seen in training map to <unk>.")
        block = self.hparams.block_size
        self.train_set = CharWindows(self.tokenizer.encode(train), block)
        self.val_set = CharWindows(self.tokenizer.encode(val), block)

    def train_dataloader(self) -> DataLoader:
        return resumable_loader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            drop_last=True,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

    test_dataloader = val_dataloader
