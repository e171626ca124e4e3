import pytest
import torch

from lit_rlhf.errors import UserInputError
from lit_rlhf.tinygpt.sft_data import IGNORE_INDEX, SFTCharsDataModule, encode_pair, pair_starts, split_windows
from lit_rlhf.tinygpt.tokenizer import UNK, CharTokenizer

TEXT = "".join(chr(ord("a") + i % 26) for i in range(2000))  # abc...zabc... : every window differs
VOCAB = [UNK, *"abcdefghijklmnopqrstuvwxyz", "I", "A", ":", ">", " ", "\n"]


def test_answer_mask_exact_positions():
    tok = CharTokenizer(VOCAB)
    ex = encode_pair(tok, "abcd", "efgh", "I:", "\nA:")
    # sequence: I : a b c d \n A : e f g h  (13 ids) -> x = first 12, y = last 12
    assert ex.x.shape == ex.y.shape == (12,)
    assert tok.decode(ex.prompt) == "I:abcd\nA:" and ex.prompt.shape == (9,)
    assert ex.y[:8].tolist() == [IGNORE_INDEX] * 8  # predictions of "I:abcd\nA" chars: template + instruction
    assert tok.decode(ex.y[8:]) == "efgh"  # y[8] is predicted from x[8] = ":", the last template char
    assert tok.decode(ex.x[8:9]) == ":"
    assert (ex.instruction, ex.target) == ("abcd", "efgh")


def test_pair_starts_and_split_without_overlap():
    starts = pair_starts(1000, k=10, stride=5)
    assert starts[:3] == [0, 5, 10] and starts[-1] == 980
    train, val = split_windows(starts, 20, val_fraction=0.2, seed=1)
    assert len(val) == round(len(starts) * 0.2)
    val_chars = {c for v in val for c in range(v, v + 20)}
    assert train and all(not val_chars & set(range(s, s + 20)) for s in train)
    assert split_windows(starts, 20, 0.2, seed=1) == (train, val)  # seeded
    assert split_windows(starts, 20, 0.2, seed=2)[1] != val


def make_data(tmp_path, **kwargs) -> SFTCharsDataModule:
    (tmp_path / "train.txt").write_text(TEXT)
    args = dict(
        path=str(tmp_path / "train.txt"),
        vocab=VOCAB,
        k=16,
        stride=32,
        batch_size=8,
        instruction_prefix="I: ",
        answer_prefix="\nA: ",
    )
    dm = SFTCharsDataModule(**{**args, **kwargs})
    dm.setup("fit")
    return dm


def test_datamodule_pairs_and_batches(tmp_path):
    dm = make_data(tmp_path)
    text = TEXT[: int(len(TEXT) * 0.9)]  # the pretraining train part of a single-file corpus
    n = len(pair_starts(len(text), 16, 32))
    assert len(dm.train_set) + len(dm.val_set) == n  # stride == 2k: no pair dropped
    ex = dm.val_set[0]
    s = dm.val_set.starts[0]
    assert (ex.instruction, ex.target) == (text[s : s + 16], text[s + 16 : s + 32])
    batch = next(iter(dm.train_dataloader()))
    prompt_len = len("I: ") + 16 + len("\nA: ")
    assert batch.x.shape == batch.y.shape == (8, prompt_len + 16 - 1)
    assert batch.prompt.shape == (8, prompt_len)
    assert (batch.y[:, : prompt_len - 1] == IGNORE_INDEX).all() and (batch.y[:, prompt_len - 1 :] >= 0).all()
    assert len(batch.instruction) == len(batch.target) == 8


def test_unseen_characters_map_to_unk(tmp_path):
    dm = make_data(tmp_path, vocab=[c for c in VOCAB if c != "q"])
    ex = dm.train_set[0]
    assert "q" in ex.instruction + ex.target
    assert 0 in torch.cat((ex.x, ex.y))  # <unk>


def test_template_characters_outside_vocab_are_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="template characters"):
        make_data(tmp_path, answer_prefix="\n### Answer: ")


def test_vocab_is_required(tmp_path):
    with pytest.raises(UserInputError, match="vocabulary"):
        make_data(tmp_path, vocab=None)


def test_text_too_short_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="too few"):
        make_data(tmp_path, max_chars=40)
