"""`python -m lit_rlhf.dcgan.report --ckpt <dcgan run>/checkpoints/last.ckpt --classifier <cls ckpt>`

Samples the trained DCGAN, measures quality / diversity / memorisation against held-out real
images (`lit_rlhf.dcgan.metrics`), and writes next to the training grids (`<run>/samples/`):
`gan_report.md` (the analysis: diverse / partial collapse / collapse), `gan_metrics.json`,
`report_samples.png` (8×4) and `nearest_neighbours.png`; all logged to W&B (offline unless
WANDB_MODE says otherwise).
"""

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.loggers import WandbLogger
from medmnist import INFO
from torchvision.utils import save_image

from lit_rlhf.dcgan.classifier import load_classifier
from lit_rlhf.dcgan.medmnist import MedMNISTDataModule, to_signed_unit
from lit_rlhf.dcgan.metrics import (
    DUPLICATE_SSIM,
    MEMORISATION_RATIO,
    MIN_CLASS_SHARE,
    THRESHOLDS,
    evaluate_samples,
    fd_trend,
    nearest_neighbour,
)
from lit_rlhf.dcgan.module import DCGAN, image_grid, plot_domain_fd_curve
from lit_rlhf.errors import UserInputError, as_paragraph, load_checkpoint, require_existing
from lit_rlhf.tables import markdown_table
from lit_rlhf.tracking import wandb_mode


