"""Character-level instruction -> answer pairs cut from a corpus (the reference report's SFT data):
instruction = K characters, answer = the next K characters, one pair every `stride` characters,
written with a visible template so the model can tell the instruction from the answer."""

from bisect import bisect_left
from functools import cached_property
from typing import NamedTuple

import torch
from lightning.pytorch import LightningDataModule
from pydantic import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, Dataset

from lit_rlhf.data.loaders import resumable_loader
from lit_rlhf.errors import UserInputError
from lit_rlhf.tinygpt.corpus import read_corpus
from lit_rlhf.tinygpt.tokenizer import CharTokenizer
from lit_rlhf.tinygpt.wikitext import split_train_val

IGNORE_INDEX = -100  # F.cross_entropy's default: targets that carry no loss


class SFTExample(NamedTuple):
    """`x`/`y`: template + instruction + answer, `y` shifted by one and `IGNORE_INDEX` everywhere but
    on the answer; `prompt`: the ids the model continues at generation time (everything but the answer)."""

    x: torch.Tensor
    y: torch.Tensor
    prompt: torch.Tensor
    instruction: str
    target: str


def encode_pair(
    tokenizer: CharTokenizer, instruction: str, answer: str, instruction_prefix: str, answer_prefix: str
) -> SFTExample:
    prompt = tokenizer.encode(f"{instruction_prefix}{instruction}{answer_prefix}")
    ids = torch.cat((prompt, tokenizer.encode(answer)))
    y = ids[1:].clone()
    y[: len(prompt) - 1] = IGNORE_INDEX  # y[j] is ids[j + 1]: the answer starts at j = len(prompt) - 1
    return SFTExample(ids[:-1], y, prompt, instruction, answer)


def pair_starts(text_len: int, k: int, stride: int) -> list[int]:
    """Start of every instruction+answer window (2k characters) taken every `stride` characters."""
    return list(range(0, text_len - 2 * k + 1, stride))


def split_windows(starts: list[int], width: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random validation windows; training windows that overlap one of them are dropped, so
    no character of a validation pair is ever trained on (matters when stride < width)."""
    order = torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(starts) * val_fraction))
    val = sorted(starts[i] for i in order[:n_val])
    chosen = set(val)

    def overlaps(start: int) -> bool:
        i = bisect_left(val, start - width + 1)  # first validation window that may reach `start`
        return i < len(val) and val[i] < start + width

    train = [s for s in starts if s not in chosen and not overlaps(s)]
    return train, val


class SFTPairs(Dataset):
    def __init__(self, text: str, starts: list[int], k: int, tokenizer: CharTokenizer, prefixes: tuple[str, str]):
        self.text, self.starts, self.k, self.tokenizer, self.prefixes = text, starts, k, tokenizer, prefixes

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> SFTExample:
        s, k = self.starts[i], self.k
        return encode_pair(self.tokenizer, self.text[s : s + k], self.text[s + k : s + 2 * k], *self.prefixes)


class SFTCharsDataModule(LightningDataModule):
    """SFT pairs from the training text of a corpus (same sources as `WikiText2DataModule`).

    Args:
        path / name: as in `WikiText2DataModule` (hub id, local folder/file, `builtin:pydoc-topics`).
        vocab: the character vocabulary; None takes the model's (the pretraining checkpoint's), so
            ids mean the same characters as in pretraining. Characters outside it map to `<unk>`.
        k: characters in the instruction and in the answer (report: 64).
        stride: characters between the starts of two pairs (report: 128).
        instruction_prefix / answer_prefix: the visible template around the instruction.
        val_fraction / seed: the seeded split of the pairs (no character shared between splits).
        pretrain_val_fraction: the cut of a single-split corpus used by pretraining; pairs come from
            its training part only, as in the report.
        max_chars: keep only the first N characters of that text.
    """

    def __init__(
        self,
        path: str = "wikitext",
        name: str | None = "wikitext-2-raw-v1",
        vocab: list[str] | None = None,
        k: PositiveInt = 64,
        stride: PositiveInt = 128,
        instruction_prefix: str = "Instruction: ",
        answer_prefix: str = "\nAnswer: ",
        val_fraction: float = 0.1,
        seed: int = 42,
        pretrain_val_fraction: float = 0.1,
        max_chars: PositiveInt | None = None,
        batch_size: PositiveInt = 32,
        num_workers: NonNegativeInt = 0,
    ):
        super().__init__()
        self.save_hyperparameters()

    @cached_property
    def text(self) -> str:
        hp = self.hparams
        return split_train_val(read_corpus(hp.path, hp.name), hp.pretrain_val_fraction)[0][: hp.max_chars]

    @cached_property
    def tokenizer(self) -> CharTokenizer:
        vocab = self.hparams.vocab
        if vocab is None:
            model = self.trainer.lightning_module if self.trainer is not None else None
            vocab = getattr(model, "hparams", {}).get("vocab")
        if not vocab:
            raise UserInputError(
                "SFTCharsDataModule needs the pretraining vocabulary: pass data.vocab, or train it with a "
                "TinyGPT-family module started from a checkpoint (model.init_args.init_from)."
            )
        tokenizer = CharTokenizer(vocab)
        template = self.hparams.instruction_prefix + self.hparams.answer_prefix
        if missing := sorted({c for c in template if c not in tokenizer.index}):
            raise UserInputError(
                f"The template characters {missing} are not in the model's vocabulary, so the model could not "
                "see the template. Use characters from the pretraining text in instruction_prefix/answer_prefix."
            )
        return tokenizer

    @property
    def vocab(self) -> list[str]:
        return self.tokenizer.chars

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        starts = pair_starts(len(self.text), hp.k, hp.stride)
        if len(starts) < 2:
            raise UserInputError(
                f"The text of '{hp.path}' has {len(self.text)} characters: too few for two pairs of 2*k = "
                f"{2 * hp.k} characters every {hp.stride}. Raise max_chars or lower k/stride."
            )
        train, val = split_windows(starts, 2 * hp.k, hp.val_fraction, hp.seed)
        if not train:
            raise UserInputError("No training pair is left after removing those that overlap validation pairs.")
        if unknown := self.tokenizer.count_unknown(self.text):
            print(f"[lit_rlhf] {unknown} characters outside the model's vocabulary map to <unk>.")
        prefixes = (hp.instruction_prefix, hp.answer_prefix)
        self.train_set = SFTPairs(self.text, train, hp.k, self.tokenizer, prefixes)
        self.val_set = SFTPairs(self.text, val, hp.k, self.tokenizer, prefixes)

    def train_dataloader(self) -> DataLoader:
        return resumable_loader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            drop_last=len(self.train_set) > self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
