"""Prompt batches for on-policy RL: every batch is the whole prompt list, the module samples the
completions itself, so an "epoch" is just `steps_per_epoch` optimisation steps."""

from lightning.pytorch import LightningDataModule
from pydantic import PositiveInt
from torch.utils.data import DataLoader, Dataset

from lit_rlhf.data.loaders import resumable_loader
from lit_rlhf.errors import UserInputError

REPORT_PROMPTS = ("The future of AI ", "In this study, we ", "Recent advances in NLP")


class RepeatedPrompts(Dataset):
    def __init__(self, prompts: list[str], steps: int):
        self.prompts, self.steps = list(prompts), steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> list[str]:
        return list(self.prompts)


class PromptsDataModule(LightningDataModule):
    """The prompts RL-lite completes: every step's batch is the whole list.

    Args:
        prompts: the prompts to complete (default: the reference report's three).
        steps_per_epoch: batches per epoch (checkpoints are written at epoch ends).
    """

    def __init__(self, prompts: list[str] = list(REPORT_PROMPTS), steps_per_epoch: PositiveInt = 100):
        super().__init__()
        if not prompts or not all(prompts):
            raise UserInputError("data.prompts must be a non-empty list of non-empty strings.")
        if steps_per_epoch < 1:
            raise UserInputError(f"data.steps_per_epoch must be >= 1, got {steps_per_epoch}.")
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: each item (the prompt list) is already a batch
        return resumable_loader(
            RepeatedPrompts(self.hparams.prompts, self.hparams.steps_per_epoch), None, shuffle=False
        )
