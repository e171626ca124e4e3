"""DCGAN on MedMNIST: manual optimization with two optimizers, 8×4 sample grids, early-training plot,
and (given a MedMNIST classifier) the domain Fréchet distance against epochs."""

import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure
from torchvision.utils import make_grid, save_image

from lit_rlhf.dcgan.classifier import load_classifier
from lit_rlhf.dcgan.medmnist import to_signed_unit
from lit_rlhf.dcgan.metrics import domain_fd_kid
from lit_rlhf.dcgan.model import Discriminator, Generator
from lit_rlhf.errors import UserInputError, require_finite
from lit_rlhf.tables import run_dir

GRID_COLUMNS, GRID_ROWS = 8, 4
STATS = ("loss_d", "loss_g", "d_real", "d_fake")


def dcgan_adam(params):
    """The DCGAN paper's optimizer: Adam, lr 2e-4, β = (0.5, 0.999)."""
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))


def plot_domain_fd_curve(curve: dict, path: Path) -> Path:
    """Domain FD of the samples against epochs, with the real-vs-real floor as a dashed line."""
    points = curve["points"]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(
        [p["epoch"] for p in points], [p["domain_fd"] for p in points], marker="o", label="samples vs training images"
    )
    ax.axhline(curve["floor"], color="grey", linestyle="--", label="floor: training vs training images")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("domain Fréchet distance (classifier features)")
    ax.set_title(f"DCGAN: domain FD against epochs ({curve['n']} images a side)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def image_grid(images: torch.Tensor, columns: int = GRID_COLUMNS) -> torch.Tensor:
    """[-1, 1] images -> one [0, 1] grid, `columns` wide, each image upscaled to >= 112 px (nearest)."""
    scale = max(1, 112 // images.size(-1))
    images = F.interpolate(images.float().cpu(), scale_factor=scale, mode="nearest")
    return make_grid(images, nrow=columns, padding=4, normalize=True, value_range=(-1, 1), pad_value=1.0)


class DCGAN(LightningModule):
    """Non-saturating GAN loss (BCE on logits), the PyTorch DCGAN recipe: each step updates the
    discriminator on a real batch and a detached fake batch, then the generator on the same fake
    batch. `toggle_optimizer` freezes the other network's parameters in each half.

    Args:
        latent_dim / ngf / ndf: DCGAN's z size and generator / discriminator widths (paper: 100, 64, 64).
        channels / image_size: taken from the data module (`channels`, `size`) at `setup`; stored in
            the checkpoint so `load_from_checkpoint` can sample without data.
        optimizer_g / optimizer_d: optimizer factories (None: `dcgan_adam`, Adam(2e-4, (0.5, 0.999))).
        sample_every_n_epochs: save + log an 8×4 grid from the fixed noise every N epochs (and at the end).
        fd_classifier: a MedMNISTClassifier checkpoint of the same flag. At every grid epoch the domain
            FD / KID of `fd_num_samples` samples against as many training images is then logged
            (`train/domain_fd`), plotted (`samples/domain_fd_curve.png`, with the floor: FD between two
            disjoint sets of training images) and kept in the checkpoint for the GAN report: it
            shows whether training was still improving when it stopped.
        fd_num_samples: images a side for that FD (at most half the training set, so the floor's
            two sets are disjoint).
        plot_first_epochs: plot the per-step losses / D outputs of the first N epochs to
            `samples/early_training.png` and print a line per epoch for them.
        sample_seed: seed of the fixed noise batch.
    """

    def __init__(
        self,
        latent_dim: int = 100,
        ngf: int = 64,
        ndf: int = 64,
        channels: int | None = None,
        image_size: int | None = None,
        optimizer_g: OptimizerCallable | None = None,
        optimizer_d: OptimizerCallable | None = None,
        sample_every_n_epochs: int = 10,
        fd_classifier: str | None = None,
        fd_num_samples: int = 1000,
        plot_first_epochs: int = 5,
        sample_seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer_g", "optimizer_d"])
        self.automatic_optimization = False
        self.optimizer_g, self.optimizer_d = optimizer_g or dcgan_adam, optimizer_d or dcgan_adam
        noise = torch.randn(GRID_COLUMNS * GRID_ROWS, latent_dim, generator=torch.Generator().manual_seed(sample_seed))
        self.register_buffer("fixed_noise", noise)
        self.example_input_array = torch.zeros(2, latent_dim)
        self.generator: Generator | None = None
        self.discriminator: Discriminator | None = None
        self._early: list[torch.Tensor] = []
        self._early_epoch_ends: list[int] = []
        self._fd: dict = {}  # classifier and real images of the FD curve (no submodule: not in the checkpoint)
        self.fd_curve: dict | None = None
        if channels is not None and image_size is not None:
            self._build()

    def _build(self) -> None:
        hp = self.hparams
        self.generator = Generator(hp.latent_dim, hp.channels, hp.image_size, hp.ngf)
        self.discriminator = Discriminator(hp.channels, hp.image_size, hp.ndf)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_shape = (getattr(datamodule, "channels", None), getattr(datamodule, "hparams", {}).get("size"))
        if self.generator is None:
            if None in data_shape:
                raise UserInputError(
                    "DCGAN needs channels and image_size: a MedMNIST data module, the model args, or a checkpoint."
                )
            self.hparams.channels, self.hparams.image_size = data_shape
            self._build()
        elif None not in data_shape and data_shape != (self.hparams.channels, self.hparams.image_size):
            raise UserInputError(
                f"The data has (channels, size) {data_shape} but the DCGAN was built for "
                f"{(self.hparams.channels, self.hparams.image_size)}: use a matching --data.flag/--data.size "
                "or train a new model."
            )
        if self.hparams.fd_classifier and stage == "fit":
            self._setup_fd_curve(datamodule)

    def _setup_fd_curve(self, datamodule) -> None:
        train = getattr(datamodule, "train_set", None)
        if train is None:
            raise UserInputError("--model.fd_classifier needs the training images: use a MedMNIST data module.")
        classifier = load_classifier(
            self.hparams.fd_classifier,
            "--model.fd_classifier",
            datamodule.hparams.get("flag"),
            self.hparams.channels,
            " Or pass --model.fd_classifier null to train without the FD curve.",
        )
        n = min(self.hparams.fd_num_samples, len(train) // 2)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.hparams.sample_seed))
        self._fd = {
            "classifier": classifier,
            "reference": train.images[order[:n]].cpu(),
            "floor": train.images[order[n : 2 * n]].cpu(),
        }

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def configure_optimizers(self):
        return [self.optimizer_g(self.generator.parameters()), self.optimizer_d(self.discriminator.parameters())]

    def training_step(self, batch, batch_idx: int) -> None:
        real = batch[0]
        opt_g, opt_d = self.optimizers()
        fake = self.generator(torch.randn(real.size(0), self.hparams.latent_dim, device=real.device))

        with self.toggled_optimizer(opt_d):
            logits_real = self.discriminator(real)
            logits_fake = self.discriminator(fake.detach())
            loss_d = F.binary_cross_entropy_with_logits(
                logits_real, torch.ones_like(logits_real)
            ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            opt_d.step()

        with self.toggled_optimizer(opt_g):
            logits_gen = self.discriminator(fake)
            loss_g = F.binary_cross_entropy_with_logits(logits_gen, torch.ones_like(logits_gen))
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(loss_g)
            opt_g.step()

        stats = torch.stack([loss_d, loss_g, logits_real.sigmoid().mean(), logits_fake.sigmoid().mean()]).detach()
        # after both updates: one host sync a step instead of one per loss
        require_finite(
            f"({', '.join(STATS)})",
            stats,
            self.global_step,
            "Lower the learning rates (optimizer_g / optimizer_d) or use fp32 (trainer.precision: 32-true).",
        )
        self.log_dict({f"train/{name}": value for name, value in zip(STATS, stats)}, prog_bar=True)
        self._epoch_sum += stats
        self._epoch_steps += 1
        self._epoch_images += real.size(0)
        if self.current_epoch < self.hparams.plot_first_epochs:
            self._early.append(stats)

    def on_train_epoch_start(self) -> None:
        self._epoch_sum = torch.zeros(len(STATS), device=self.device)
        self._epoch_steps = 0
        self._epoch_images = 0
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        seconds = time.perf_counter() - self._epoch_start
        images_per_sec = self._epoch_images / seconds
        self.log_dict({"train/epoch_seconds": seconds, "train/images_per_sec": images_per_sec})
        done = self.current_epoch + 1
        hp = self.hparams
        if done <= hp.plot_first_epochs or done % hp.sample_every_n_epochs == 0:
            means = (self._epoch_sum / max(self._epoch_steps, 1)).tolist()
            print(
                f"[dcgan] epoch {done}: "
                + " ".join(f"{k}={v:.3f}" for k, v in zip(STATS, means))
                + f" | {self._epoch_steps} steps, {seconds:.1f} s, {images_per_sec:.0f} img/s"
            )
        if done <= hp.plot_first_epochs:
            self._early_epoch_ends.append(len(self._early))
            if done == hp.plot_first_epochs:
                self.plot_early_training()
        if done % hp.sample_every_n_epochs == 0:
            self.save_grid(f"grid_epoch_{done:04d}")
            if self._fd:
                self.measure_domain_fd()

    @torch.no_grad()
    def measure_domain_fd(self) -> None:
        """Domain FD / KID of seeded samples against the fixed training images; appended to `fd_curve`."""
        classifier = self._fd["classifier"].to(self.device)
        reference = to_signed_unit(self._fd["reference"].to(self.device))
        if self.fd_curve is None:
            floor = domain_fd_kid(reference, to_signed_unit(self._fd["floor"].to(self.device)), classifier)["fd"]
            self.fd_curve = {"n": len(reference), "floor": floor, "points": []}
        result = domain_fd_kid(reference, self.generate(len(reference), seed=self.hparams.sample_seed), classifier)
        point = {
            "epoch": self.current_epoch + 1,
            "step": self.global_step,
            "domain_fd": result["fd"],
            "domain_kid": result["kid"],
        }
        self.fd_curve["points"].append(point)
        self.log_dict({"train/domain_fd": result["fd"], "train/domain_kid": result["kid"]})
        print(
            f"[dcgan] epoch {point['epoch']}: domain FD {result['fd']:.2f} (floor {self.fd_curve['floor']:.2f}), "
            f"KID {result['kid']:.4f}"
        )
        self._plot_fd_curve()

    @rank_zero_only
    def _plot_fd_curve(self) -> None:
        path = plot_domain_fd_curve(self.fd_curve, self._samples_dir() / "domain_fd_curve.png")
        self._log_image("train/domain_fd_curve", path, f"epoch {self.current_epoch + 1}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.fd_curve is not None:
            checkpoint["domain_fd_curve"] = self.fd_curve

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.fd_curve = checkpoint.get("domain_fd_curve")

    def on_train_end(self) -> None:
        if self._early and len(self._early_epoch_ends) < self.hparams.plot_first_epochs:
            self.plot_early_training()
        self.save_grid("grid_final")

    @torch.no_grad()
    def generate(self, n: int | None = None, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
        """Samples in [-1, 1]: n from a seeded noise, or (n None) the fixed-noise batch.

        BatchNorm uses batch statistics, as in training (what D judged; the PyTorch DCGAN example
        samples the same way): its running averages lag far behind early on and give flat grey
        images. A throw-away copy of the generator runs in train mode, so the real one's running
        statistics stay untouched.
        """
        generator = copy.deepcopy(self.generator).train()
        if n is None:
            return generator(self.fixed_noise)
        rng = torch.Generator(device=self.device).manual_seed(seed)
        z = torch.randn(n, self.hparams.latent_dim, device=self.device, generator=rng)
        return torch.cat([generator(part) for part in z.tensor_split(math.ceil(n / batch_size))])

    def _samples_dir(self) -> Path:
        folder = run_dir(self.trainer) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @rank_zero_only
    def save_grid(self, name: str) -> Path:
        """The 8×4 grid of the fixed-noise samples as `<run>/samples/<name>.png`, also logged to W&B."""
        path = self._samples_dir() / f"{name}.png"
        save_image(image_grid(self.generate()), path)
        self._log_image("samples/grid", path, f"{name} (step {self.global_step})")
        return path

    @rank_zero_only
    def plot_early_training(self) -> Path:
        """Per-step losses and D outputs of the first epochs (the task's "first epochs" screenshot)."""
        history = torch.stack(self._early).cpu().numpy()
        fig = Figure(figsize=(12, 4))
        ax_loss, ax_d = fig.subplots(1, 2)
        for column, name in enumerate(STATS):
            (ax_loss if name.startswith("loss") else ax_d).plot(history[:, column], label=name, linewidth=1)
        for ax, title in ((ax_loss, "losses"), (ax_d, "D(x) and D(G(z))")):
            for end in self._early_epoch_ends[:-1]:
                ax.axvline(end, color="grey", linestyle=":", linewidth=0.8)
            ax.set_xlabel("step (dotted: epoch ends)")
            ax.set_title(f"DCGAN, first {len(history)} steps: {title}")
            ax.legend()
        fig.tight_layout()
        path = self._samples_dir() / "early_training.png"
        fig.savefig(path, dpi=100)
        self._log_image("train/early_training", path, path.stem)
        return path

    def _log_image(self, key: str, path: Path, caption: str) -> None:
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[str(path)], caption=[caption], step=self.global_step)
