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


def resumable_loader(dataset, batch_size: int | None, shuffle: bool = True, **kwargs) -> StatefulDataLoader:
    """A DataLoader whose position Lightning stores in every checkpoint, so `--ckpt_path last`
    continues the epoch with the batches that were not seen yet, in the same order. The order
    comes from `seed_everything`'s seed (`torch.initial_seed()`)."""
    sampler = EpochShuffle(dataset, torch.initial_seed()) if shuffle else None
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
