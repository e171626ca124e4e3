"""Quality and mode-collapse measures for GAN samples (images in [-1, 1], shape (N, C, H, W)).

- Inception FID / KID (torch-fidelity) when its InceptionV3 weights can be had (download or a local file).
- Domain Fréchet distance / KID in the feature space of a MedMNIST classifier (torchmetrics with a
  custom `feature` module): works offline, and measures what matters for these images.
- Class histogram of the samples (by the classifier) vs held-out real images: total-variation distance.
- Within-set diversity: SSIM of random pairs, and the share of near-duplicate pairs.
- Nearest-training-neighbour distances (memorisation check), against the same for held-out real images.
"""

import math

import torch
import torch_fidelity
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lit_rlhf.dcgan.medmnist import to_uint8

# Verdict thresholds (see `collapse_verdict`); SSIM of random pairs, shares, TV distance in [0, 1].
DUPLICATE_SSIM = 0.9
THRESHOLDS = {
    "collapse": {"duplicate_share": 0.5, "ssim_gap": 0.4, "class_tv": 0.6},
    "partial collapse": {"duplicate_share": 0.1, "ssim_gap": 0.1, "class_tv": 0.25},
}
MEMORISATION_RATIO = 0.5
UNSURE_GAP = 0.15  # classifier confidence on samples this far below real: class shifts may be quality
MIN_CLASS_SHARE = 0.01


