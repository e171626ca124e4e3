import warnings

import medmnist
import numpy as np
import pytest
import torch
from medmnist_helpers import real_arrays, real_medmnist, tiny_split, write_real_slice, write_tiny_medmnist

from lit_rlhf.dcgan.medmnist import FLAGS, MedMNISTDataModule, load_split, save_medmnist_npz
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
    dm = MedMNISTDataModule(
        flag="dermamnist", size=64, root=str(tmp_path), train_splits=["train", "val"], val_split=None, batch_size=8
    )
    dm.setup("fit")
    assert len(dm.train_set) == 32
    assert dm.train_set[0][0].shape == (3, 64, 64)


def test_missing_file_names_the_file_and_folder(tmp_path):
    with pytest.raises(UserInputError, match=r"'dermamnist\.npz' not found in '.*empty'"):
        load_split("dermamnist", "train", tmp_path / "empty")
    with pytest.raises(UserInputError, match=r"chestmnist_64\.npz"):
        MedMNISTDataModule(flag="chestmnist", size=64, root=str(tmp_path)).setup("fit")


def test_flags_come_from_medmnist_info_and_unknown_ones_are_refused():
    assert {"dermamnist", "chestmnist", "pneumoniamnist", "breastmnist", "pathmnist"} <= set(FLAGS)
    assert not any(flag.endswith("3d") for flag in FLAGS)
    with pytest.raises(
        UserInputError,
        match=r"'pneumonia' is unknown to medmnist .* \(did you mean 'pneumoniamnist'\?\)\."
        r".* one of the 2D flags of medmnist's INFO: pathmnist, chestmnist",
    ):
        MedMNISTDataModule(flag="pneumonia")
    with pytest.raises(UserInputError, match="'organmnist3d' is a 3D MedMNIST flag"):
        MedMNISTDataModule(flag="organmnist3d")


def test_save_rejects_a_wrong_layout(tmp_path):
    images, labels = tiny_split("chestmnist", 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"labels of shape \(4, 1\) where chestmnist .* has \(N, 14\)"):
        save_medmnist_npz(tmp_path, "chestmnist", {"train": (images, labels[:, :1])})
    with pytest.raises(ValueError, match=r"images uint8 \(N, 28, 28\) where dermamnist has uint8 \(N, 28, 28, 3\)"):
        save_medmnist_npz(tmp_path, "dermamnist", {"train": (images, labels[:, :1])})


# ---------------------------------------------------------------- the real PneumoniaMNIST / BreastMNIST files


@pytest.mark.parametrize(
    "flag, names", [("pneumoniamnist", ["normal", "pneumonia"]), ("breastmnist", ["malignant", "normal, benign"])]
)
def test_real_flags_take_channels_classes_and_names_from_info(data_root, flag, names):
    official = MedMNISTDataModule(flag=flag, root=str(real_medmnist(data_root, flag).parent))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the official file's MD5 is INFO's: no warning
        official.setup("test")
    assert len(official.test_set) == medmnist.INFO[flag]["n_samples"]["test"]
    assert (official.channels, official.num_classes, official.multi_label, official.class_names) == (1, 2, False, names)
    assert set(official.test_set.labels.tolist()) == {0, 1}


def test_md5_of_a_subset_is_a_warning_and_the_run_goes_on(data_root, tmp_path):
    write_real_slice(data_root, tmp_path, "pneumoniamnist", n_train=32, n_val=8, n_test=8)
    dm = MedMNISTDataModule(flag="pneumoniamnist", root=str(tmp_path), batch_size=16)
    with pytest.warns(
        UserWarning,
        match=r"is not the official MedMNIST pneumoniamnist\.npz: its MD5 [0-9a-f]{32} "
        r"differs from the 28209eda62fecd6e6a2d98b1501bb15f in medmnist's INFO\. "
        r"Continuing with this file",
    ):
        dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 28, 28) and set(labels.tolist()) <= {0, 1}
    expected, _ = real_arrays(data_root, "pneumoniamnist", "train", 0, 32)
    assert np.array_equal(dm.train_set.images[:, 0].numpy(), expected)


def test_another_flags_official_file_is_refused(data_root, tmp_path):
    (tmp_path / "pneumoniamnist.npz").symlink_to(real_medmnist(data_root, "breastmnist"))
    with pytest.raises(
        UserInputError,
        match=r"is the official breastmnist file .* not pneumoniamnist data\. Set "
        r"--data\.flag breastmnist",
    ):
        MedMNISTDataModule(flag="pneumoniamnist", root=str(tmp_path)).setup("fit")


@pytest.mark.parametrize(
    "source, problem",
    [
        ("dermamnist", r"images uint8 \(N, 28, 28, 3\) where pneumoniamnist has uint8 \(N, 28, 28\) \(1 channel"),
        ("chestmnist", r"labels of shape \(\d+, 14\) where pneumoniamnist \(binary-class\) has \(N, 1\)"),
        ("bloodmnist-as-gray", r"label values 0\.\.[2-7] where pneumoniamnist has classes 0\.\.1"),
    ],
)
def test_a_file_of_another_flag_is_refused(tmp_path, source, problem):
    rng = np.random.default_rng(0)
    if source == "bloodmnist-as-gray":  # 8 classes in a 1-channel file: only the label values disagree
        images, labels = tiny_split("chestmnist", 24, rng)[0], rng.integers(0, 8, (24, 1)).astype(np.uint8)
        labels[0] = 7
    else:
        images, labels = tiny_split(source, 24, rng)
    np.savez(
        tmp_path / "pneumoniamnist.npz",
        **{
            f"{split}_{kind}": array
            for split in ("train", "val", "test")
            for kind, array in (("images", images), ("labels", labels))
        },
    )
    with (
        pytest.warns(UserWarning, match="not the official"),
        pytest.raises(
            UserInputError,
            match=rf"does not hold pneumoniamnist data as medmnist's INFO describes it: its train split "
            rf"has {problem}.*set --data\.flag to the flag it holds",
        ),
    ):
        MedMNISTDataModule(flag="pneumoniamnist", root=str(tmp_path), batch_size=8).setup("fit")
