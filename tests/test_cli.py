"""Every YAML in configs/ parses, and so does every command the README, docs/ and config headers show; run
outputs are placed under trainer.default_root_dir; a newcomer's first hour: W&B files where they belong, commands
from any folder, progress in logs, no library noise, help texts."""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import wandb
import yaml
from helpers import TINY_RUN
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from nbclient import NotebookClient

from lit_rlhf import evaluate, pipeline
from lit_rlhf.callbacks import ProgressLines, StepsProgressBar
from lit_rlhf.cli import main, override_folders, place_outputs_under_root, stage_configs
from lit_rlhf.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = [REPO / config for config in stage_configs()]


def test_there_is_a_base_config_per_method_grouped_by_project():
    names = {p.relative_to(REPO / "configs").as_posix() for p in STAGE_CONFIGS}
    assert names == {
        "rlhf/reward_model.yaml",
        "rlhf/ppo.yaml",
        "rlhf/grpo.yaml",
        "rlhf/rloo.yaml",
        "rlhf/dpo.yaml",
        "tinygpt/pretrain.yaml",
        "tinygpt/sft.yaml",
        "tinygpt/rl_lite.yaml",
        "dcgan/dcgan.yaml",
        "dcgan/classifier.yaml",
    }
    assert [p.stem for p in GPU_NODES] == ["ddp_bf16", "fsdp_llama"]


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"python -m (lit_rlhf(?: (?:fit|validate|test|predict)|\.evaluate)) ([^\n`|]*)")
PLACEHOLDER = re.compile(r"<|\[|\.\.\.|…")  # `<run>`, `[--option]`, `...`: a pattern to fill in, not a command


def shown_texts() -> list[tuple[Path, str]]:
    """The code that the README, docs/*.md and the config headers show: fenced blocks and inline code (its
    line breaks are spaces) of the documents, each YAML file whole; continuation lines joined."""
    fence = re.compile(r"^```[^\n]*\n(.*?)^```", flags=re.S | re.M)
    texts = []
    for doc in DOCS:
        text = doc.read_text()
        texts += [(doc, block) for block in fence.findall(text)]
        texts += [(doc, span.replace("\n", " ")) for span in re.findall(r"`([^`]+)`", fence.sub("", text))]
    texts += [(p, p.read_text()) for p in sorted((REPO / "configs").rglob("*.yaml"))]
    return [(source, re.sub(r"\\\n[#\s]*", " ", text)) for source, text in texts]


def shell_variables(source: Path) -> dict[str, str]:
    """The `NAME=value` assignments of a document (the first wins), so that `$F` in its commands is resolved."""
    variables = {"LIT_RLHF_DATA": "/data"}
    for name, value in re.findall(r"(?<![\w$])([A-Z][A-Z0-9_]*)=([^\s#`'\"]+)", source.read_text()):
        variables.setdefault(name, value)
    return variables


def shown_commands() -> list[tuple[str, ...]]:
    """Every `python -m lit_rlhf <subcommand>` and `python -m lit_rlhf.evaluate` command shown, as its program
    and arguments: whole when it is a real command, else its `--config` stack."""
    commands = set()
    for source, text in shown_texts():
        variables = shell_variables(source)
        for program, args in COMMAND.findall(text):
            args = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), args.split(" #")[0])
            configs = re.findall(r"(?:--config[ =]|-c )([^\s\[\]]+)", args)
            if not configs or any(PLACEHOLDER.search(c) for c in configs):
                continue  # `--config ...`, `configs/<project>/<method>.yaml`: a pattern
            program, *subcommand = program.split()
            if PLACEHOLDER.search(args):
                args = " ".join(f"--config {config}" for config in configs)
            commands.add((program, *subcommand, *shlex.split(args)))
    # a bare stack is parsed anyway where a command adds options to it
    with_options = {stack_of(c) for c in commands if len(stack_of(c)) < len(c)}
    return sorted(c for c in commands if len(stack_of(c)) < len(c) or c not in with_options)