def run_root(ckpt: Path) -> Path:
    """`<run>/checkpoints/x.ckpt` -> `<run>`."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _fmt(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def analysis_markdown(m: dict, context: dict) -> str:
    """The written analysis: verdict and its reasons, the measurements table, the class histogram."""
    flag = context["flag"]
    label_names = INFO[flag]["label"]
    verdict = m["verdict"]
    lines = [
        f"# DCGAN samples on {flag}: {verdict}",
        "",
        f"Generator `{context['ckpt']}` (epoch {context['epoch']}, step {context['step']}); classifier "
        f"`{context['classifier']}`. {m['n_fake']} generated samples against {m['n_holdout']} held-out real "
        f"images (split `{context['holdout_split']}`); nearest neighbours among the {m['n_train']} training images.",
        "",
        "![generated samples](report_samples.png)",
        "",
        f"## Verdict: {verdict}",
        "",
        *[f"- {reason}" for reason in m["verdict_reasons"]],
        f"- Distance to the real images: domain FD {m['domain_fd_fake']:.2f} against a real-vs-real floor of "
        f"{m['domain_fd_real']:.2f} ({m['domain_fd_fake'] / max(m['domain_fd_real'], 1e-12):.1f}× the floor); domain "
        f"KID {m['domain_kid_fake']:.4f} against {m['domain_kid_real']:.4f}.",
    ]
    if m["memorisation"]:
        lines.append(
            f"- **Possible memorisation**: the median distance of a sample to its nearest training image "
            f"({m['nn_distance_median_fake']:.3f}) is under {MEMORISATION_RATIO}× that of held-out real images "
            f"({m['nn_distance_median_real']:.3f}); see nearest_neighbours.png."
        )
    else:
        lines.append(
            f"- No sign of memorisation: samples are {m['nn_distance_median_fake']:.3f} (median RMS) from their "
            f"nearest training image, held-out real images {m['nn_distance_median_real']:.3f}."
        )
    if "classifier_accuracy_holdout" in m:
        lines.append(
            f"- The classifier behind the class histogram and the domain distances scores "
            f"{m['classifier_accuracy_holdout']:.1%} on the held-out real images."
        )

    inception = (
        [
            [
                "Inception FID (torch-fidelity)",
                _fmt(m["inception_fid_fake"], 2),
                _fmt(m["inception_fid_real"], 2),
                "as the domain FD",
            ],
            ["Inception KID", _fmt(m["inception_kid_fake"], 4), _fmt(m["inception_kid_real"], 4), ""],
        ]
        if "inception_fid_fake" in m
        else []
    )
    rows = [
        [
            "domain Fréchet distance (classifier features) to training images",
            _fmt(m["domain_fd_fake"], 2),
            _fmt(m["domain_fd_real"], 2),
            "lower = closer; the real value is the floor at this sample size",
        ],
        [
            "domain KID",
            f"{m['domain_kid_fake']:.4f} ± {m['domain_kid_std_fake']:.4f}",
            f"{m['domain_kid_real']:.4f} ± {m['domain_kid_std_real']:.4f}",
            "~0 = same distribution",
        ],
        *inception,
        [
            "mean SSIM of random pairs",
            _fmt(m["ssim_fake"]),
            _fmt(m["ssim_real"]),
            "higher = samples more alike (less diverse)",
        ],
        [
            f"near-duplicate pairs (SSIM > {DUPLICATE_SSIM})",
            f"{m['duplicate_share_fake']:.1%}",
            f"{m['duplicate_share_real']:.1%}",
            "mode collapse repeats the same image",
        ],
        [
            f"classes covered (>= {MIN_CLASS_SHARE:.0%} of images)",
            m["classes_covered_fake"],
            m["classes_covered_real"],
            "dropped classes = dropped modes",
        ],
        ["class-histogram TV distance to held-out real", _fmt(m["class_tv"]), "0", "0 = same class mix, 1 = disjoint"],
        [
            "classifier confidence (mean)",
            _fmt(m["classifier_confidence_fake"]),
            _fmt(m["classifier_confidence_real"]),
            "much lower on samples = unrecognisable images",
        ],
        [
            "nearest-training-image RMS distance: median (min)",
            f"{m['nn_distance_median_fake']:.3f} ({m['nn_distance_min_fake']:.3f})",
            f"{m['nn_distance_median_real']:.3f} ({m['nn_distance_min_real']:.3f})",
            "much lower than real = copies",
        ],
    ]
    lines += ["", "## Measurements", "", markdown_table(["measure", "generated", "held-out real", "reading"], rows)]
    if "inception_skipped" in m:
        lines += ["", f"*{m['inception_skipped']}*"]

    hist_rows = []
    for i, name in enumerate(m["class_bins"]):
        title = "no finding" if name == "none" else f"{name}: {label_names[name]}"
        hist_rows.append([title, f"{m['class_histogram_fake'][i]:.1%}", f"{m['class_histogram_real'][i]:.1%}"])
    lines += [
        "",
        "## Class histogram (classifier predictions)",
        "",
        markdown_table(["class", "generated", "held-out real"], hist_rows),
    ]

    curve = context.get("domain_fd_curve")
    if curve:
        lines += [
            "",
            "## Domain FD during training",
            "",
            f"Every {context['sample_every_n_epochs']} epochs, {curve['n']} samples (fixed seed) against "
            f"{curve['n']} training images, in the same classifier features (`--model.fd_classifier` "
            f"`{context['fd_classifier']}`); floor: {curve['floor']:.2f} (two disjoint sets of training images). "
            f"Reading: {fd_trend(curve)}.",
            "",
            markdown_table(
                ["epoch", "step", "domain FD", "domain KID"],
                [[p["epoch"], p["step"], f"{p['domain_fd']:.2f}", f"{p['domain_kid']:.4f}"] for p in curve["points"]],
            ),
            "",
            "![domain FD against epochs](domain_fd_curve.png)",
        ]

    limits = "; ".join(
        f"**{level}** when the near-duplicate share exceeds the real one by >= {v['duplicate_share']:.0%}, the mean "
        f"pairwise SSIM by >= {v['ssim_gap']}, or the class-histogram TV distance is >= {v['class_tv']}"
        for level, v in THRESHOLDS.items()
    )
    lines += [
        "",
        "## How the verdict is made",
        "",
        f"{limits}; covering fewer classes than the real images also counts as a partial collapse; otherwise "
        "**diverse**. Memorisation is flagged when samples sit under "
        f"{MEMORISATION_RATIO}× the held-out images' median distance to the training set.",
        "",
        "Caveats: the class histogram and the domain distances see the images through the project's own "
        "classifier (its errors shift both histograms alike, which is why generated and real images are both "
        "classified); SSIM and nearest-neighbour distances compare pixels at 28×28. A 'diverse' verdict rules out "
        "collapse, not poor image quality: read the Fréchet distances and look at the grid.",
        "",
        "![nearest training neighbours: generated (top) and their nearest training images (bottom)]"
        "(nearest_neighbours.png)",
        "",
    ]
    return "\n".join(lines)


def read_dcgan_checkpoint(ckpt: Path) -> dict:
    """The DCGAN checkpoint, after it is checked to be one (weights-only load; a checkpoint of another
    stage would otherwise fail deep inside `load_from_checkpoint`)."""
    checkpoint = load_checkpoint(ckpt, "DCGAN checkpoint (--ckpt)")
    if not {"latent_dim", "channels", "image_size"} <= set(checkpoint.get("hyper_parameters") or {}):
        raise UserInputError(
            f"--ckpt '{ckpt}' is not a DCGAN checkpoint (no latent_dim/channels/image_size in its hyper-parameters). "
            "Pass a checkpoint from a DCGAN run's checkpoints/ folder (configs/dcgan/dcgan.yaml)."
        )
    return checkpoint


def build_report(args) -> tuple[str, dict, dict, Path]:
    ckpt, classifier_ckpt = Path(args.ckpt).expanduser(), Path(args.classifier).expanduser()
    if args.inception_weights:
        require_existing(args.inception_weights, "InceptionV3 weights (--inception-weights)")
    device = torch.device(args.device)
    checkpoint = read_dcgan_checkpoint(ckpt)
    accepted = inspect.signature(MedMNISTDataModule).parameters
    data_hparams = {k: v for k, v in (checkpoint.get("datamodule_hyper_parameters") or {}).items() if k in accepted}
    if args.root:
        data_hparams["root"] = args.root
    if "flag" not in data_hparams:
        raise UserInputError(
            f"'{ckpt}' holds no MedMNIST data module settings (it was saved without its data module): pass the "
            "checkpoint of a `python -m lit_rlhf fit` DCGAN run."
        )
    datamodule = MedMNISTDataModule(**data_hparams)
    if args.holdout_split in datamodule.hparams.train_splits:
        raise UserInputError(
            f"--holdout-split {args.holdout_split} was trained on; pick a split outside "
            f"{list(datamodule.hparams.train_splits)}."
        )

    model = DCGAN.load_from_checkpoint(ckpt, map_location=device, weights_only=True).eval()
    classifier = load_classifier(classifier_ckpt, "--classifier", datamodule.hparams.flag, model.hparams.channels)
    classifier = classifier.to(device)

    train = to_signed_unit(torch.cat([datamodule.split(name).images for name in datamodule.hparams.train_splits]))
    train = train.to(device)
    held = datamodule.split(args.holdout_split)
    order = torch.randperm(len(held), generator=torch.Generator().manual_seed(args.seed))[: args.num_samples]
    holdout = to_signed_unit(held.images[order]).to(device)
    fake = model.generate(len(holdout), seed=args.seed)
    metrics = evaluate_samples(
        fake,
        train,
        holdout,
        classifier,
        holdout_labels=held.labels[order],
        inception=not args.no_inception,
        inception_weights=args.inception_weights,
        seed=args.seed,
    )

    out = Path(args.out) if args.out else run_root(ckpt) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(fake[:32]), out / "report_samples.png")
    _, nn_index = nearest_neighbour(fake[:8], train)
    save_image(image_grid(torch.cat([fake[:8], train[nn_index]])), out / "nearest_neighbours.png")
    context = {
        "flag": datamodule.hparams.flag,
        "ckpt": str(ckpt),
        "classifier": str(classifier_ckpt),
        "epoch": checkpoint.get("epoch"),
        "step": checkpoint.get("global_step"),
        "holdout_split": args.holdout_split,
        "sample_every_n_epochs": model.hparams.sample_every_n_epochs,
        "fd_classifier": model.hparams.fd_classifier,
        "domain_fd_curve": model.fd_curve,
    }
    if model.fd_curve:
        plot_domain_fd_curve(model.fd_curve, out / "domain_fd_curve.png")
    markdown = analysis_markdown(metrics, context)
    (out / "gan_report.md").write_text(markdown, encoding="utf-8")
    (out / "gan_metrics.json").write_text(json.dumps({**context, **metrics}, indent=2), encoding="utf-8")
    return markdown, metrics, context, out


def log_to_wandb(markdown: str, metrics: dict, out: Path, root: Path, flag: str) -> None:
    mode = wandb_mode()
    logger = WandbLogger(
        project="lit_rlhf",
        offline=mode != "online",
        mode=mode,
        save_dir=str(root),
        group="gan_report",
        tags=["dcgan", "medmnist", flag],
        name=f"gan_report_{flag}",
    )
    numbers = {f"gan/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    logger.log_metrics(numbers)
    logger.log_text(key="gan/analysis", columns=["markdown"], data=[[markdown]])
    for name in ("report_samples", "nearest_neighbours"):
        logger.log_image(key=f"gan/{name}", images=[str(out / f"{name}.png")])
    logger.experiment.finish()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_rlhf.dcgan.report", description=__doc__.split("\n\n")[1])
    parser.add_argument("--ckpt", required=True, help="DCGAN checkpoint (its data module settings name the data)")
    parser.add_argument("--classifier", required=True, help="MedMNISTClassifier checkpoint trained on the same flag")
    parser.add_argument("--root", help="folder holding the .npz, if not the one used in training")
    parser.add_argument("--holdout-split", default="test", help="real images the GAN never saw (default test)")
    parser.add_argument("--num-samples", type=int, default=1000, help="generated samples = held-out images used")
    parser.add_argument("--inception-weights", help="local torch-fidelity InceptionV3 weights (.pth) for FID/KID")
    parser.add_argument("--no-inception", action="store_true", help="skip the Inception FID/KID")
    parser.add_argument("--out", help="output folder (default: <run>/samples, next to the training grids)")
    parser.add_argument("--no-wandb", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        markdown, metrics, context, out = build_report(args)
    except UserInputError as error:
        print(as_paragraph(error), file=sys.stderr)
        sys.exit(2)
    print(markdown)
    print(f"[gan_report] wrote {out / 'gan_report.md'} and gan_metrics.json")
    if not args.no_wandb:
        log_to_wandb(markdown, metrics, out, run_root(Path(args.ckpt)), context["flag"])


if __name__ == "__main__":
    main()
