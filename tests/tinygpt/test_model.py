import pytest
import torch

from lit_rlhf.tinygpt.model import TinyGPT, TinyGPTConfig


def tiny(**overrides) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(TinyGPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, **overrides)).eval()


def test_logits_shape():
    assert tiny()(torch.randint(0, 11, (3, 7))).shape == (3, 7, 11)


def test_causal_future_token_does_not_change_past_logits():
    model = tiny()
    idx = torch.randint(0, 11, (2, 12))
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 11
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_weight_tying():
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in set(model.parameters()))


def test_sequence_longer_than_block_size_is_an_error():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_n_embd_not_divisible_by_n_head_is_an_error():
    with pytest.raises(ValueError, match="divisible"):
        TinyGPT(TinyGPTConfig(vocab_size=5, n_embd=10, n_head=4))


def test_generate_length_and_greedy_is_deterministic():
    model = tiny()
    prompt = torch.randint(0, 11, (2, 5))
    out = model.generate(prompt, 20, temperature=0)  # longer than block_size: context is cropped
    assert out.shape == (2, 25) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, model.generate(prompt, 20, temperature=0))


@pytest.mark.parametrize("stride", [1, 5, 16])
def test_sliding_logits_match_generate_context(stride):
    """Position t is scored from the last block_size tokens at most, and at least block_size - stride."""
    model = tiny()
    idx = torch.randint(0, 11, (2, 40))
    logits = model.sliding_logits(idx, stride)
    assert logits.shape == (2, 40, 11)
    torch.testing.assert_close(logits[:, :16], model(idx[:, :16]))
    if stride == 1:  # exactly what generate() computes for the next token
        for t in range(16, 40):
            torch.testing.assert_close(logits[:, t], model(idx[:, t - 15 : t + 1])[:, -1])
    # a token more than block_size before t never influences t
    changed = idx.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 11
    torch.testing.assert_close(model.sliding_logits(changed, stride)[:, 16:], logits[:, 16:])