def stack_of(command: tuple[str, ...]) -> tuple[str, ...]:
    """The program and `--config` pairs of a shown command."""
    program, *args = command
    subcommand = [args[0]] if args and not args[0].startswith("-") else []
    return (program, *subcommand, *[a for flag, c in zip(args, args[1:]) if flag == "--config" for a in (flag, c)])


def shown_config_stacks() -> list[tuple[str, ...]]:
    """The `--config` stacks of the shown commands."""
    stacks = {tuple(c for flag, c in zip(command, command[1:]) if flag == "--config") for command in shown_commands()}
    return sorted(stacks)


def test_every_override_is_shown_or_run_by_the_pipeline():
    shown = {config for stack in shown_config_stacks() for config in stack}
    for setting in pipeline.SETTINGS:
        namespace = pipeline.argparse.Namespace(
            root=Path("runs"),
            setting=setting,
            model=None,
            prompt_data="rows",
            preference_data=None,
            eval_prompts=None,
            seed=0,
            stages=[],
        )
        for stage in pipeline.plan(namespace):
            shown |= {
                Path(c).relative_to(REPO).as_posix()
                for c, flag in zip(stage.command[1:], stage.command)
                if flag == "--config"
            }
    overrides = {
        p.relative_to(REPO).as_posix() for folder in override_folders() for p in (REPO / folder).glob("*.yaml")
    }
    assert overrides - shown == set()


@pytest.mark.parametrize("command", shown_commands(), ids=lambda command: " ".join(command[1:])[:150])
def test_every_command_the_docs_show_parses(command, capsys):
    """The options, values and config files of every shown command exist (`--print_config` parses, runs nothing)."""
    program, *args = command
    assert "$" not in " ".join(args), f"a shell variable that the document does not set: {' '.join(command)}"
    with pytest.raises(SystemExit) as exit_info:
        (main if program == "lit_rlhf" else evaluate.main)([*args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err


def test_every_module_script_and_config_the_docs_name_exists():
    """`python -m <module>`, scripts and `configs/...yaml` named in the README, docs/*.md or a config header: a
    renamed module or a moved config fails here, not in a reader's shell."""
    text = "\n".join(p.read_text() for p in [*DOCS, *sorted((REPO / "configs").rglob("*.yaml"))])
    text = re.sub(r"\\\n[#\s]*", " ", text)

    def importable(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a missing parent package
            return False

    assert sorted(m for m in set(re.findall(r"python -m ([\w.]+)", text)) if not importable(m)) == []
    files = set(re.findall(r"\b((?:scripts|bench|configs|tests)/[\w/.-]+\.(?:py|yaml))\b", text))
    assert sorted(f for f in files if not (REPO / f).is_file()) == []


def test_every_test_the_docs_name_exists():
    """The bad-input table and the docs name the test behind each claim: a renamed test must rename its row."""
    named = {name for doc in DOCS for name in re.findall(r"\b(test_\w+)\b(?!\.\w)", doc.read_text())}
    tests = "\n".join(file.read_text() for file in (REPO / "tests").rglob("*.py"))
    assert sorted(named - set(re.findall(r"def (test_\w+)", tests))) == []


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
        evaluate.main(["--config", str(REPO / "configs/rlhf/evaluate.yaml"), "--print_config"])
    assert "reward_model: runs/reward_model/reward_model" in capsys.readouterr().out


def test_outputs_are_placed_under_the_run_folder():
    trainer = Namespace(
        default_root_dir="runs/x",
        logger=[
            Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=".", name="csv")),
            Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(project="p")),
        ],
        callbacks=[
            Namespace(
                class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=Namespace(dirpath="checkpoints")
            ),
            Namespace(class_path="x.Abs", init_args=Namespace(dirpath="/abs/elsewhere")),
        ],
    )
    place_outputs_under_root(trainer)
    assert trainer.logger[0].init_args.save_dir == "runs/x"
    assert trainer.logger[1].init_args.save_dir == "runs/x"
    assert trainer.callbacks[0].init_args.dirpath == "runs/x/checkpoints"
    assert trainer.callbacks[1].init_args.dirpath == "/abs/elsewhere"


