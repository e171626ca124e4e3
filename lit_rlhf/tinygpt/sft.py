"""Supervised fine-tuning of a pretrained TinyGPT on instruction -> answer pairs (the reference
report's SFT step), with the loss on the answer characters only."""

import torch
from lightning.pytorch.cli import OptimizerCallable
from pydantic import NonNegativeInt, PositiveInt
from torchmetrics import MetricCollection
from torchmetrics.text import CHRFScore, SacreBLEUScore

from lit_rlhf.tables import log_table
from lit_rlhf.tinygpt.pretrain import TinyGPTModule
from lit_rlhf.tinygpt.sft_data import SFTExample


def answer_metrics(prefix: str = "val/") -> MetricCollection:
    """Corpus-level BLEU on characters and on words (sacreBLEU's `char` / `13a` tokenizers) and
    chrF (characters only, not chrF++), all in 0..1, of generated answers against their targets."""
    return MetricCollection(
        {
            "bleu_char": SacreBLEUScore(tokenize="char"),
            "bleu_word": SacreBLEUScore(tokenize="13a"),
            "chrf": CHRFScore(n_word_order=0),
        },
        prefix=prefix,
        compute_groups=False,  # the two BLEUs share state names but never their values
    )


class SFTTinyGPTModule(TinyGPTModule):
    """SFT of a pretrained TinyGPT: the loss covers the answer characters only.

    Starts from a pretraining checkpoint (`init_from`, same vocabulary) and trains on
    `SFTCharsDataModule` batches whose targets are `-100` outside the answer.

    Sequences (template + instruction + answer) may be longer than the model's block: every
    position is then scored with the context cropped as at generation time, through windows that
    advance by `window_stride` (each position sees at least block_size - window_stride characters).

    Every validation generates the answers of the validation pairs (as many characters as the
    target, greedy when `generate_temperature` is 0), scores them against the targets with
    `answer_metrics` and logs `num_examples` of them.
    """

    def __init__(
        self,
        init_from: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        window_stride: PositiveInt = 16,
        generate_temperature: float = 0.0,
        num_examples: NonNegativeInt = 3,
        **kwargs,
    ):
        super().__init__(init_from=init_from, optimizer=optimizer, **kwargs)
        self.answer_metrics = answer_metrics()
        self._examples: list[list[str]] = []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model.sliding_logits(idx, self.hparams.window_stride)

    @torch.no_grad()
    def generate_answers(self, prompt: torch.Tensor, num_chars: int) -> list[str]:
        out = self.model.generate(prompt, num_chars, temperature=self.hparams.generate_temperature)
        return [self.tokenizer.decode(row) for row in out[:, prompt.size(1) :]]

    def validation_step(self, batch: SFTExample, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        generated = self.generate_answers(batch.prompt, len(batch.target[0]))
        self.answer_metrics.update(generated, [[target] for target in batch.target])
        if batch_idx == 0:
            self._examples = [list(row) for row in zip(batch.instruction, batch.target, generated)]

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log_dict(self.answer_metrics.compute())
        self.answer_metrics.reset()

    def log_samples(self) -> None:
        rows = self._examples[: self.hparams.num_examples]
        log_table(self.trainer, "samples/sft", ["instruction", "target", "generated"], rows)
