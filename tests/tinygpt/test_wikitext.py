import pandas as pd
import pytest

from lit_rlhf.errors import UserInputError
from lit_rlhf.tinygpt.tokenizer import UNK
from lit_rlhf.tinygpt.wikitext import WikiText2DataModule

TEXT = "The quick brown fox jumps over the lazy dog. " * 20


def data(path, **kwargs) -> WikiText2DataModule:
    dm = WikiText2DataModule(path=str(path), block_size=8, batch_size=4, **kwargs)
    dm.setup("fit")
    return dm


def test_folder_with_wikitext_files_uses_its_splits(tmp_path):
    (tmp_path / "wiki.train.raw").write_text(TEXT)
    (tmp_path / "wiki.valid.raw").write_text("Valid text, quite different!")
    (tmp_path / "wiki.test.raw").write_text("never used")
    dm = data(tmp_path)
    assert dm.texts == (TEXT, "Valid text, quite different!")


def test_single_file_is_cut_90_10_contiguously_without_overlap(tmp_path):
    file = tmp_path / "wiki.test.raw"
    file.write_text(TEXT)
    train, val = data(file).texts
    assert train + val == TEXT
    assert len(train) == int(len(TEXT) * 0.9)


def test_real_wikitext_sample_split(data_root):
    train, val = data(data_root / "wikitext-2-raw").texts
    assert train.startswith(" \n = Robert Boulter = \n")
    assert len(val) == pytest.approx(len(train) / 9, rel=1e-3)


def test_parquet_with_text_column(tmp_path):
    pd.DataFrame({"text": ["first line\n", "second line\n"] * 10}).to_parquet(tmp_path / "train.parquet")
    train, val = data(tmp_path / "train.parquet").texts
    assert (train + val).startswith("first line\nsecond line\n")


def test_parquet_without_text_column_is_a_user_error(tmp_path):
    pd.DataFrame({"content": ["x" * 50]}).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(UserInputError, match="'text' column"):
        data(tmp_path / "train.parquet")


def test_slicing_and_windows(tmp_path):
    (tmp_path / "train.txt").write_text(TEXT)
    (tmp_path / "valid.txt").write_text(TEXT)
    dm = data(tmp_path, train_chars=100, val_chars=40)
    assert [len(t) for t in dm.texts] == [100, 40]
    assert len(dm.train_set) == (100 - 1) // 8
    x, y = dm.train_set[1]
    assert x.shape == y.shape == (8,) and dm.tokenizer.decode(x) == TEXT[8:16]
    assert dm.tokenizer.decode(y) == TEXT[9:17]
    assert next(iter(dm.train_dataloader()))[0].shape == (4, 8)


def test_block_size_larger_than_text_is_a_user_error(tmp_path):
    (tmp_path / "train.txt").write_text(TEXT)
    (tmp_path / "valid.txt").write_text("short")
    with pytest.raises(UserInputError, match="block_size"):
        data(tmp_path)


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        data(tmp_path / "nowhere")


def test_folder_without_text_file_is_a_user_error(tmp_path):
    (tmp_path / "notes.md").write_text(TEXT)
    with pytest.raises(UserInputError, match="recognisable"):
        data(tmp_path)


def test_vocab_from_train_only_and_unseen_chars_map_to_unk(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("abcabcabcabcabc")
    (tmp_path / "valid.txt").write_text("abczabcabcabc")
    dm = data(tmp_path)
    assert dm.vocab == [UNK, "a", "b", "c"]
    assert "1 validation characters never seen" in capsys.readouterr().out
    ids = dm.tokenizer.encode("az")
    assert ids.tolist() == [1, 0]
    assert dm.tokenizer.decode(ids) == "a"