GPU_NODES = sorted(
    p for p in (REPO / "configs" / "scale").glob("*.yaml") if "strategy" in yaml.safe_load(p.read_text())["trainer"]
)


@pytest.mark.parametrize("scale", GPU_NODES, ids=lambda p: p.stem)
def test_scale_overrides_stack_on_a_stage_and_build_their_strategy(scale, capsys):
    """The GPU-node overrides parse on top of a stage, and their strategy can be constructed (this
    machine has no GPU to run it): every class path in them imports."""
    import importlib

    import yaml
    from lightning.pytorch.strategies import StrategyRegistry

    with pytest.raises(SystemExit):
        main(
            ["fit", "--config", str(REPO / "configs/rlhf/reward_model.yaml"), "--config", str(scale), "--print_config"]
        )
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


def test_wandb_mode_online_in_the_environment_takes_the_wandb_logger_online(monkeypatch):
    """The configs say `offline: true`, which makes Lightning force W&B's offline mode whatever WANDB_MODE says."""
    trainer = Namespace(
        default_root_dir="runs/x",
        logger=[Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(offline=True))],
    )
    monkeypatch.delenv("WANDB_MODE", raising=False)
    place_outputs_under_root(trainer)
    assert trainer.logger[0].init_args.offline is True
    assert trainer.logger[0]["dict_kwargs"]["mode"] == "offline"  # wandb.init's own argument (see lit_rlhf.tracking)
    monkeypatch.setenv("WANDB_MODE", "online")
    place_outputs_under_root(trainer)
    assert trainer.logger[0].init_args.offline is False
    assert trainer.logger[0]["dict_kwargs"]["mode"] == "online"
    monkeypatch.setenv("WANDB_MODE", "offlne")
    with pytest.raises(UserInputError, match="WANDB_MODE='offlne' is not a W&B mode"):
        place_outputs_under_root(trainer)


def test_placing_outputs_twice_changes_nothing():
    """A saved config.yaml run again (its paths already under the root) is not nested a second time."""
    trainer = Namespace(
        default_root_dir="runs/x",
        logger=[
            Namespace(
                class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(save_dir=None, project="p")
            )
        ],
    )
    place_outputs_under_root(trainer)
    place_outputs_under_root(trainer)
    assert trainer.logger[0].init_args.save_dir == "runs/x"


@pytest.mark.parametrize("absolute", [False, True], ids=["relative_root", "absolute_root"])
def test_wandb_files_land_in_root_wandb_and_the_saved_config_says_so(absolute, tmp_path, monkeypatch):
    """Before: a relative root put them in <root>/<root>/wandb. The saved config.yaml, run again,
    writes to the same place."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs" / "tiny" if absolute else Path("runs/tiny")
    main(["fit", "--config", "configs/tinygpt/pretrain.yaml", *TINY_RUN, "--trainer.default_root_dir", str(root)])
    assert list((tmp_path / "runs" / "tiny" / "wandb").glob("offline-run-*"))
    assert not (tmp_path / "runs" / "tiny" / "runs").exists() and not (tmp_path / "wandb").exists()
    # 2 steps, logged every 25: the last step's metrics are written when training ends (LogLastStep)
    assert "train/loss" in (tmp_path / "runs/tiny/csv/version_0/metrics.csv").read_text().splitlines()[0]
    saved = tmp_path / "runs/tiny/csv/version_0/config.yaml"
    loggers = yaml.safe_load(saved.read_text())["trainer"]["logger"]
    assert [logger["init_args"]["save_dir"] for logger in loggers] == [str(root), str(root)]
    main(["fit", "--config", str(saved), "--trainer.max_steps", "3"])
    resaved = yaml.safe_load((tmp_path / "runs/tiny/csv/version_1/config.yaml").read_text())["trainer"]["logger"]
    assert [logger["init_args"]["save_dir"] for logger in resaved] == [str(root), str(root)]
    assert not (tmp_path / "runs" / "tiny" / "runs").exists()
    wandb.finish()  # Lightning leaves the run open; the next test's logger would reuse it


def test_a_command_from_another_folder_shows_progress_lines_and_no_library_noise(tmp_path):
    """`python -m lit_rlhf fit --config configs/...` from a folder that has no configs/: the file is
    read from the repository. stdout is a pipe here (as under nohup or CI): progress comes as lines.
    The litlogger tip, the pytree/set_vital deprecations and W&B's 'anonymous' warning are gone."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lit_rlhf",
            "fit",
            "--config",
            "configs/tinygpt/pretrain.yaml",
            *TINY_RUN,
            "--trainer.default_root_dir",
            "runs/tiny",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[lit_rlhf] step 1/2 | " in result.stdout and "train/loss" in result.stdout
    assert "[lit_rlhf] training done: step 2" in result.stdout
    output = result.stdout + result.stderr
    for noise in ("litlogger", "anonymous setting", "LeafSpec", "set_vital"):
        assert noise not in output
    assert list((tmp_path / "runs/tiny/wandb").glob("offline-run-*"))


