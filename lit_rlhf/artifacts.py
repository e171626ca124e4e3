"""What each stage leaves behind and what later stages read from it.

The reward-model export carries `lit_rlhf_export.json` beside its weights: how it must be scored
(the settings it was trained with) and which message trees / post ids it trained and validated on
(so later stages keep their "unseen" prompts unseen).
"""

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from lit_rlhf.errors import UserInputError

# The folders and files a stage leaves in its run folder (trainer.default_root_dir), named once here.
REWARD_MODEL = "reward_model"  # the reward-model stage's export (HF folder)
POLICY = "policy"  # a fully fine-tuned policy (HF folder): PPO, GRPO, RLOO, DPO
POLICY_ADAPTER = "policy_adapter"  # a LoRA policy (peft folder)
EVAL_PROMPTS = "eval_prompts.jsonl"  # the unseen prompts an online run held out
REWARD_MODEL_INFO = "lit_rlhf_export.json"  # the export record, in reward-model and policy folders
# The scoring settings of exports that predate the record (the old defaults of PPO and evaluate).
LEGACY_SCORING = {"max_length": 512, "min_prompt_tokens": 64}


def reward_model_info(folder: str | Path) -> dict:
    """The export record of a reward-model folder ({} when there is none, e.g. a hub model)."""
    file = Path(folder) / REWARD_MODEL_INFO
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def policy_info(folder: str | Path) -> dict:
    """The export record of a policy folder: `{"system_prompt": ...}` ({} for exports without one)."""
    return reward_model_info(folder)


def reward_model_scoring(folder: str | Path) -> dict:
    """`{max_length, min_prompt_tokens}` the reward model was trained with."""
    return {**LEGACY_SCORING, **reward_model_info(folder).get("scoring", {})}


def reward_model_seen(folder: str | Path) -> dict[str, set[str]]:
    """`{"message_tree_ids": set, "post_ids": set}` of the pairs the reward model trained and validated on."""
    seen = reward_model_info(folder).get("trained_on", {})
    return {key: set(seen.get(key, [])) for key in ("message_tree_ids", "post_ids")}


def save_folder_atomically(folder: Path, save: Callable[[Path], None], keep_existing: bool = False) -> None:
    """`save(staging)` writes a folder next to its destination, which then replaces the old one by a
    rename: a crash leaves the previous folder or none, never a half-written one. `keep_existing`: a
    folder another process finished meanwhile stays (a cache two runs may fill at once)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; other runs and users read the export
    try:
        save(staging)
        if folder.exists() and keep_existing:
            return
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}-old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
            shutil.rmtree(old)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_file_atomically(file: str | Path, save: Callable[[Path], None]) -> None:
    """`save(temporary)` writes a file beside `file` (same filesystem), renamed onto it once complete:
    a crash or an error leaves the previous file or none, never a half-written one."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    temporary = file.with_name(f".{file.name}.{uuid.uuid4().hex}.tmp")
    try:
        save(temporary)
        os.replace(temporary, file)
    finally:
        temporary.unlink(missing_ok=True)


def write_jsonl(rows: Iterable[dict], file: str | Path) -> Path:
    """One JSON object a line (UTF-8, non-ASCII kept as is), written atomically."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    save_file_atomically(file, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return Path(file)


def write_eval_prompts(prompts: Iterable[dict], folder: str | Path) -> Path:
    """`<folder>/eval_prompts.jsonl`: the unseen prompts the evaluation stage answers (written by the
    `pairs` stage and by every online RL run for the prompts it held out)."""
    return write_jsonl(prompts, Path(folder) / EVAL_PROMPTS)


def read_eval_prompts(path: str | Path) -> list[dict]:
    """The unseen evaluation prompts a PPO run wrote (a run folder or the JSONL itself)."""
    path = Path(path)
    file = path / EVAL_PROMPTS if path.is_dir() else path
    if not file.exists():
        raise UserInputError(f"No evaluation prompts at '{file}'. Run the PPO stage first (it writes them).")
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def export_policy(policy, tokenizer, root: Path, lora: bool, record: dict | None = None) -> Path:
    """A trained policy -> `<root>/policy` (HF folder), or `<root>/policy_adapter` (peft folder) for
    LoRA, with `record` (e.g. its system instruction, `policy_info`) as `lit_rlhf_export.json`."""
    folder = Path(root) / (POLICY_ADAPTER if lora else POLICY)

    def save(staging: Path) -> None:
        policy.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if record:
            (staging / REWARD_MODEL_INFO).write_text(json.dumps(record, indent=2), encoding="utf-8")

    save_folder_atomically(folder, save)
    return folder
