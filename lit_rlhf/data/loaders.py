"""The training loader every DataModule uses: shuffled from the run's seed and resumable."""

import torch
from torch.utils.data import RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader


class EpochShuffle(RandomSampler):
    """Epoch e's order is a function of (seed, e) alone, as in DistributedSampler: it does not
    depend on how many random numbers were drawn before, so a resumed run sees the same order.
    Lightning calls `set_epoch`, and swaps this for a DistributedSampler under DDP."""

    def __init__(self, data_source, seed: int):
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class LengthGroupedShuffle(EpochShuffle):
    """An epoch shuffle in which each run of `batch_size` indices has similar lengths, so a
    dynamically padded batch carries little padding (the idea of HF's LengthGroupedSampler).

    The seeded permutation is cut into windows of `batch_size * group_batches`, each sorted by
    length and cut into batches; the full batches are then shuffled (the short remainder comes
    last, so batch boundaries stay aligned). Batches remain random in composition across windows
    and epochs. Under DDP Lightning swaps it for a DistributedSampler, which does not group.
    """

    def __init__(self, data_source, seed: int, lengths: list[int], batch_size: int, group_batches: int = 50):
        super().__init__(data_source, seed)
        if len(lengths) != len(data_source):
            raise ValueError(f"{len(lengths)} lengths for {len(data_source)} items")
        self.lengths, self.batch_size, self.group_batches = torch.as_tensor(lengths), batch_size, group_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.data_source), generator=generator)
        batches = []
        for window in order.split(self.batch_size * self.group_batches):
            batches += window[self.lengths[window].argsort(descending=True, stable=True)].split(self.batch_size)
        full = [b for b in batches if len(b) == self.batch_size]
        rest = [b for b in batches if len(b) < self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator)] + rest
        yield from torch.cat(shuffled).tolist() if shuffled else []


def resumable_loader(
    dataset, batch_size: int | None, shuffle: bool = True, lengths: list[int] | None = None, **kwargs
) -> StatefulDataLoader:
    """A DataLoader whose position Lightning stores in every checkpoint, so `--ckpt_path last`
    continues the epoch with the batches that were not seen yet, in the same order. The order
    comes from `seed_everything`'s seed (`torch.initial_seed()`); with `lengths`, batches are
    length-grouped (`LengthGroupedShuffle`)."""
    sampler = None
    if shuffle:
        seed = torch.initial_seed()
        sampler = (
            EpochShuffle(dataset, seed) if lengths is None else LengthGroupedShuffle(dataset, seed, lengths, batch_size)
        )
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
