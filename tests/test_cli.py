"""Every YAML in configs/ parses; run outputs are placed under trainer.default_root_dir."""

from pathlib import Path

import pytest
from jsonargparse import Namespace

from lit_rlhf.cli import main, place_outputs_under_root

REPO = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "evaluate.yaml")


def test_there_is_a_config_per_stage():
    names = {p.stem for p in STAGE_CONFIGS}
    assert {"pretrain_tinygpt", "pretrain_tinygpt_large", "reward_model", "ppo_full", "ppo_lora"} <= names


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=lambda p: p.stem)
def test_every_stage_config_prints(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lit_rlhf." in printed and "default_root_dir: runs/" in printed
    assert "WandbLogger" in printed and "CSVLogger" in printed


def test_evaluate_config_prints(capsys):
    from lit_rlhf import evaluate

    with pytest.raises(SystemExit):
        evaluate.main(["--config", str(REPO / "configs/evaluate.yaml"), "--print_config"])
    assert "reward_model: runs/reward_model/reward_model" in capsys.readouterr().out


def test_outputs_are_placed_under_the_run_folder():
    trainer = Namespace(
        default_root_dir="runs/x",
        logger=[
            Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=".", name="csv")),
            Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(project="p")),
        ],
        callbacks=[
            Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=Namespace(dirpath="checkpoints")),
            Namespace(class_path="x.Abs", init_args=Namespace(dirpath="/abs/elsewhere")),
        ],
    )
    place_outputs_under_root(trainer)
    assert trainer.logger[0].init_args.save_dir == "runs/x"
    assert trainer.logger[1].init_args.save_dir == "runs/x"
    assert trainer.callbacks[0].init_args.dirpath == "runs/x/checkpoints"
    assert trainer.callbacks[1].init_args.dirpath == "/abs/elsewhere"


@pytest.mark.parametrize("scale", sorted((REPO / "configs" / "scale").glob("*.yaml")), ids=lambda p: p.stem)
def test_scale_overrides_stack_on_a_stage_and_build_their_strategy(scale, capsys):
    """The GPU-node overrides parse on top of a stage, and their strategy can be constructed (this
    machine has no GPU to run it): every class path in them imports."""
    import importlib

    import yaml
    from lightning.pytorch.strategies import StrategyRegistry

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs/reward_model.yaml"), "--config", str(scale), "--print_config"])
    assert "precision: bf16-mixed" in capsys.readouterr().out
    strategy = yaml.safe_load(scale.read_text())["trainer"]["strategy"]
    if isinstance(strategy, str):
        assert strategy in StrategyRegistry
        return

    def load(path: str):
        module, name = path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    init_args = dict(strategy["init_args"])
    for key in ("auto_wrap_policy", "activation_checkpointing_policy"):
        init_args[key] = {load(path) for path in init_args[key]}
    built = load(strategy["class_path"])(**init_args)
    assert type(built).__name__ == "FSDPStrategy"
