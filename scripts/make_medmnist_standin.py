"""Write a MedMNIST-format stand-in `.npz` from real images that ship offline with installed packages.

MedMNIST itself is downloaded from Zenodo, which this machine cannot reach. The stand-ins are real
images in the exact MedMNIST layout, so the whole DCGAN stage (data module, training, classifier,
report) runs on real pixels:

- `dermamnist.npz` (28×28 RGB, labels (N, 1), 7 classes like DermaMNIST): tiles of the seven real
  RGB photographs scikit-image ships; class = source photograph. Two are medical: a retinal
  fundus photograph (`retina`) and an immunohistochemistry slide (`immunohistochemistry`); the
  others are `chelsea`, `coffee`, `astronaut`, `rocket`, `hubble_deep_field`. Tiles are random
  square crops (side 28 to 20% of the short side) resized to 28 px; train / val / test tiles come
  from disjoint vertical bands of each photograph (0-70%, 70-80%, 80-100% of the width), so
  held-out images were never seen, not even in part. Flat tiles (std < 8, e.g. the black
  surround of the fundus) are skipped.
- `chestmnist.npz` (28×28 grayscale, labels (N, 14) multi-hot like ChestMNIST): the 1797 real
  handwritten digits of scikit-learn's `load_digits` (8×8, 17 grey levels) upscaled to 28 px;
  label column d is set for digit d. Split 70 / 10 / 20, stratified.

    python scripts/make_medmnist_standin.py --flag dermamnist --root /tmp/medmnist
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skimage_data
from sklearn.datasets import load_digits
from torchvision.utils import save_image

from lit_rlhf.data.medmnist import INFO, save_medmnist_npz, to_signed_unit
from lit_rlhf.modules.dcgan import image_grid

PHOTOS = ("retina", "immunohistochemistry", "chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field")
BANDS = {"train": (0.0, 0.7), "val": (0.7, 0.8), "test": (0.8, 1.0)}


def photo_tiles(photo: np.ndarray, band: tuple[float, float], n: int, rng: np.random.Generator) -> np.ndarray:
    """n 28×28 tiles cropped inside the band [band[0], band[1]) of the photo's width."""
    height, width = photo.shape[:2]
    left, right = int(band[0] * width), int(band[1] * width)
    largest = min(max(28, int(0.2 * min(height, width))), right - left, height)
    tiles = []
    while len(tiles) < n:
        side = int(rng.integers(28, largest + 1))
        x = int(rng.integers(left, right - side + 1))
        y = int(rng.integers(0, height - side + 1))
        crop = photo[y : y + side, x : x + side]
        if crop.std() < 8:
            continue
        tiles.append(np.asarray(Image.fromarray(crop).resize((28, 28), Image.LANCZOS)))
    return np.stack(tiles)


def dermamnist_standin(per_class: dict[str, int], rng: np.random.Generator) -> dict:
    photos = [getattr(skimage_data, name)() for name in PHOTOS]
    splits = {}
    for split, n in per_class.items():
        images = np.concatenate([photo_tiles(photo, BANDS[split], n, rng) for photo in photos])
        labels = np.repeat(np.arange(len(PHOTOS)), n)[:, None]
        order = rng.permutation(len(images))
        splits[split] = images[order], labels[order]
    return splits


def chestmnist_standin(rng: np.random.Generator) -> dict:
    digits = load_digits()
    images = np.stack([
        np.asarray(Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BICUBIC))
        for image in digits.images
    ])
    labels = np.zeros((len(images), len(INFO["chestmnist"]["label"])), np.uint8)
    labels[np.arange(len(images)), digits.target] = 1
    parts = {"train": [], "val": [], "test": []}
    for digit in range(10):
        index = rng.permutation(np.flatnonzero(digits.target == digit))
        cut1, cut2 = int(0.7 * len(index)), int(0.8 * len(index))
        for split, chunk in zip(parts, (index[:cut1], index[cut1:cut2], index[cut2:])):
            parts[split].append(chunk)
    splits = {}
    for split, chunks in parts.items():
        index = rng.permutation(np.concatenate(chunks))
        splits[split] = images[index], labels[index]
    return splits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flag", choices=("dermamnist", "chestmnist"), required=True)
    parser.add_argument("--root", required=True, help="folder to write <flag>.npz into (--data.root)")
    parser.add_argument("--per-class", type=int, nargs=3, default=(300, 50, 100), metavar=("TRAIN", "VAL", "TEST"),
                        help="dermamnist tiles per class and split (default 300 50 100)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    if args.flag == "dermamnist":
        splits = dermamnist_standin(dict(zip(BANDS, args.per_class)), rng)
    else:
        splits = chestmnist_standin(rng)
    path = save_medmnist_npz(args.root, args.flag, splits)
    train = torch.from_numpy(splits["train"][0][:32])
    train = train.unsqueeze(1) if train.dim() == 3 else train.permute(0, 3, 1, 2)
    montage = Path(args.root) / f"{args.flag}_standin_train_8x4.png"
    save_image(image_grid(to_signed_unit(train)), montage)
    sizes = ", ".join(f"{split} {len(images)}" for split, (images, _) in splits.items())
    print(f"wrote {path} ({sizes}) and {montage}")


if __name__ == "__main__":
    main()
