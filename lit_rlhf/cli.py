"""`python -m lit_rlhf {fit,validate,test,predict} --config configs/<project>/<method>.yaml`.

LightningCLI in subclass mode: each YAML picks its LightningModule and LightningDataModule by
`class_path`. Optimizers are arguments of the modules (callables settable from YAML), so modules
with several optimizers or manual optimization configure them the same way as the others.
"""

import difflib
import importlib
import inspect
import logging
import os
import pkgutil
import re
import shutil
import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from pathlib import Path

import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from lit_rlhf.callbacks import LogLastStep, ProgressLines, RandomStatePerRank, StepsProgressBar
from lit_rlhf.errors import UserInputError, as_paragraph, not_a_checkpoint_file
from lit_rlhf.tracking import wandb_mode

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# configs/<project>/<method>.yaml are the base configs; every other folder of configs/ holds overrides.
PROJECTS = ("rlhf", "tinygpt", "dcgan")
PROG = "lit_rlhf"
# bf16 autocast on a CPU, against 32-true: measured on SmolLM2-135M forward+backward steps (2 x86 cores).
CPU_BF16_SLOWDOWN = "~6x"

# Loggers / callbacks whose output folder is placed under trainer.default_root_dir.
_DIR_ARGS = {"save_dir", "dirpath"}


def _under_root(value: str | None, root: Path) -> str:
    if value in (None, "", "."):
        return str(root)
    path = Path(value).expanduser()
    if path.is_absolute() or path == root or root in path.parents:  # already placed (a saved config run again)
        return str(path)
    return str(root / path)


