"""Callbacks every `python -m lit_rlhf` run gets (added by the CLI, see `lit_rlhf.cli`)."""

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import Callback


def _portable(states: dict) -> dict:
    """RNG states as tensors, tuples and ints only, so checkpoints load with `weights_only=True`."""
    name, keys, pos, has_gauss, gauss = states["numpy"]
    return {**states, "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def _native(states: dict) -> dict:
    name, keys, pos, has_gauss, gauss = states["numpy"]
    return {**states, "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)}


class RandomStatePerRank(Callback):
    """Distinct random streams per rank, saved in checkpoints and restored on resume.

    `seed_everything` gives every DDP rank the same seed, so ranks would draw the same GAN noise
    and the same rollout samples; rank r is re-seeded with seed + r (rank 0 keeps the seed, so
    one-device runs are unchanged). Lightning restores weights, optimizers and loop counters but
    not random states: this callback stores every rank's torch/numpy/python state in each
    checkpoint, so a resumed run draws the same dropout masks and samples as one that never stopped.
    """

    def __init__(self) -> None:
        self._to_restore: list[dict] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1 and trainer.global_rank > 0:
            torch.manual_seed(torch.initial_seed() + trainer.global_rank)
            np.random.seed((torch.initial_seed() + trainer.global_rank) % 2**32)
        self._rank, self._world = trainer.global_rank, trainer.world_size

    def state_dict(self) -> dict:
        states = _portable(_collect_rng_states(include_cuda=torch.cuda.is_available()))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            return {"ranks": gathered}
        return {"ranks": [states]}

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_restore = state_dict["ranks"]

    def on_train_start(self, trainer, pl_module) -> None:
        """Restore here, after the sanity check and just before the first resumed step."""
        if self._to_restore is None:
            return
        if len(self._to_restore) == trainer.world_size:
            _set_rng_states(_native(self._to_restore[trainer.global_rank]))
        else:
            print(
                f"[lit_rlhf] the checkpoint holds random states of {len(self._to_restore)} ranks, this run has "
                f"{trainer.world_size}: continuing with fresh per-rank random streams."
            )
        self._to_restore = None
