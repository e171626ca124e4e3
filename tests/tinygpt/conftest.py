"""A TinyGPT-family checkpoint without training, for the stages that start from one."""

from pathlib import Path

import pytest
import torch

from lit_rlhf.tinygpt.pretrain import TinyGPTModule


@pytest.fixture
def tinygpt_checkpoint(tmp_path):
    """`make(vocab, **architecture) -> path`: a Lightning checkpoint (hyper-parameters + state
    dict) of a freshly initialised TinyGPTModule."""

    def make(vocab: list[str], seed: int = 0, **architecture) -> Path:
        torch.manual_seed(seed)
        module = TinyGPTModule(vocab=vocab, **architecture)
        path = tmp_path / f"tinygpt_{seed}.ckpt"
        torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
        return path

    return make
