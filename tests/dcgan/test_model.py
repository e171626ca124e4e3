import pytest
import torch
from torch import nn

from lit_rlhf.dcgan.model import Discriminator, Generator


@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(size, channels):
    generator = Generator(latent_dim=16, channels=channels, image_size=size, ngf=8)
    images = generator(torch.randn(5, 16))
    assert images.shape == (5, channels, size, size)
    assert images.abs().max() <= 1  # Tanh
    assert Discriminator(channels, size, ndf=8)(images).shape == (5,)


def test_generator_is_dcgan_with_only_the_output_layer_adapted():
    layers28 = list(Generator(image_size=28).net)
    layers64 = list(Generator(image_size=64).net)
    assert [type(m) for m in layers28[:-2]] == [type(m) for m in layers64[:-2]]
    assert [type(m) for m in layers28[:-2]] == [nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU] * 4
    assert isinstance(layers28[-1], nn.Tanh) and isinstance(layers64[-2], nn.ConvTranspose2d)
    weights = torch.cat([m.weight.flatten() for m in layers28 if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert abs(weights.std().item() - 0.02) < 0.002  # DCGAN init N(0, 0.02)


@pytest.mark.parametrize("size", [28, 64])
def test_discriminator_has_four_normalised_leaky_conv_layers(size):
    layers = list(Discriminator(3, size).net)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    normalised = [
        i
        for i in convs
        if i + 2 < len(layers)
        and isinstance(layers[i + 1], nn.BatchNorm2d)
        and isinstance(layers[i + 2], nn.LeakyReLU)
        and layers[i + 2].negative_slope == 0.2
    ]
    assert len(normalised) >= 4
    first = layers[convs[0] + 1]
    assert isinstance(first, nn.LeakyReLU) and first.negative_slope == 0.2  # no BatchNorm on the input layer
    assert convs[-1] == len(layers) - 1  # the logit layer
