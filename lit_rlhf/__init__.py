"""lit_rlhf: the modern LM pipeline (pretrain -> SFT -> reward model -> PPO -> evaluation) in Lightning."""

__version__ = "0.1.0"
