import pytest
import torch
from lightning.pytorch import Trainer
from medmnist_helpers import write_tiny_medmnist

from lit_rlhf.dcgan.classifier import MedMNISTClassifier, load_classifier
from lit_rlhf.dcgan.medmnist import MedMNISTDataModule
from lit_rlhf.errors import UserInputError


def test_classifier_learns_and_exposes_features(tmp_path):
    write_tiny_medmnist(tmp_path, "dermamnist", n_train=128, n_val=64)
    dm = MedMNISTDataModule(flag="dermamnist", root=str(tmp_path), batch_size=32)
    model = MedMNISTClassifier(width=8, feature_dim=16, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    trainer = Trainer(
        max_epochs=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, dm)
    assert trainer.callback_metrics["val/acc"] > 0.5  # 7 classes: chance is ~0.14
    images = dm.val_set.images[:5].float() / 127.5 - 1
    assert model.features(images).shape == (5, 16)
    classes, confidence = model.classify(images)
    assert classes.shape == confidence.shape == (5,) and ((confidence > 1 / 7) & (confidence <= 1)).all()


def test_multi_label_bins_have_no_finding(tmp_path):
    model = MedMNISTClassifier(channels=1, num_classes=14, multi_label=True, width=8, feature_dim=16)
    assert model.histogram_bins[0] == "none" and len(model.histogram_bins) == 15
    classes, confidence = model.classify(torch.zeros(3, 1, 28, 28))
    assert ((classes >= 0) & (classes <= 14)).all() and ((confidence >= 0.5) & (confidence <= 1)).all()


def test_load_classifier_refuses_a_missing_file_other_channels_and_another_flag(tmp_path):
    model = MedMNISTClassifier(channels=1, num_classes=2, multi_label=False, width=8, feature_dim=16)
    path = tmp_path / "breast.ckpt"
    torch.save(
        {
            "hyper_parameters": dict(model.hparams),
            "state_dict": model.state_dict(),
            "datamodule_hyper_parameters": {"flag": "breastmnist"},
            "pytorch-lightning_version": "2.5.0",
        },
        path,
    )
    loaded = load_classifier(path, "--classifier", "breastmnist", channels=1)
    assert not loaded.training and torch.equal(loaded.head.weight, model.head.weight)
    with pytest.raises(
        UserInputError,
        match=r"--model\.fd_classifier '.*nothing\.ckpt' does not exist: train the "
        r"classifier of breastmnist first .* --data\.flag breastmnist.* null",
    ):
        load_classifier(tmp_path / "nothing.ckpt", "--model.fd_classifier", "breastmnist", 1, " Or pass null.")
    with pytest.raises(UserInputError, match="takes 1-channel images, the DCGAN makes 3-channel ones"):
        load_classifier(path, "--classifier", "dermamnist", channels=3)
    with pytest.raises(
        UserInputError,
        match=r"was trained on breastmnist, the DCGAN on pneumoniamnist: its features "
        r"would measure the wrong domain",
    ):
        load_classifier(path, "--classifier", "pneumoniamnist", channels=1)
