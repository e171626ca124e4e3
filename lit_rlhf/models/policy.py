"""The policy that the RLHF methods train, online (PPO, GRPO, RLOO) and offline (DPO): LoRA settings,
the policy loaded with its reference, what a checkpoint of it keeps, and the memory cost both log.

Every model runs in eval mode, updates included (as TRL disables dropout), hence LoRA here has no
dropout setting.
"""

import copy
import resource
from dataclasses import asdict, dataclass, is_dataclass

import torch
from lightning.pytorch import LightningModule
from peft import LoraConfig, get_peft_model

from lit_rlhf.models.hf import load_causal_lm


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 32
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def config(self, task_type: str) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=0.0,
            target_modules=list(self.target_modules),
            task_type=task_type,
        )


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux reports KiB), for comparing methods' cost."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def policy_and_reference(model_name_or_path: str, lora: LoraSettings | None, trust_remote_code: bool = False):
    """(policy, reference): full, the reference is a frozen copy; LoRA, the reference is None (the
    policy with its adapters disabled, no second copy)."""
    policy = load_causal_lm(model_name_or_path, trust_remote_code=trust_remote_code)
    if lora is None:
        return policy, freeze(copy.deepcopy(policy))
    return get_peft_model(policy, lora.config("CAUSAL_LM")), None


def count_trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def keep_trainable_weights(module: LightningModule, checkpoint: dict) -> None:
    """A policy module's `on_save_checkpoint`: keep only the trainable weights (the frozen models
    reload from their paths, hence `strict_loading = False`) and store the LoRA settings as a plain
    dict, so the checkpoint loads with `weights_only=True`."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
    lora = checkpoint["hyper_parameters"].get("lora")  # a dataclass or, from the CLI, a Namespace
    if lora is not None and not isinstance(lora, dict):
        checkpoint["hyper_parameters"]["lora"] = asdict(lora) if is_dataclass(lora) else lora.as_dict()
