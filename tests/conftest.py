"""Shared fixtures: offline environment, the real data samples, tiny HF models built from a config."""

import os
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_llama_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path):
    """No hub; W&B files in the test's folder. WANDB_MODE stays the user's (unset: the project's own
    offline default is what the tests see); the embedded model cache stays shared."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    torch.manual_seed(0)
    yield
    import wandb

    if wandb.run is not None:  # Lightning leaves an in-process run open; the next test's logger would reuse it
        wandb.finish()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data samples (`LIT_RLHF_DATA`, or ../shared/data beside the repo)."""
    root = Path(os.environ.get("LIT_RLHF_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real data samples not found at {root}; set LIT_RLHF_DATA")
    return root


@pytest.fixture(scope="session")
def smol_tokenizer_dir() -> Path:
    """The embedded SmolLM2 folder (converted once per machine); used for its real tokenizer."""
    from lit_rlhf.models.hf import embedded_smollm2_folder

    return embedded_smollm2_folder()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"), smol_tokenizer_dir)


@pytest.fixture
def one_thread():
    """Tiny models train faster on one intra-op thread; on a busy 2-core machine two threads wait
    for each other at every op and make a TinyGPT test ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
