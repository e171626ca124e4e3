"""DCGAN generator and discriminator (Radford et al., 2016) for 28×28 or 64×64 images, 1 or 3 channels."""

import torch
from torch import nn

from lit_rlhf.errors import UserInputError

IMAGE_SIZES = (28, 64)


def dcgan_init(module: nn.Module) -> None:
    """The DCGAN paper's init: conv weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _check_size(image_size: int) -> None:
    if image_size not in IMAGE_SIZES:
        raise UserInputError(f"DCGAN image_size {image_size} is not supported; use one of {IMAGE_SIZES}.")


class Generator(nn.Module):
    """z (latent_dim) -> 4×4 -> 8×8 -> 16×16 -> 32×32 by ConvTranspose2d → BatchNorm → ReLU, then the
    output layer and Tanh. At 64 px the output layer is DCGAN's own (32 -> 64 transposed conv); at
    28 px it is the one adapted layer: a 5×5 valid convolution, 32 -> 28, to `channels` channels.
    """

    def __init__(self, latent_dim: int = 100, channels: int = 3, image_size: int = 28, ngf: int = 64):
        super().__init__()
        _check_size(image_size)

        def up(c_in: int, c_out: int, stride: int, padding: int) -> list[nn.Module]:
            conv = nn.ConvTranspose2d(c_in, c_out, 4, stride, padding, bias=False)
            return [conv, nn.BatchNorm2d(c_out), nn.ReLU(True)]

        if image_size == 64:
            output = nn.ConvTranspose2d(ngf, channels, 4, 2, 1, bias=False)
        else:
            output = nn.Conv2d(ngf, channels, 5, 1, 0, bias=False)
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            *up(latent_dim, ngf * 8, 1, 0),
            *up(ngf * 8, ngf * 4, 2, 1),
            *up(ngf * 4, ngf * 2, 2, 1),
            *up(ngf * 2, ngf, 2, 1),
            output,
            nn.Tanh(),
        )
        self.apply(dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.size(0), self.latent_dim, 1, 1))


class Discriminator(nn.Module):
    """Image -> one real/fake logit.

    An input convolution with LeakyReLU(0.2) and no normalisation (DCGAN: BatchNorm on the
    discriminator input layer destabilises training), then four convolutions each followed by
    BatchNorm and LeakyReLU(0.2), then a 4×4 convolution to the logit (the sigmoid is in the loss).
    Resolutions: 28 -> 14 -> 7 -> 4 -> 4 -> 4 -> 1, or 64 -> 32 -> 16 -> 8 -> 4 -> 4 -> 1.
    """

    def __init__(self, channels: int = 3, image_size: int = 28, ndf: int = 64):
        super().__init__()
        _check_size(image_size)
        # (out channels, kernel, stride, padding) of the four normalised blocks
        if image_size == 64:
            blocks = [(ndf * 2, 4, 2, 1), (ndf * 4, 4, 2, 1), (ndf * 8, 4, 2, 1), (ndf * 8, 3, 1, 1)]
        else:
            blocks = [(ndf * 2, 4, 2, 1), (ndf * 4, 3, 2, 1), (ndf * 8, 3, 1, 1), (ndf * 8, 3, 1, 1)]
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        c_in = ndf
        for c_out, kernel, stride, padding in blocks:
            conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
            layers += [conv, nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 4, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten()
