"""StreamingCheckpointIO: checkpoints stream to a temporary file and are renamed onto the target, so a
save holds no in-memory copy of the checkpoint and a crash mid-save leaves the previous one whole."""

import os
import tracemalloc

import fsspec
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_rlhf.checkpoint_io import StreamingCheckpointIO


def python_peak_bytes_of_save(io, path, state) -> int:
    """Peak Python-heap allocation during a save: a BytesIO copy of the checkpoint shows up here, the
    tensors' own storage does not."""
    tracemalloc.start()
    try:
        io.save_checkpoint(state, path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_saving_holds_no_in_memory_copy_of_the_checkpoint(tmp_path):
    weight = torch.ones(50_000_000)  # 200 MB
    state = {"state_dict": {"weight": weight}, "global_step": 3}
    size = weight.numel() * weight.element_size()

    lightning_peak = python_peak_bytes_of_save(TorchCheckpointIO(), tmp_path / "lightning.ckpt", state)
    assert lightning_peak > size  # the measure sees Lightning's BytesIO (kept: it shows the measure works)
    ours = python_peak_bytes_of_save(StreamingCheckpointIO(), tmp_path / "ours.ckpt", state)
    print(
        f"peak Python allocation while saving {size / 1e6:.0f} MB: Lightning {lightning_peak / 1e6:.1f} MB, "
        f"StreamingCheckpointIO {ours / 1e6:.1f} MB"
    )
    assert ours < 0.05 * size
    loaded = StreamingCheckpointIO().load_checkpoint(tmp_path / "ours.ckpt", weights_only=True)
    assert loaded["global_step"] == 3 and torch.equal(loaded["state_dict"]["weight"], weight)
    assert sorted(os.listdir(tmp_path)) == ["lightning.ckpt", "ours.ckpt"]


def test_crash_mid_save_keeps_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    io = StreamingCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(1000.0)}, "global_step": 5}, last)
    before = last.read_bytes()

    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        real_save(obj, f)  # a whole checkpoint's bytes already written to the file being saved...
        f.truncate(f.tell() // 2)  # ...then half of them lost, and the disk fills up
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="simulated"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 6}, last)
    assert last.read_bytes() == before
    assert os.listdir(last.parent) == ["last.ckpt"]
    assert torch.load(last, weights_only=True)["global_step"] == 5


def test_remote_paths_use_lightnings_save(tmp_path):
    """fsspec's in-memory filesystem stands for a remote store: no temporary file to rename there."""
    StreamingCheckpointIO().save_checkpoint({"global_step": 7}, "memory://ckpts/last.ckpt")
    with fsspec.open("memory://ckpts/last.ckpt", "rb") as f:
        assert torch.load(f, weights_only=True)["global_step"] == 7
    assert fsspec.filesystem("memory").ls("/ckpts", detail=False) == ["/ckpts/last.ckpt"]