class ScoredModel(BoringModel):
    """Logs what an online-RL iteration logs."""

    def training_step(self, batch, batch_idx):
        self.log_dict({"objective/scores": -1.0 + batch_idx, "objective/kl": 0.25})
        return super().training_step(batch, batch_idx)


def fit_boring(tmp_path, callback, **trainer_args):
    trainer = Trainer(
        default_root_dir=tmp_path,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **trainer_args,
    )
    trainer.fit(ScoredModel())
    return trainer


def test_progress_lines_when_stdout_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    fit_boring(tmp_path, ProgressLines(every_s=0), max_epochs=2, limit_train_batches=3, enable_progress_bar=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[lit_rlhf] epoch")]
    assert len(lines) == 6 and lines[0].startswith("[lit_rlhf] epoch 1/2, batch 1/3, step 1 | ")
    assert " s/batch | elapsed " in lines[0] and "| ETA " in lines[0]
    assert "objective/scores -1 | objective/kl 0.25" in lines[0]
    assert lines[-1].startswith("[lit_rlhf] epoch 2/2, batch 3/3, step 6 | ")
    fit_boring(tmp_path, ProgressLines(every_s=3600), max_steps=4, limit_train_batches=3, enable_progress_bar=False)
    lines = [line[:24] for line in capsys.readouterr().out.splitlines()]
    assert lines == ["[lit_rlhf] step 1/4 | 0.", "[lit_rlhf] training done"]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal has its progress bar
    fit_boring(tmp_path, ProgressLines(every_s=0), max_steps=2, enable_progress_bar=False)
    assert "[lit_rlhf]" not in capsys.readouterr().out


def test_the_progress_bar_counts_steps_when_max_steps_ends_the_run(tmp_path):
    bar = StepsProgressBar()
    fit_boring(tmp_path, bar, max_steps=3, limit_train_batches=5)
    assert bar._get_train_description(0) == "Step 3/3"  # Lightning's own label: "Epoch 0/-2"
    bar = StepsProgressBar()
    fit_boring(tmp_path, bar, max_epochs=2, limit_train_batches=2)
    assert bar._get_train_description(1).strip() == "Epoch 1/1"


def test_configs_are_found_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for args in (
        ["--config", "configs/rlhf/ppo.yaml"],
        ["--config", "rlhf/ppo.yaml"],
        ["--config=configs/rlhf/ppo.yaml", "-c", "configs/cpu/ppo.yaml"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *args, "--print_config"])
        assert exit_info.value.code in (0, None)
    with pytest.raises(SystemExit):
        evaluate.main(["--config", "configs/rlhf/evaluate.yaml", "--print_config"])
    assert "reward_model: runs/reward_model/reward_model" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/no_such_stage.yaml"])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--config: File does not exist" in err and "configs/rlhf/ppo.yaml" in err


def test_the_pipeline_commands_parse_from_another_folder(tmp_path, monkeypatch, capsys):
    """Every stage command the pipeline runs resolves its configs when started outside the repository."""
    monkeypatch.chdir(tmp_path)
    namespace = pipeline.argparse.Namespace(
        root=Path("runs/rlhf"),
        setting="quickstart",
        model=None,
        prompt_data=None,
        preference_data=None,
        eval_prompts=None,
        seed=0,
        stages=list(pipeline.STAGES),
    )
    for stage in pipeline.plan(namespace):
        module, *args = stage.command
        if module in ("lit_rlhf", "lit_rlhf.evaluate"):
            with pytest.raises(SystemExit) as exit_info:
                (main if module == "lit_rlhf" else evaluate.main)([*args, "--print_config"])
            assert exit_info.value.code in (0, None), (stage.name, capsys.readouterr().err)


def test_help_names_the_program_lists_the_configs_and_takes_short_class_names(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: lit_rlhf ") and "configs/rlhf/ppo.yaml" in out and "configs/cpu/" in out
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "PPOModule"])
    assert "--model.max_new_tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--data.help", "PromptsDataModule"])
    out = capsys.readouterr().out
    assert "every step's batch is the whole list" in out and "batches per epoch" in out  # the docstring renders