class ClassifierFeatures(nn.Module):
    """The classifier's penultimate layer as a torchmetrics `feature` extractor."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


@torch.no_grad()
def domain_fd_kid(
    real: torch.Tensor, fake: torch.Tensor, classifier: nn.Module, kid_subset_size: int = 1000, batch_size: int = 256
) -> dict:
    """Fréchet distance and KID (mean, std over subsets) of `fake` against `real` in the classifier's
    feature space. Subsets hold at most half of the smaller set, so their spread means something."""
    classifier.eval()
    features = ClassifierFeatures(classifier)
    fd = FrechetInceptionDistance(feature=features).to(real.device)
    subset_size = max(2, min(kid_subset_size, len(real) // 2, len(fake) // 2))
    kid = KernelInceptionDistance(feature=features, subset_size=subset_size).to(real.device)
    for images, is_real in ((real, True), (fake, False)):
        for part in images.split(batch_size):
            fd.update(part, real=is_real)
            kid.update(part, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {"fd": fd.compute().item(), "kid": kid_mean.item(), "kid_std": kid_std.item()}


class _Uint8RGB(Dataset):
    """[-1, 1] images as the uint8 3-channel tensors torch-fidelity's Inception expects."""

    def __init__(self, images: torch.Tensor):
        self.images = to_uint8(images.cpu())
        if self.images.size(1) == 1:
            self.images = self.images.expand(-1, 3, -1, -1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def inception_fid_kid(
    real: torch.Tensor, fake: torch.Tensor, weights_path: str | None = None, kid_subset_size: int = 1000
) -> dict | str:
    """Inception FID / KID by torch-fidelity, or a one-line reason when its weights cannot be had."""
    try:
        result = torch_fidelity.calculate_metrics(
            input1=_Uint8RGB(fake),
            input2=_Uint8RGB(real),
            fid=True,
            kid=True,
            kid_subset_size=max(2, min(kid_subset_size, len(real) // 2, len(fake) // 2)),
            feature_extractor_weights_path=weights_path,
            cuda=torch.cuda.is_available(),
            cache=False,
            save_cpu_ram=True,
            verbose=False,
        )
    except OSError as error:
        return (
            f"Inception FID/KID skipped: torch-fidelity could not load its InceptionV3 weights "
            f"({type(error).__name__}: {str(error).splitlines()[0][:160]}). Offline, download "
            "weights-inception-2015-12-05-6726825d.pth elsewhere and pass its path (--inception-weights)."
        )
    return {
        "fid": result["frechet_inception_distance"],
        "kid": result["kernel_inception_distance_mean"],
        "kid_std": result["kernel_inception_distance_std"],
    }


def class_histogram(classes: torch.Tensor, bins: int) -> torch.Tensor:
    """Share of the images in each class bin."""
    return torch.bincount(classes.flatten().cpu(), minlength=bins).double() / classes.numel()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total-variation distance of two histograms: 0 identical, 1 disjoint."""
    return 0.5 * (p - q).abs().sum().item()


def pairwise_ssim(images: torch.Tensor, n_pairs: int = 1000, seed: int = 0) -> torch.Tensor:
    """SSIM of `n_pairs` random pairs of distinct images (high = alike, 1 = identical)."""
    n = len(images)
    rng = torch.Generator().manual_seed(seed)
    first = torch.randint(n, (n_pairs,), generator=rng)
    second = (first + torch.randint(1, n, (n_pairs,), generator=rng)) % n
    return structural_similarity_index_measure(images[first], images[second], data_range=2.0, reduction="none")


@torch.no_grad()
def nearest_neighbour(queries: torch.Tensor, reference: torch.Tensor, chunk: int = 256):
    """Per query: RMS pixel distance (in [-1, 1] units) to its nearest reference image, and its index."""
    reference = reference.flatten(1).float()
    distances, indices = [], []
    for part in queries.flatten(1).float().split(chunk):
        best = torch.cdist(part, reference).min(dim=1)
        distances.append(best.values / math.sqrt(reference.size(1)))
        indices.append(best.indices)
    return torch.cat(distances), torch.cat(indices)


def diversity_stats(images: torch.Tensor, n_pairs: int, seed: int) -> dict:
    ssim = pairwise_ssim(images, n_pairs, seed)
    return {"ssim": ssim.mean().item(), "duplicate_share": (ssim > DUPLICATE_SSIM).double().mean().item()}


@torch.no_grad()
def evaluate_samples(
    fake: torch.Tensor,
    train: torch.Tensor,
    holdout: torch.Tensor,
    classifier,
    holdout_labels: torch.Tensor | None = None,
    n_pairs: int = 1000,
    kid_subset_size: int = 1000,
    inception: bool = True,
    inception_weights: str | None = None,
    seed: int = 0,
) -> dict:
    """All measures for generated `fake` images, each beside its value for held-out real images.

    `train` is the GAN's training set (reference of the distances and nearest neighbours),
    `holdout` real images it never saw, ideally as many as `fake` (Fréchet distances are biased by
    the sample size, so the real-vs-real value is the floor to compare with).
    """
    classifier.eval()
    rng = torch.Generator().manual_seed(seed)
    reference = train[torch.randperm(len(train), generator=rng)[: max(len(fake), len(holdout))]]
    metrics: dict = {"n_fake": len(fake), "n_holdout": len(holdout), "n_train": len(train)}

    for name, images in (("fake", fake), ("real", holdout)):
        for key, value in domain_fd_kid(reference, images, classifier, kid_subset_size).items():
            metrics[f"domain_{key}_{name}"] = value
        for key, value in diversity_stats(images, n_pairs, seed).items():
            metrics[f"{key}_{name}"] = value
        distances, _ = nearest_neighbour(images, train)
        metrics[f"nn_distance_median_{name}"] = distances.median().item()
        metrics[f"nn_distance_min_{name}"] = distances.min().item()

    bins = classifier.histogram_bins
    metrics["class_bins"] = bins
    histograms = {}
    for name, images in (("fake", fake), ("real", holdout)):
        classes, confidence = (torch.cat(parts) for parts in zip(*(classifier.classify(p) for p in images.split(256))))
        histograms[name] = class_histogram(classes, len(bins))
        metrics[f"class_histogram_{name}"] = [round(v, 4) for v in histograms[name].tolist()]
        metrics[f"classes_covered_{name}"] = int((histograms[name] >= MIN_CLASS_SHARE).sum())
        metrics[f"classifier_confidence_{name}"] = confidence.mean().item()
        if name == "real" and holdout_labels is not None and not classifier.hparams.multi_label:
            metrics["classifier_accuracy_holdout"] = (classes.cpu() == holdout_labels.cpu()).double().mean().item()
    metrics["class_tv"] = total_variation(histograms["fake"], histograms["real"])

    if inception:
        for name, images in (("fake", fake), ("real", holdout)):
            result = inception_fid_kid(reference, images, inception_weights, kid_subset_size)
            if isinstance(result, str):
                metrics["inception_skipped"] = result
                break
            for key, value in result.items():
                metrics[f"inception_{key}_{name}"] = value
    verdict, reasons = collapse_verdict(metrics)
    metrics["verdict"], metrics["verdict_reasons"] = verdict, reasons
    metrics["memorisation"] = (
        metrics["nn_distance_median_fake"] < MEMORISATION_RATIO * metrics["nn_distance_median_real"]
    )
    return metrics


def collapse_verdict(m: dict) -> tuple[str, list[str]]:
    """ "collapse", "partial collapse" or "diverse", with the measurements that decided it.

    A level is reached when any of: the share of near-duplicate sample pairs (SSIM > 0.9) exceeds
    the real one by `duplicate_share`; the mean pairwise SSIM exceeds the real one by `ssim_gap`;
    the class histograms are `class_tv` apart. Fewer classes covered (>= 1% of samples) than the real
    images cover also counts as a partial collapse. When a class-based reason fires while the
    classifier is much less sure of the samples than of real images, the reasons say so: the shift
    may come from unrecognisable samples (quality) rather than from dropped modes.
    """
    observed = {
        "duplicate_share": m["duplicate_share_fake"] - m["duplicate_share_real"],
        "ssim_gap": m["ssim_fake"] - m["ssim_real"],
        "class_tv": m["class_tv"],
    }
    describe = {
        "duplicate_share": lambda v: (
            f"near-duplicate pairs {m['duplicate_share_fake']:.1%} vs {m['duplicate_share_real']:.1%} real ({v:+.1%})"
        ),
        "ssim_gap": lambda v: f"mean pairwise SSIM {m['ssim_fake']:.3f} vs {m['ssim_real']:.3f} real ({v:+.3f})",
        "class_tv": lambda v: f"class-histogram TV distance {v:.3f}",
    }
    for level, limits in THRESHOLDS.items():
        fired = [key for key, limit in limits.items() if observed[key] >= limit]
        reasons = [f"{describe[key](observed[key])} >= {limits[key]}" for key in fired]
        class_based = "class_tv" in fired
        if level == "partial collapse" and m["classes_covered_fake"] < m["classes_covered_real"]:
            reasons.append(
                f"covers {m['classes_covered_fake']} of the {m['classes_covered_real']} classes the real images cover"
            )
            class_based = True
        unsure = m.get("classifier_confidence_real", 0.0) - m.get("classifier_confidence_fake", 0.0) >= UNSURE_GAP
        if class_based and unsure:
            reasons.append(
                f"but the classifier is much less sure of the samples ({m['classifier_confidence_fake']:.2f} vs "
                f"{m['classifier_confidence_real']:.2f} mean confidence): part of the class shift is samples it cannot "
                "recognise (image quality), not missing modes; check the grid"
            )
        if reasons:
            return level, reasons
    return "diverse", [
        describe["duplicate_share"](observed["duplicate_share"]),
        describe["ssim_gap"](observed["ssim_gap"]),
        f"{describe['class_tv'](observed['class_tv'])}, "
        f"{m['classes_covered_fake']} of {m['classes_covered_real']} classes covered",
    ]


def fd_trend(curve: dict) -> str:
    """One sentence on the domain FD curve of training: still falling at its last evaluation (the
    lowest so far: more epochs would likely help) or not (the lowest came earlier)."""
    points = curve["points"]
    last = points[-1]
    if len(points) == 1:
        return f"one evaluation only (epoch {last['epoch']}, domain FD {last['domain_fd']:.2f}): no trend yet"
    best = min(points, key=lambda p: p["domain_fd"])
    floor = f"the real-vs-real floor is {curve['floor']:.2f}"
    if best is last:
        return (
            f"still improving when training stopped: the last evaluation (epoch {last['epoch']}) has the lowest "
            f"domain FD, {last['domain_fd']:.2f}, down from {points[-2]['domain_fd']:.2f} at epoch "
            f"{points[-2]['epoch']} and {points[0]['domain_fd']:.2f} at epoch {points[0]['epoch']} ({floor}): "
            "more epochs would likely help"
        )
    return (
        f"no longer improving: the lowest domain FD, {best['domain_fd']:.2f}, came at epoch {best['epoch']}; the "
        f"last evaluation (epoch {last['epoch']}) has {last['domain_fd']:.2f} ({floor})"
    )