def place_outputs_under_root(trainer_cfg) -> None:
    """Point every logger `save_dir` and checkpoint `dirpath` at (or under) `default_root_dir`.

    A relative folder in a YAML is read relative to the run folder, so one run writes all its
    files (checkpoints, metrics.csv, W&B offline files in `<root>/wandb`) in one place. Each W&B
    logger gets W&B's mode explicitly (`lit_rlhf.tracking.wandb_mode`): offline, or WANDB_MODE when set.
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
            keys = {key for key in _DIR_ARGS if key in init_args}
            if entry.class_path.endswith("WandbLogger"):  # without a save_dir, W&B writes to ./wandb
                keys.add("save_dir")
                mode = wandb_mode(init_args.get("offline", False))
                if mode == "online":  # the user's WANDB_MODE over the configs' offline: true
                    init_args["offline"] = False
                # passed on to wandb.init: Lightning's offline flag alone no longer keeps wandb offline
                entry["dict_kwargs"] = {**(entry.get("dict_kwargs") or {}), "mode": mode}
            for key in keys:
                init_args[key] = _under_root(init_args.get(key), root)


def resolve_config_args(args: list[str]) -> list[str]:
    """`--config X` where X is missing from the current folder but exists in the repository (as
    `X` or `configs/X`): the repository's file, so the README's commands work from any folder."""
    resolved, expect_config = [], False
    for arg in args:
        prefix, value = "", arg
        if arg.startswith("--config="):
            prefix, value = "--config=", arg.removeprefix("--config=")
        if expect_config or prefix:
            path = Path(value).expanduser()
            if not path.exists() and not path.is_absolute():
                value = str(next((c for c in (REPO / path, CONFIGS / path) if c.is_file()), value))
        resolved.append(prefix + value)
        expect_config = arg in ("--config", "-c")
    return resolved


def stage_configs() -> list[str]:
    """Each method's base config (the evaluation's has its own command)."""
    return sorted(
        f"configs/{project}/{p.name}"
        for project in PROJECTS
        for p in (CONFIGS / project).glob("*.yaml")
        if p.name != "evaluate.yaml"
    )


def override_folders() -> list[str]:
    return sorted(f"{p.relative_to(REPO)}/" for p in CONFIGS.rglob("*") if p.is_dir() and p.name not in PROJECTS)


def _description() -> str:
    overrides = override_folders()
    return (
        f"Train, validate, test or predict with one stage of lit_rlhf:\n\n"
        f"  {PROG} fit --config configs/<project>/<method>.yaml [--config configs/<override>.yaml] "
        "[--trainer.max_steps 100]\n\n"
        "Stage configs (each file's header says what it is for and how to run it small):\n  "
        + "\n  ".join(stage_configs())
        + "\nOverrides, stacked after a stage's config (the later file wins):\n  "
        + "\n  ".join(overrides)
        + f"\n\nA --config path that does not exist from the current folder is read from '{REPO}'.\n"
        f"Options of a module or data module: {PROG} fit --model.help PPOModule, --data.help PreferenceDataModule.\n"
        "The evaluation is python -m lit_rlhf.evaluate; the whole RLHF pipeline python -m lit_rlhf.pipeline."
    )


_KEY = re.compile(r'Parser key "([^"]+)"')
VALUE_PATTERNS = (r"input_value='([^']*)'", r"Got value: (.*)", r"val='([^']*)'", r"Given value: (.*)")
_NOISE = (
    "Does not validate against",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
    "validation error for",
    "For further information",
    "Problem with given class_path",
)


def _expected(line: str) -> str:
    """ "Expected a <class 'int'>" -> "an int"; "Expected a typing.Literal['a', 'b']" -> "one of 'a', 'b'"."""
    what = re.sub(r"<class '(\w+)'>", r"\1", line.split(". Got value:")[0].removeprefix("Expected a "))
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", what)
    return f"one of {literal.group(1)}" if literal else f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


def one_line_parse_error(message: str) -> str:
    """jsonargparse's nested report ('Parser key "data": Does not validate against any of the Union
    subtypes ... Parser key "batch_size": ...') as '--data.batch_size -4: must be greater than 0.'"""
    keys = [key for key in _KEY.findall(message) if key != "init_args"]
    if not keys:
        return " ".join(message.split()).rstrip(".") + "."
    first, *tail = message[message.rindex('Parser key "') :].splitlines()
    details = [line.strip().removeprefix("- ") for line in [first.split('":', 1)[1], *tail] if line.strip()]
    useful = [line for line in details if not any(noise in line for noise in _NOISE)] or ["invalid value"]
    if any("dot import path" in line for line in useful):
        detail = "no such class: give a class name such as PPOModule, an import path or a YAML file"
    elif all(line.startswith("Expected a") for line in useful):
        detail = "must be " + " or ".join(_expected(line) for line in useful)
    else:
        detail = re.sub(r"\s*\[type=.*?\]", "", useful[0]).split(". Got value:")[0].rstrip(".")
        detail = detail.replace("Input should be", "must be")
        bound = re.search(r"\b(?:Gt|Ge|Lt|Le)\((?:gt|ge|lt|le)=([^)]+)\)", message)
        if bound and re.search(r"(than|equal to)$", detail):  # in a union, jsonargparse drops the bound from the text
            detail = f"{detail} {bound.group(1)}"
    nested = re.search(r"NestedArg\(key='([^']*)'", message)  # --model.bogus: the report names only "model"
    if nested and nested.group(1) != keys[-1]:
        keys.append(nested.group(1))
    if keys == ["config"]:
        detail += f", nor under the repository's configs/ ('{CONFIGS}'), which has: {', '.join(stage_configs())}"
    values = (re.search(pattern, message) for pattern in VALUE_PATTERNS)
    shown = next((value.group(1) for value in values if value), "")
    return f"--{'.'.join(keys)} {shown}: {detail}.".replace(" :", ":")


class KeepLinesFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Descriptions keep their lines (the config list, docstring examples)."""


_UNKNOWN = re.compile(r"Option '([^']+)' is not accepted")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: --(\S+?)=(\S*)")
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_NESTED = re.compile(r"NestedArg\(key='([^']*)', val='([^']*)'\)")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_NUMERIC = ("lr", "weight_decay", "eps", "momentum")  # optimizer arguments that take a number


def _init_parameters(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        init = getattr(importlib.import_module(module), name).__init__
    except (ImportError, AttributeError, ValueError):
        return []
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in inspect.signature(init).parameters.values() if p.name != "self" and p.kind not in kinds]


def _files_setting(option: str, args: list[str]) -> list[str]:
    """The --config files of this command in which `option:` is written."""
    files = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("--config", "-c")]
    files += [arg.removeprefix("--config=") for arg in args if arg.startswith("--config=")]
    line = re.compile(rf"^\s*{re.escape(option)}\s*:", re.MULTILINE)
    return [f for f in files if Path(f).is_file() and line.search(Path(f).read_text(encoding="utf-8"))]


def unknown_option_hint(message: str, args: list[str]) -> str | None:
    """An option the chosen class does not take: where it came from and what was probably meant
    ('--data.max_lenght' in a config file -> that file and 'max_length'; '--model.lr' -> the optimizer's lr)."""
    group = next((key for key in _KEY.findall(message) if key != "init_args"), "model")
    class_path = _CLASS_PATH.search(message)
    params = _init_parameters(class_path.group(1)) if class_path else []
    given = _NESTED.search(message) or _UNRECOGNIZED.search(message)
    if given and given.group(1).rsplit(".", 1)[-1] in _NUMERIC and not _is_number(given.group(2)):
        # --model.optimizer.init_args.lr fast: jsonargparse reports an unknown argument or a missing class
        return f"--{group}.{given.group(1)} {given.group(2)}: must be a number, e.g. 3e-4."
    if _UNRECOGNIZED.search(message):
        return None
    unknown = _UNKNOWN.search(message)
    if not unknown:
        return None
    option = unknown.group(1)
    name = class_path.group(1).rsplit(".", 1)[-1] if class_path else group
    where = _files_setting(option, args)
    source = f" (set in {', '.join(where)})" if where else ""
    optimizers = [p for p in params if p.endswith("optimizer")]  # optimizer, or policy_/value_optimizer
    if option in ("lr", "learning_rate") and optimizers:
        where_lr = " or ".join(f"--{group}.{opt}.init_args.lr" for opt in optimizers)
        fix = f"the learning rate is an argument of the optimizer: {where_lr} (e.g. 3e-4)"
    else:
        close = difflib.get_close_matches(option, params, n=1, cutoff=0.6)
        fix = f"did you mean --{group}.{close[0]}?" if close else f"its options: `{PROG} fit --{group}.help {name}`."
    nested = _NESTED.search(message)
    value = f" {nested.group(2)}" if nested and nested.group(1) == option and not where else ""
    return f"--{group}.{option}{value}{source}: {name} has no option '{option}'; {fix}"


class LitRLHFParser(LightningArgumentParser):
    """A bad option ends in one paragraph naming it, not the 200-line usage before a nested report."""

    args: list[str] = []  # the command line being parsed (set by `main`), to name the config file of a bad key

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("prog", PROG)  # jsonargparse builds `--model.help`'s parser without one: '__main__.py'
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if self.exit_on_error and not os.environ.get("JSONARGPARSE_DEBUG"):
            prog = self.prog.replace(" [options]", "")
            explained = unknown_option_hint(message, LitRLHFParser.args) or one_line_parse_error(message)
            print(as_paragraph(UserInputError(f"{explained} See `{prog} --help`.")), file=sys.stderr)
            sys.exit(2)
        super().error(message, ex)


class LitRLHFCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_class=LitRLHFParser,
            parser_kwargs={"prog": PROG, "description": _description()},
            trainer_defaults={
                "callbacks": [RandomStatePerRank(), ProgressLines(), LogLastStep()],
                # checkpoints streamed to disk: Lightning's own save first builds them in memory
                "plugins": [{"class_path": "lit_rlhf.checkpoint_io.StreamingCheckpointIO"}],
            },
            args=args,
            run=run,
        )

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        return super().init_parser(formatter_class=KeepLinesFormatter, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # PPO's data module keeps the reward model's training trees out of its evaluation prompts.
        parser.link_arguments("model.init_args.reward_model_path", "data.init_args.reward_model_path")
        # Text data is tokenized by the model's own tokenizer: one setting, never two that must match.
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")
        # The policy's system instruction: the prompts it trains on carry the one its export records.
        parser.link_arguments("model.init_args.system_prompt", "data.init_args.system_prompt")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        place_outputs_under_root(config.trainer)
        check_accelerator(
            config.trainer.accelerator, config.trainer.precision, config.trainer.devices, config.trainer.strategy
        )
        check_ckpt_path(config.get("ckpt_path"))
        if self.subcommand == "fit":
            check_trains_something(config.trainer)
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else []
        if any(str(getattr(logger, "class_path", "")).endswith("WandbLogger") for logger in loggers):
            import wandb

            wandb.setup()  # W&B applies WANDB_SILENT here, before WandbLogger's anonymous=None is validated

    def instantiate_trainer(self, **kwargs):
        """Lightning's Rich bar, labelled by steps when `max_steps` ends the run (see StepsProgressBar)."""
        trainer = self._get(self.config_init, "trainer", default={})
        bars = [c for c in trainer.get("callbacks") or [] if isinstance(c, ProgressBar)]
        if _RICH_AVAILABLE and trainer.get("enable_progress_bar") is not False and not bars:
            callbacks = [*self.trainer_defaults["callbacks"], StepsProgressBar()]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": callbacks}
        return super().instantiate_trainer(**kwargs)

    def _check_ckpt_path(self) -> None:
        """`--ckpt_path last` with no last checkpoint would start from scratch without a word (Lightning
        only warns); a fresh start is the user's call."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path == "last":
            callbacks = [c for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
            if not any(c._find_last_checkpoints(self.trainer) for c in callbacks):
                folders = sorted({str(c.dirpath or self.trainer.default_root_dir) for c in callbacks})
                raise UserInputError(
                    f"--ckpt_path last: there is no last checkpoint in {folders or 'this run (no ModelCheckpoint)'}, "
                    "so nothing can be resumed. Check --trainer.default_root_dir (now "
                    f"'{self.trainer.default_root_dir}'), pass a checkpoint file with --ckpt_path <file>, or leave "
                    "--ckpt_path out to start from scratch."
                )

    before_fit = before_validate = before_test = before_predict = _check_ckpt_path

    def _run_subcommand(self, subcommand: str) -> None:
        """Bad input found once the run started (a data path, an empty dataset) leaves no run behind:
        Lightning creates `csv/version_N` and the offline W&B run before the data module's `setup`,
        and `wandb sync runs/*/wandb/offline-run-*` would upload the debris."""
        root = Path(self.trainer.default_root_dir)
        before = set(root.rglob("*")) if root.exists() else None
        try:
            super()._run_subcommand(subcommand)
        except UserInputError:
            if self.trainer.global_step == 0 and self.trainer.is_global_zero:
                remove_new_outputs(root, before)
            raise


def remove_new_outputs(root: Path, before: set[Path] | None) -> None:
    """Delete what a run that stopped on bad input created under `root` (all of it if `root` is new)."""
    import wandb

    if wandb.run is not None:
        wandb.finish()  # the offline run's files are closed before they go
    if before is None:
        shutil.rmtree(root, ignore_errors=True)
        return
    for path in sorted(set(root.rglob("*")) - before, key=lambda p: len(p.parts)):
        if path.parent in before or path.parent == root:  # the outermost new paths only
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(True)


def check_accelerator(accelerator, precision, devices=None, strategy=None) -> None:
    """A GPU asked for on a machine without one, fp16 or more processes than cores on a CPU: one
    paragraph each. bf16 on a CPU: one warning line."""
    name = str(accelerator).lower()
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        build = (
            f"a CPU-only build of torch {torch.__version__}"
            if torch.version.cuda is None
            else f"torch {torch.__version__} built for CUDA {torch.version.cuda}, but no device is visible: "
            "check nvidia-smi and CUDA_VISIBLE_DEVICES"
        )
        raise UserInputError(
            f"--trainer.accelerator {accelerator}: PyTorch finds no CUDA GPU on this machine ({build}). To run on "
            "the CPU pass --trainer.accelerator cpu --trainer.precision 32-true and leave out GPU overrides such "
            "as configs/scale/*.yaml; the small CPU settings of each stage are in configs/cpu/ and the configs' "
            "headers."
        )
    no_gpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    on_cpu = name == "cpu" or name == "auto" and no_gpu
    if not on_cpu:
        return
    if str(precision).startswith("16"):  # Lightning would silently train in bf16-mixed instead
        raise UserInputError(
            f"--trainer.precision {precision}: fp16 mixed precision needs a CUDA GPU; on a CPU Lightning silently "
            f"switches to bf16-mixed, which runs {CPU_BF16_SLOWDOWN} slower than 32-true here. Use --trainer.precision "
            "32-true on a CPU (bf16-mixed or 16-mixed on a GPU node)."
        )
    processes = int(devices) if str(devices).lstrip("-").isdigit() else 1
    cores = os.cpu_count() or 1
    if processes > cores:
        raise UserInputError(
            f"--trainer.devices {devices}: {processes} CPU processes ({strategy or 'auto'} strategy) on a machine "
            f"with {cores} cores would each get less than a core and run slower than one process. Use "
            f"--trainer.devices 1 on a CPU (or at most {cores}); multi-process training is for GPU nodes "
            "(configs/scale/)."
        )
    if str(precision).startswith("bf16") and rank_zero_only.rank == 0:
        print(
            f"[lit_rlhf] warning: trainer.precision {precision} on a CPU runs {CPU_BF16_SLOWDOWN} slower than "
            "32-true (bf16 autocast, measured on SmolLM2 steps): use --trainer.precision 32-true on CPUs.",
            file=sys.stderr,
        )


def check_trains_something(trainer_cfg) -> None:
    """`fit` with max_steps 0, max_epochs 0 or no training batch would run no optimizer step and
    still export the untrained model (a random reward head that PPO would accept)."""
    zero = [
        f"--trainer.{key} {value}"
        for key in ("max_steps", "max_epochs", "limit_train_batches")
        if (value := trainer_cfg.get(key)) is not None and value == 0
    ]
    if zero:
        raise UserInputError(
            f"{', '.join(zero)}: this run would take no optimizer step, and its stage would still export an "
            "untrained model. Give a positive value (--trainer.max_steps -1 lets max_epochs end the run), or use "
            "`validate`/`test` to measure a model without training it."
        )


def check_ckpt_path(ckpt_path) -> None:
    """A --ckpt_path file that does not exist, checked before any logger creates a run folder."""
    if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry") or "://" in str(ckpt_path):
        return
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        raise not_a_checkpoint_file(ckpt_path, "--ckpt_path")
    if not path.exists():
        raise UserInputError(
            f"--ckpt_path '{ckpt_path}' does not exist (resolved to '{path.resolve()}'). Pass an existing checkpoint "
            "file (e.g. <run folder>/checkpoints/last.ckpt), --ckpt_path last to resume the run in "
            "--trainer.default_root_dir, or leave --ckpt_path out to start from scratch."
        )


def _no_litlogger_tip(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def silence_library_noise() -> None:
    """Messages every run printed that no setting of the user's can change: Lightning's litlogger tip,
    deprecations inside Lightning (pytree) and torchdata (set_vital), and (with WANDB_SILENT, applied
    by `wandb.setup()` in `LitRLHFCLI.before_instantiate_classes`) W&B's 'anonymous' warning about the
    anonymous=None that WandbLogger passes. Warnings about the user's own settings still show."""
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"'set_vital' is deprecated")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_litlogger_tip)


def import_stage_classes() -> None:
    """Import every module and data module, those of the side studies too, so short class names work
    (`--model PPOModule`, `--model.help PPOModule`): jsonargparse resolves them among imported subclasses."""
    import lit_rlhf.data
    import lit_rlhf.dcgan
    import lit_rlhf.modules
    import lit_rlhf.tinygpt

    for package in (lit_rlhf.modules, lit_rlhf.data, lit_rlhf.tinygpt, lit_rlhf.dcgan):
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")


def main(args=None) -> None:
    silence_library_noise()
    try:
        import_stage_classes()
        if args is None:  # LightningCLI warns when `args` is given beside a command line
            sys.argv[1:] = resolve_config_args(sys.argv[1:])
        LitRLHFParser.args = sys.argv[1:] if args is None else resolve_config_args(args)
        LitRLHFCLI(args=None if args is None else LitRLHFParser.args)
    except Exception as error:
        cause = error  # jsonargparse wraps errors raised in a module's __init__ in its own
        while cause is not None and not isinstance(cause, UserInputError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        print(as_paragraph(cause), file=sys.stderr)
        sys.exit(2)
