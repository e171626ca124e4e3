"""`python -m lit_rlhf {fit,validate,test,predict} --config configs/<stage>.yaml`.

LightningCLI in subclass mode: each YAML picks its LightningModule and LightningDataModule by
`class_path`. Optimizers are arguments of the modules (callables settable from YAML), so modules
with several optimizers or manual optimization configure them the same way as the others.
"""

import os
import sys
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lit_rlhf.callbacks import RandomStatePerRank
from lit_rlhf.errors import UserInputError, as_paragraph

# Loggers / callbacks whose output folder is placed under trainer.default_root_dir.
_DIR_ARGS = {"save_dir", "dirpath"}


def _under_root(value: str | None, root: Path) -> str:
    if value in (None, "", "."):
        return str(root)
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else root / path)


def place_outputs_under_root(trainer_cfg) -> None:
    """Point every logger `save_dir` and checkpoint `dirpath` at (or under) `default_root_dir`.

    A relative folder in a YAML is read relative to the run folder, so one run writes all its
    files (checkpoints, metrics.csv, W&B offline files) in one place.
    """
    root = Path(trainer_cfg.default_root_dir or "runs/default").expanduser()
    trainer_cfg.default_root_dir = str(root)
    for group in ("logger", "callbacks"):
        entries = trainer_cfg.get(group)
        if not isinstance(entries, list):
            continue
        for entry in entries:
            init_args = entry.get("init_args") if hasattr(entry, "get") else None
            if init_args is None:
                continue
            for key in _DIR_ARGS:
                if key in init_args:
                    init_args[key] = _under_root(init_args[key], root)
            if entry.class_path.endswith("WandbLogger"):
                init_args["save_dir"] = _under_root(init_args.get("save_dir"), root)


class LitRLHFCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "callbacks": [RandomStatePerRank()],
                # checkpoints streamed to disk: Lightning's own save first builds them in memory
                "plugins": [{"class_path": "lit_rlhf.checkpoint_io.StreamingCheckpointIO"}],
            },
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        # PPO's data module keeps the reward model's training trees out of its evaluation prompts.
        parser.link_arguments("model.init_args.reward_model_path", "data.init_args.reward_model_path")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        place_outputs_under_root(config.trainer)


def main(args=None) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        LitRLHFCLI(args=args)
    except Exception as error:
        cause = error  # jsonargparse wraps errors raised in a module's __init__ in its own
        while cause is not None and not isinstance(cause, UserInputError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        print(as_paragraph(cause), file=sys.stderr)
        sys.exit(2)