def test_every_human_ratings_option_has_a_description():
    from lit_rlhf.eval.human_ratings import build_parser

    assert all(action.help for action in build_parser()._actions)


def fake_evaluation(folder: Path) -> Path:
    """What the notebook reads from an evaluation folder."""
    folder.mkdir(parents=True)
    interval = {"mean": 0.1, "low": 0.0, "high": 0.2}
    summary = {
        "Pretrained": {"mean_reward": interval, "mean_length": 10.0, "repetition": 0.0},
        "PPO (LoRA)": {
            "mean_reward": interval,
            "reward_gain": interval,
            "win_rate": 0.5,
            "mean_length": 12.0,
            "repetition": 0.01,
        },
        "readings": ["PPO (LoRA): inside the band."],
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "rewards.csv").write_text("model,prompt_id,training_reward\nPretrained,0,0.1\nPPO (LoRA),0,0.2\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.plot([0, 1], [0, 1])
    plt.savefig(folder / "kl.png")
    plt.close()
    (folder / "human_ratings.md").write_text("#### PPO (LoRA)\n")
    return folder


def test_the_notebook_opens_the_folder_given_by_the_environment(tmp_path, monkeypatch):
    """LIT_RLHF_EVAL_DIR relative to where Jupyter was started (the kernel runs in notebooks/)."""
    fake_evaluation(tmp_path / "runs" / "rlhf" / "evaluation")
    monkeypatch.setenv("LIT_RLHF_EVAL_DIR", "runs/rlhf/evaluation")
    monkeypatch.setenv("PWD", str(tmp_path))
    notebook = nbformat.read(REPO / "notebooks" / "rlhf_report.ipynb", as_version=4)
    assert "LIT_RLHF_EVAL_DIR=runs/rlhf/evaluation jupyter execute" in notebook.cells[0].source
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    outputs = "".join(str(o) for cell in notebook.cells for o in cell.get("outputs", []))
    assert f"Evaluation folder: {tmp_path / 'runs/rlhf/evaluation'}" in outputs and "PPO (LoRA)" in outputs
    monkeypatch.setenv("LIT_RLHF_EVAL_DIR", str(tmp_path / "nowhere"))
    notebook = nbformat.read(REPO / "notebooks" / "rlhf_report.ipynb", as_version=4)
    with pytest.raises(Exception, match="No finished evaluation at .*Set LIT_RLHF_EVAL_DIR"):
        NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
