import json
import urllib.error

import numpy as np
import pytest
import torch
import torch_fidelity
from lightning.pytorch import Trainer
from medmnist_helpers import fit_tiny_dcgan, tiny_split

from lit_rlhf.data.medmnist import MedMNISTDataModule, to_signed_unit
from lit_rlhf.eval import gan_report
from lit_rlhf.eval.gan_metrics import collapse_verdict, evaluate_samples, inception_fid_kid
from lit_rlhf.modules.medmnist_classifier import MedMNISTClassifier


def images_and_classes(n: int, seed: int):
    images, labels = tiny_split("dermamnist", n, np.random.default_rng(seed))
    return to_signed_unit(torch.from_numpy(images).permute(0, 3, 1, 2)), torch.from_numpy(labels[:, 0]).long()


@pytest.fixture(scope="module")
def classifier():
    """Trained on the tiny class-pattern images until it tells the 7 classes apart."""
    torch.manual_seed(0)
    images, classes = images_and_classes(512, seed=1)
    model = MedMNISTClassifier(channels=3, num_classes=7, multi_label=False, width=8, feature_dim=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(80):
        batch = torch.randint(len(images), (64,))
        loss = torch.nn.functional.cross_entropy(model(images[batch]), classes[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_measures_order_real_partial_and_collapsed_sets(classifier, monkeypatch):
    monkeypatch.setattr(torch_fidelity, "calculate_metrics", lambda **kw: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    train, _ = images_and_classes(256, seed=2)
    holdout, holdout_classes = images_and_classes(128, seed=3)
    real, real_classes = images_and_classes(180, seed=4)
    diverse = real[:128]
    partial = real[real_classes >= 2][:128]  # two of the seven classes dropped
    collapsed = real[:1].repeat(128, 1, 1, 1) + 0.01 * torch.randn(128, 3, 28, 28)
    results = {name: evaluate_samples(fake, train, holdout, classifier, holdout_labels=holdout_classes, n_pairs=300)
               for name, fake in (("diverse", diverse), ("partial", partial), ("collapsed", collapsed))}
    d, p, c = results["diverse"], results["partial"], results["collapsed"]
    assert d["classifier_accuracy_holdout"] > 0.9
    assert d["domain_fd_fake"] < p["domain_fd_fake"] < c["domain_fd_fake"]
    assert d["domain_kid_fake"] < c["domain_kid_fake"]
    assert d["ssim_fake"] < c["ssim_fake"] and c["duplicate_share_fake"] > 0.9
    assert d["class_tv"] < p["class_tv"] < c["class_tv"]
    assert c["classes_covered_fake"] == 1 and d["classes_covered_fake"] == 7
    assert (d["verdict"], p["verdict"], c["verdict"]) == ("diverse", "partial collapse", "collapse")
    assert not d["memorisation"] and "skipped" in d["inception_skipped"]


def test_copies_of_training_images_are_flagged_as_memorised(classifier):
    train, _ = images_and_classes(256, seed=2)
    holdout, _ = images_and_classes(128, seed=3)
    m = evaluate_samples(train[:128], train, holdout, classifier, n_pairs=200, inception=False)
    assert m["memorisation"] and m["nn_distance_min_fake"] == 0
    assert m["verdict"] == "diverse"  # copies are diverse: memorisation is a separate finding


def test_verdict_thresholds():
    base = {"duplicate_share_fake": 0.0, "duplicate_share_real": 0.0, "ssim_fake": 0.2, "ssim_real": 0.2,
            "class_tv": 0.05, "classes_covered_fake": 7, "classes_covered_real": 7}
    assert collapse_verdict(base)[0] == "diverse"
    assert collapse_verdict({**base, "ssim_fake": 0.35})[0] == "partial collapse"
    assert collapse_verdict({**base, "classes_covered_fake": 5})[0] == "partial collapse"
    assert collapse_verdict({**base, "duplicate_share_fake": 0.7})[0] == "collapse"
    unsure = {**base, "class_tv": 0.4, "classifier_confidence_fake": 0.5, "classifier_confidence_real": 0.9}
    level, reasons = collapse_verdict(unsure)
    assert level == "partial collapse" and "image quality" in reasons[-1]


def test_inception_is_skipped_with_a_reason_offline(monkeypatch):
    def offline(**kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", offline)
    images = torch.rand(4, 1, 28, 28) * 2 - 1
    reason = inception_fid_kid(images, images)
    assert "skipped" in reason and "--inception-weights" in reason


def test_report_command_writes_the_analysis_next_to_the_grids(tmp_path, capsys):
    _, trainer = fit_tiny_dcgan(tmp_path, epochs=1)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    classifier_trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    classifier_trainer.fit(MedMNISTClassifier(width=8, feature_dim=16),
                           MedMNISTDataModule(root=str(tmp_path / "data"), batch_size=16))
    classifier_trainer.save_checkpoint(tmp_path / "classifier.ckpt")

    gan_report.main(["--ckpt", str(ckpt), "--classifier", str(tmp_path / "classifier.ckpt"),
                     "--num-samples", "16", "--no-inception"])
    samples = tmp_path / "run" / "samples"
    report = (samples / "gan_report.md").read_text()
    metrics = json.loads((samples / "gan_metrics.json").read_text())
    assert f"## Verdict: {metrics['verdict']}" in report and metrics["verdict"] in ("diverse", "partial collapse", "collapse")
    assert metrics["n_fake"] == metrics["n_holdout"] == 16
    assert {"grid_final.png", "report_samples.png", "nearest_neighbours.png"} <= {p.name for p in samples.iterdir()}
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))  # logged to W&B (offline)

    with pytest.raises(SystemExit):
        gan_report.main(["--ckpt", str(ckpt), "--classifier", str(tmp_path / "classifier.ckpt"), "--holdout-split", "train"])
    assert "was trained on" in capsys.readouterr().err
