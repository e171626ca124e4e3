"""Plain helpers for tests (importable by name: `tests/` is on pytest's pythonpath)."""

from pathlib import Path

import pytest
import torch


def make_tiny_llama_dir(folder: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer LlamaForCausalLM with SmolLM2's tokenizer and chat template, saved as an HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(**{**settings, **overrides})
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


REPO = Path(__file__).resolve().parents[1]
# The config stack of each stage a test runs by name (ids in the README's error table use these names).
STAGE_STACKS = {
    "pretrain_tinygpt": ["tinygpt/pretrain.yaml"],
    "sft_tinygpt": ["tinygpt/sft.yaml"],
    "rl_lite": ["tinygpt/rl_lite.yaml"],
    "reward_model": ["rlhf/reward_model.yaml"],
    "ppo_full": ["rlhf/ppo.yaml"],
    "ppo_lora": ["rlhf/ppo.yaml", "lora/ppo.yaml"],
    "grpo": ["rlhf/grpo.yaml"],
    "rloo": ["rlhf/rloo.yaml"],
    "dpo": ["rlhf/dpo.yaml"],
    "dcgan_dermamnist": ["dcgan/dcgan.yaml"],
    "medmnist_classifier": ["dcgan/classifier.yaml"],
}


def config_args(stage: str) -> list[str]:
    """`--config` arguments for a stage named as in STAGE_STACKS."""
    return [arg for config in STAGE_STACKS[stage] for arg in ("--config", str(REPO / "configs" / config))]


# A TinyGPT run of two steps on the text Python ships: what the CLI tests run when any training will do.
TINY_RUN = (
    "--data.path builtin:pydoc-topics --data.train_chars 4000 --data.val_chars 1000 --trainer.max_steps 2 "
    "--trainer.enable_progress_bar false"
).split()


def cli_error(capsys, run) -> str:
    """Run a command that must stop on bad input: exit code 2, one paragraph on stderr, no trace."""
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lit_rlhf error:" in err
    message = err[err.index("lit_rlhf error:") :].strip()
    assert "\n\n" not in message
    return " ".join(message.split())
