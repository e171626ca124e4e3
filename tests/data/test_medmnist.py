import medmnist
import numpy as np
import pytest
import torch
from medmnist_helpers import tiny_split, write_tiny_medmnist

from lit_rlhf.data.medmnist import MedMNISTDataModule, load_split, save_medmnist_npz
from lit_rlhf.errors import UserInputError


@pytest.mark.parametrize("flag, channels, label_shape", [("dermamnist", 3, ()), ("chestmnist", 1, (14,))])
def test_loads_through_medmnist_classes(tmp_path, monkeypatch, flag, channels, label_shape):
    write_tiny_medmnist(tmp_path, flag, n_train=40, n_val=8, n_test=8)
    dataset_class = getattr(medmnist, medmnist.INFO[flag]["python_class"])
    built = []

    class Spy(dataset_class):
        def __init__(self, *args, **kwargs):
            built.append(kwargs["split"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(medmnist, dataset_class.__name__, Spy)
    dm = MedMNISTDataModule(flag=flag, root=str(tmp_path), batch_size=16)
    dm.setup("fit")
    assert built == ["train", "val"]
    assert dm.channels == channels
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, channels, 28, 28) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert labels.shape == (16, *label_shape)
    assert len(dm.train_dataloader()) == 40 // 16  # the incomplete last batch is dropped
    # the split is one uint8 tensor, equal to what medmnist reads from the file
    assert dm.train_set.images.dtype == torch.uint8 and dm.train_set.images.shape == (40, channels, 28, 28)
    raw = dataset_class(split="train", root=str(tmp_path)).imgs
    expected = raw[:, None] if channels == 1 else raw.transpose(0, 3, 1, 2)
    assert np.array_equal(dm.train_set.images.numpy(), expected)
    assert torch.allclose(dm.train_set[3][0], torch.from_numpy(expected[3]).float() / 127.5 - 1)  # [0, 255] -> [-1, 1]


def test_splits_from_config_and_size_64(tmp_path):
    write_tiny_medmnist(tmp_path, "dermamnist", n_train=20, n_val=12, n_test=4, size=64)
    assert (tmp_path / "dermamnist_64.npz").exists()
    dm = MedMNISTDataModule(flag="dermamnist", size=64, root=str(tmp_path), train_splits=["train", "val"],
                            val_split=None, batch_size=8)
    dm.setup("fit")
    assert len(dm.train_set) == 32
    assert dm.train_set[0][0].shape == (3, 64, 64)


def test_missing_file_names_the_file_and_folder(tmp_path):
    with pytest.raises(UserInputError, match=r"'dermamnist\.npz' not found in '.*empty'"):
        load_split("dermamnist", "train", tmp_path / "empty")
    with pytest.raises(UserInputError, match=r"chestmnist_64\.npz"):
        MedMNISTDataModule(flag="chestmnist", size=64, root=str(tmp_path)).setup("fit")
    with pytest.raises(UserInputError, match="pathmnist"):
        MedMNISTDataModule(flag="pathmnist")


def test_save_rejects_a_wrong_layout(tmp_path):
    images, labels = tiny_split("chestmnist", 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="labels must have shape"):
        save_medmnist_npz(tmp_path, "chestmnist", {"train": (images, labels[:, :1])})
    with pytest.raises(ValueError, match="images must be uint8"):
        save_medmnist_npz(tmp_path, "dermamnist", {"train": (images, labels[:, :1])})
