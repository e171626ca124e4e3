"""Worker functions for `torch.multiprocessing.spawn` in tests: they must live in a module the
spawned processes can import by name (`tests/` is on the path, test files are not packages)."""

import os

import torch
import torch.distributed as dist

from lit_rlhf.rl.common import AdaptiveKLController, masked_mean, masked_whiten


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.arange(24, dtype=torch.float32).reshape(4, 6) ** 1.5
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] + [0] * 5], dtype=torch.float32)
    return values, mask


def sum_across(total: torch.Tensor) -> torch.Tensor:
    total = total.clone()
    dist.all_reduce(total)
    return total


def rank_main(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    values, mask = batch()
    half = slice(2 * rank, 2 * rank + 2)
    kl = masked_mean(values[half], mask[half], sum_across=sum_across)
    controller = AdaptiveKLController(0.05, 0.05, 100)
    controller.update(kl.item() / 100, n_steps=4)
    out[rank] = (masked_whiten(values[half], mask[half], sum_across=sum_across), kl, controller.value)
    dist.destroy_process_group()
