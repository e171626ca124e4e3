import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from medmnist_helpers import fit_tiny_dcgan, write_real_slice
from PIL import Image

from lit_rlhf.cli import LitRLHFCLI
from lit_rlhf.dcgan.classifier import MedMNISTClassifier
from lit_rlhf.dcgan.medmnist import MedMNISTDataModule
from lit_rlhf.dcgan.module import DCGAN
from lit_rlhf.errors import UserInputError

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
        "grid_epoch_0001.png",
        "grid_epoch_0002.png",
        "grid_final.png",
        "early_training.png",
    }
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


@pytest.mark.parametrize("flag", [None, "chestmnist", "pneumoniamnist", "breastmnist"])
def test_configs_follow_the_task_and_stack_per_flag(flag):
    """The base config (DermaMNIST) alone, or with a flag's override stacked on it: the task's optimizers
    and epochs stay, the flag, run folder and FD classifier (the classifier override's output) change."""
    overrides = ["--config", str(REPO / "configs" / "dcgan" / "datasets" / f"{flag}.yaml")] if flag else []
    cli = LitRLHFCLI(args=["--config", str(REPO / "configs" / "dcgan" / "dcgan.yaml"), *overrides], run=False)
    assert cli.trainer.max_epochs >= 1000
    model = cli.model
    for factory in (model.optimizer_g, model.optimizer_d):
        optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
        assert isinstance(optimizer, torch.optim.Adam)
        assert optimizer.defaults["betas"] == (0.5, 0.999) and optimizer.defaults["lr"] == 2e-4
    assert cli.datamodule.hparams.flag == (flag or "dermamnist")
    if flag:
        classifier = LitRLHFCLI(
            args=[
                "--config",
                str(REPO / "configs" / "dcgan" / "classifier.yaml"),
                "--config",
                str(REPO / "configs" / "dcgan" / "classifier" / f"{flag}.yaml"),
            ],
            run=False,
        )
        assert classifier.datamodule.hparams.flag == flag
        assert Path(cli.trainer.default_root_dir).name == f"dcgan_{flag}"
        assert model.hparams.fd_classifier == f"{classifier.trainer.default_root_dir}/checkpoints/best.ckpt"


def test_domain_fd_curve_every_n_epochs_on_real_images(tmp_path, data_root):
    """PneumoniaMNIST slices: a classifier of the flag, then a DCGAN whose domain FD is measured at every
    grid epoch, logged, plotted, kept in (and reloaded from) the checkpoint."""
    data = write_real_slice(data_root, tmp_path / "data", "pneumoniamnist", n_train=48).parent
    classifier_trainer = Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
    )
    classifier_trainer.fit(
        MedMNISTClassifier(width=8, feature_dim=16),
        MedMNISTDataModule(flag="pneumoniamnist", root=str(data), batch_size=16),
    )
    classifier_trainer.save_checkpoint(tmp_path / "classifier.ckpt")

    model, trainer = fit_tiny_dcgan(
        tmp_path,
        "pneumoniamnist",
        epochs=2,
        data=data,
        fd_classifier=str(tmp_path / "classifier.ckpt"),
        fd_num_samples=16,
    )
    curve = model.fd_curve
    assert curve["n"] == 16 and curve["floor"] > 0
    assert [p["epoch"] for p in curve["points"]] == [1, 2] and [p["step"] for p in curve["points"]] == [6, 12]
    assert all(p["domain_fd"] > 0 for p in curve["points"])
    with open(next((tmp_path / "run" / "csv").glob("version_*/metrics.csv"))) as file:
        logged = [float(row["train/domain_fd"]) for row in csv.DictReader(file) if row.get("train/domain_fd")]
    assert logged == pytest.approx([p["domain_fd"] for p in curve["points"]])
    assert (tmp_path / "run" / "samples" / "domain_fd_curve.png").exists()
    assert not any("classifier" in key for key in model.state_dict())  # the classifier is not part of the DCGAN

    trainer.save_checkpoint(tmp_path / "model.ckpt")
    assert DCGAN.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True).fd_curve == curve

    with pytest.raises(UserInputError, match=r"was trained on pneumoniamnist, the DCGAN on breastmnist"):
        write_real_slice(data_root, tmp_path / "breast", "breastmnist", n_train=48)
        fit_tiny_dcgan(
            tmp_path / "b",
            "breastmnist",
            epochs=1,
            data=tmp_path / "breast",
            fd_classifier=str(tmp_path / "classifier.ckpt"),
        )
