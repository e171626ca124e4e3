"""Images/s of the Lightning DCGAN (`lit_rlhf.dcgan.module.DCGAN` + `MedMNISTDataModule`) against a
plain PyTorch DCGAN loop, same networks, batch size, optimizers and algorithm, in one process.

The plain loop is the PyTorch DCGAN example's step (D on real + detached fake, then G on the same
fake), with the data as one tensor indexed by a random permutation, and the other network frozen
in each half as `toggle_optimizer` does. Runs alternate (Lightning, plain, Lightning, ...) so a
noisy shared machine hits both alike; the median of the repeats is reported.

    python bench/bench_dcgan.py --batch-size 64 --ngf 16 --ndf 16 --steps 30 --out /tmp/bench_dcgan.json
"""

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything

from lit_rlhf.dcgan.medmnist import INFO, MedMNISTDataModule, save_medmnist_npz, to_signed_unit
from lit_rlhf.dcgan.module import DCGAN, dcgan_adam


class StepTimer(Callback):
    """Wall time of the training batches after the first `warmup` ones."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.batches = warmup, None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.batches += 1
            self.end = time.perf_counter()


def lightning_images_per_sec(args, root: str, device: str) -> float:
    seed_everything(0, verbose=False)
    model = DCGAN(ngf=args.ngf, ndf=args.ndf, sample_every_n_epochs=10**9, plot_first_epochs=0)
    timer = StepTimer(args.warmup)
    trainer = Trainer(
        max_steps=2 * (args.warmup + args.steps),  # two optimizer steps per batch
        accelerator=device,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(prefix="bench_dcgan_"),
        callbacks=[timer],
    )
    trainer.fit(
        model,
        MedMNISTDataModule(flag=args.flag, root=root, val_split=None, test_split=None, batch_size=args.batch_size),
    )
    return timer.batches * args.batch_size / (timer.end - timer.start)


def plain_images_per_sec(args, images: torch.Tensor, device: str) -> float:
    seed_everything(0, verbose=False)
    reference = DCGAN(ngf=args.ngf, ndf=args.ndf, channels=images.size(1), image_size=images.size(-1))
    generator, discriminator = reference.generator.to(device), reference.discriminator.to(device)
    opt_g, opt_d = dcgan_adam(generator.parameters()), dcgan_adam(discriminator.parameters())
    images = images.to(device)
    order = torch.randperm(len(images), device=device)

    def step(index: torch.Tensor) -> None:
        real = to_signed_unit(images[index])
        fake = generator(torch.randn(len(index), 100, device=device))
        generator.requires_grad_(False)
        logits_real, logits_fake = discriminator(real), discriminator(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(
            logits_real, torch.ones_like(logits_real)
        ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        generator.requires_grad_(True)
        discriminator.requires_grad_(False)
        logits_gen = discriminator(fake)
        loss_g = F.binary_cross_entropy_with_logits(logits_gen, torch.ones_like(logits_gen))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        discriminator.requires_grad_(True)

    batches = order[: (args.warmup + args.steps) * args.batch_size].split(args.batch_size)
    for index in batches[: args.warmup]:
        step(index)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for index in batches[args.warmup :]:
        step(index)
    if device == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flag", default="dermamnist", choices=("dermamnist", "chestmnist"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--ndf", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_dcgan.json")
    args = parser.parse_args()

    # Random pixels in MedMNIST's exact layout: the content does not change the cost.
    root = tempfile.mkdtemp(prefix="bench_medmnist_")
    n = (args.warmup + args.steps) * args.batch_size
    rng = np.random.default_rng(0)
    shape = (n, 28, 28) if INFO[args.flag]["n_channels"] == 1 else (n, 28, 28, 3)
    labels = np.zeros((n, len(INFO[args.flag]["label"]) if args.flag == "chestmnist" else 1), np.uint8)
    save_medmnist_npz(root, args.flag, {"train": (rng.integers(0, 256, shape, dtype=np.uint8), labels)})
    images = MedMNISTDataModule(flag=args.flag, root=root).split("train").images

    lightning, plain = [], []
    for _ in range(args.repeats):
        lightning.append(lightning_images_per_sec(args, root, args.device))
        plain.append(plain_images_per_sec(args, images, args.device))
        print(f"  lightning {lightning[-1]:8.1f} img/s   plain {plain[-1]:8.1f} img/s")
    result = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "flag": args.flag,
        "batch_size": args.batch_size,
        "ngf": args.ngf,
        "ndf": args.ndf,
        "steps": args.steps,
        "repeats": args.repeats,
        "lightning_images_per_sec": statistics.median(lightning),
        "plain_images_per_sec": statistics.median(plain),
        "lightning_runs": lightning,
        "plain_runs": plain,
    }
    result["ratio"] = result["lightning_images_per_sec"] / result["plain_images_per_sec"]
    print(
        f"Lightning DCGAN {result['lightning_images_per_sec']:.1f} img/s, plain PyTorch "
        f"{result['plain_images_per_sec']:.1f} img/s, ratio {result['ratio']:.3f} (goal >= 0.95)"
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
