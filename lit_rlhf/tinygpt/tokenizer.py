"""Character vocabulary built from training text only; id 0 is `<unk>` for characters never seen."""

import torch

UNK = "<unk>"


class CharTokenizer:
    def __init__(self, chars: list[str]):
        if not chars or chars[0] != UNK:
            chars = [UNK, *[c for c in chars if c != UNK]]
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls([UNK, *sorted(set(text))])

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index.get(c, 0) for c in text], dtype=torch.long)

    def count_unknown(self, text: str) -> int:
        return sum(c not in self.index for c in text)

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join("" if i == 0 else self.chars[i] for i in ids)
