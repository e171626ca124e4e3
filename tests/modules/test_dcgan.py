from pathlib import Path

import pytest
import torch
from medmnist_helpers import fit_tiny_dcgan
from PIL import Image

from lit_rlhf.cli import LitRLHFCLI
from lit_rlhf.modules.dcgan import DCGAN

REPO = Path(__file__).resolve().parents[2]


def test_short_fit_trains_both_networks_writes_8x4_grids_and_reloads(tmp_path):
    torch.manual_seed(0)
    reference = DCGAN(latent_dim=16, ngf=8, ndf=8, channels=3, image_size=28)
    model, trainer = fit_tiny_dcgan(tmp_path)
    assert trainer.global_step == 2 * 2 * 3  # 3 batches an epoch, one step per optimizer
    for name in ("generator", "discriminator"):
        before = torch.cat([p.flatten() for p in getattr(reference, name).parameters()])
        after = torch.cat([p.flatten() for p in getattr(model, name).parameters()])
        assert not torch.allclose(before, after), f"{name} did not train"
    logged = trainer.logged_metrics
    for key in ("train/loss_d", "train/loss_g", "train/d_real", "train/d_fake"):
        assert torch.isfinite(logged[key])
    assert 0 <= logged["train/d_real"] <= 1 and 0 <= logged["train/d_fake"] <= 1

    samples = tmp_path / "run" / "samples"
    assert {p.name for p in samples.glob("*.png")} == {
        "grid_epoch_0001.png", "grid_epoch_0002.png", "grid_final.png", "early_training.png"}
    grid = Image.open(samples / "grid_final.png")
    tile = 112 + 4  # 28 px upscaled 4× plus the padding
    assert grid.size == (8 * tile + 4, 4 * tile + 4)  # 8 columns × 4 rows = 32 samples

    trainer.save_checkpoint(tmp_path / "model.ckpt")
    reloaded = DCGAN.load_from_checkpoint(tmp_path / "model.ckpt")
    assert (reloaded.hparams.channels, reloaded.hparams.image_size) == (3, 28)
    images = reloaded.generate(10, seed=1)
    assert images.shape == (10, 3, 28, 28)
    assert torch.equal(images, reloaded.generate(10, seed=1))
    assert images.std() > 0.01  # batch statistics: not the flat grey of lagging running averages


@pytest.mark.parametrize("config", ["dcgan_dermamnist.yaml", "dcgan_chestmnist.yaml"])
def test_configs_follow_the_task(config):
    cli = LitRLHFCLI(args=["--config", str(REPO / "configs" / config)], run=False)
    assert cli.trainer.max_epochs >= 1000
    model = cli.model
    for factory in (model.optimizer_g, model.optimizer_d):
        optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
        assert isinstance(optimizer, torch.optim.Adam)
        assert optimizer.defaults["betas"] == (0.5, 0.999) and optimizer.defaults["lr"] == 2e-4
