import json
import urllib.error

import numpy as np
import pytest
import torch
import torch_fidelity
from lightning.pytorch import Trainer
from medmnist_helpers import fit_tiny_dcgan, real_arrays, tiny_split, write_tiny_medmnist

from lit_rlhf.dcgan import report as gan_report
from lit_rlhf.dcgan.classifier import MedMNISTClassifier
from lit_rlhf.dcgan.medmnist import MedMNISTDataModule, to_signed_unit
from lit_rlhf.dcgan.metrics import collapse_verdict, evaluate_samples, fd_trend, inception_fid_kid


def images_and_classes(n: int, seed: int):
    images, labels = tiny_split("dermamnist", n, np.random.default_rng(seed))
    return to_signed_unit(torch.from_numpy(images).permute(0, 3, 1, 2)), torch.from_numpy(labels[:, 0]).long()


def train_classifier(images: torch.Tensor, classes: torch.Tensor, steps: int = 80, lr: float = 3e-3):
    torch.manual_seed(0)
    model = MedMNISTClassifier(
        channels=images.size(1), num_classes=int(classes.max()) + 1, multi_label=False, width=8, feature_dim=16
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        batch = torch.randint(len(images), (64,))
        loss = torch.nn.functional.cross_entropy(model(images[batch]), classes[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def classifier():
    """Trained on the tiny class-pattern images until it tells the 7 classes apart."""
    return train_classifier(*images_and_classes(512, seed=1))


def real_images_and_classes(data_root, split: str, start: int, stop: int):
    images, labels = real_arrays(data_root, "pneumoniamnist", split, start, stop)
    return to_signed_unit(torch.from_numpy(images)[:, None]), torch.from_numpy(labels[:, 0]).long()


def test_verdict_and_its_text_follow_the_numbers_on_real_chest_x_rays(data_root, one_thread):
    """Constructed "generated" sets of real PneumoniaMNIST images: unseen real X-rays (diverse), only the
    normal ones (the pneumonia mode dropped: partial collapse), one X-ray repeated (collapse)."""
    train, train_classes = real_images_and_classes(data_root, "train", 0, 1024)
    classifier = train_classifier(train, train_classes, steps=100, lr=5e-3)
    holdout, holdout_classes = real_images_and_classes(data_root, "test", 0, 200)
    others, other_classes = real_images_and_classes(data_root, "test", 200, 624)
    cases = {
        "diverse": others[:200],
        "partial collapse": others[other_classes == 0][:200],
        "collapse": others[:1].repeat(200, 1, 1, 1) + 0.01 * torch.randn(200, 1, 28, 28),
    }
    context = {
        "flag": "pneumoniamnist",
        "ckpt": "g.ckpt",
        "classifier": "c.ckpt",
        "epoch": 1,
        "step": 2,
        "holdout_split": "test",
    }
    for expected, fake in cases.items():
        m = evaluate_samples(
            fake, train, holdout, classifier, holdout_labels=holdout_classes, n_pairs=300, inception=False
        )
        assert m["classifier_accuracy_holdout"] > 0.8
        assert m["verdict"] == expected, m["verdict_reasons"]
        report = gan_report.analysis_markdown(m, context)
        assert report.startswith(f"# DCGAN samples on pneumoniamnist: {expected}\n")
        assert (
            f"domain FD {m['domain_fd_fake']:.2f} against a real-vs-real floor of {m['domain_fd_real']:.2f}" in report
        )
        assert f"| class-histogram TV distance to held-out real | {m['class_tv']:.3f} |" in report
        if expected == "partial collapse":
            assert f"class-histogram TV distance {m['class_tv']:.3f} >= 0.25" in report
        if expected == "collapse":
            assert f"near-duplicate pairs {m['duplicate_share_fake']:.1%}" in report


def test_measures_order_real_partial_and_collapsed_sets(classifier, monkeypatch):
    monkeypatch.setattr(
        torch_fidelity, "calculate_metrics", lambda **kw: (_ for _ in ()).throw(urllib.error.URLError("offline"))
    )
    train, _ = images_and_classes(256, seed=2)
    holdout, holdout_classes = images_and_classes(128, seed=3)
    real, real_classes = images_and_classes(180, seed=4)
    diverse = real[:128]
    partial = real[real_classes >= 2][:128]  # two of the seven classes dropped
    collapsed = real[:1].repeat(128, 1, 1, 1) + 0.01 * torch.randn(128, 3, 28, 28)
    results = {
        name: evaluate_samples(fake, train, holdout, classifier, holdout_labels=holdout_classes, n_pairs=300)
        for name, fake in (("diverse", diverse), ("partial", partial), ("collapsed", collapsed))
    }
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
    base = {
        "duplicate_share_fake": 0.0,
        "duplicate_share_real": 0.0,
        "ssim_fake": 0.2,
        "ssim_real": 0.2,
        "class_tv": 0.05,
        "classes_covered_fake": 7,
        "classes_covered_real": 7,
    }
    assert collapse_verdict(base)[0] == "diverse"
    assert collapse_verdict({**base, "ssim_fake": 0.35})[0] == "partial collapse"
    assert collapse_verdict({**base, "classes_covered_fake": 5})[0] == "partial collapse"
    assert collapse_verdict({**base, "duplicate_share_fake": 0.7})[0] == "collapse"
    unsure = {**base, "class_tv": 0.4, "classifier_confidence_fake": 0.5, "classifier_confidence_real": 0.9}
    level, reasons = collapse_verdict(unsure)
    assert level == "partial collapse" and "image quality" in reasons[-1]


def test_fd_trend_says_whether_training_was_still_improving():
    def curve(*fds):
        return {"floor": 0.5, "n": 100, "points": [{"epoch": 5 * (i + 1), "domain_fd": fd} for i, fd in enumerate(fds)]}

    assert fd_trend(curve(30.0, 12.0, 8.0)).startswith(
        "still improving when training stopped: the last evaluation (epoch 15) has the lowest domain FD, 8.00, down "
        "from 12.00 at epoch 10 and 30.00 at epoch 5 (the real-vs-real floor is 0.50)"
    )
    assert fd_trend(curve(30.0, 6.0, 8.0)) == (
        "no longer improving: the lowest domain FD, 6.00, came at epoch 10; the last evaluation (epoch 15) has 8.00 "
        "(the real-vs-real floor is 0.50)"
    )
    assert "no trend yet" in fd_trend(curve(30.0))


def test_inception_is_skipped_with_a_reason_offline(monkeypatch):
    def offline(**kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", offline)
    images = torch.rand(4, 1, 28, 28) * 2 - 1
    reason = inception_fid_kid(images, images)
    assert "skipped" in reason and "--inception-weights" in reason


def test_report_command_writes_the_analysis_next_to_the_grids(tmp_path, capsys, one_thread):
    write_tiny_medmnist(tmp_path / "data", "dermamnist", n_train=48)
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
        MedMNISTClassifier(width=8, feature_dim=16), MedMNISTDataModule(root=str(tmp_path / "data"), batch_size=16)
    )
    classifier_trainer.save_checkpoint(tmp_path / "classifier.ckpt")
    _, trainer = fit_tiny_dcgan(
        tmp_path, epochs=2, data=tmp_path / "data", fd_classifier=str(tmp_path / "classifier.ckpt"), fd_num_samples=16
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    gan_report.main(
        [
            "--ckpt",
            str(ckpt),
            "--classifier",
            str(tmp_path / "classifier.ckpt"),
            "--num-samples",
            "16",
            "--no-inception",
        ]
    )
    samples = tmp_path / "run" / "samples"
    report = (samples / "gan_report.md").read_text()
    metrics = json.loads((samples / "gan_metrics.json").read_text())
    assert f"## Verdict: {metrics['verdict']}" in report and metrics["verdict"] in (
        "diverse",
        "partial collapse",
        "collapse",
    )
    assert metrics["n_fake"] == metrics["n_holdout"] == 16
    assert [p["epoch"] for p in metrics["domain_fd_curve"]["points"]] == [1, 2]
    assert "## Domain FD during training" in report and f"Reading: {fd_trend(metrics['domain_fd_curve'])}." in report
    assert {"grid_final.png", "report_samples.png", "nearest_neighbours.png", "domain_fd_curve.png"} <= {
        p.name for p in samples.iterdir()
    }
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))  # logged to W&B (offline)

    with pytest.raises(SystemExit):
        gan_report.main(
            ["--ckpt", str(ckpt), "--classifier", str(tmp_path / "classifier.ckpt"), "--holdout-split", "train"]
        )
    assert "was trained on" in capsys.readouterr().err
