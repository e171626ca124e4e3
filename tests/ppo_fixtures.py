"""A tiny policy and a hand-built tiny reward model with a learnable signal, for PPO tests.

The reward model's attention is uniform (zero queries/keys): it averages one embedding coordinate
(+1 for even token ids, -1 for odd) over the prefix into the coordinate the scalar head reads, so
its score (and, as a critic, its per-token value) increases with the fraction of even-id tokens. The policy's
output embeddings (untied) carry the same parity direction, so PPO can raise the score by moving one direction.
"""

from pathlib import Path

import torch
from helpers import make_tiny_llama_dir
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForCausalLM


def _parity(vocab_size: int) -> torch.Tensor:
    return torch.where(torch.arange(vocab_size) % 2 == 0, 1.0, -1.0)


def make_parity_policy(folder: Path, tokenizer_dir: Path) -> Path:
    make_tiny_llama_dir(folder, tokenizer_dir, seed=0, tie_word_embeddings=False)
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight[:, 0] = 0.5 * _parity(model.config.vocab_size)
    model.save_pretrained(folder)
    return folder


def make_parity_reward_model(folder: Path, tokenizer_dir: Path) -> Path:
    make_tiny_llama_dir(folder / "lm", tokenizer_dir, seed=1)
    model = AutoModelForSequenceClassification.from_pretrained(folder / "lm", num_labels=1)
    heads, head_dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[:, 2] = _parity(model.config.vocab_size)
        emb[:, 1] = 10.0  # a constant coordinate keeps the RMS norms nearly constant (no saturation)
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.mlp.down_proj):
                proj.weight.zero_()
            for kv_head in range(model.config.num_key_value_heads):
                attn.v_proj.weight[kv_head * head_dim, 2] = 1.0
            for head in range(heads):
                attn.o_proj.weight[0, head * head_dim] = 1.0 / heads
        model.score.weight.zero_()
        model.score.weight[0, 0] = 10.0
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(folder / "lm").save_pretrained(folder)
    return folder
