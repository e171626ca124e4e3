"""OpenAssistant (oasst1) prompter messages as PPO prompts, with held-out unseen evaluation prompts."""

import json
import random
from collections import Counter

from lightning.pytorch import LightningDataModule
from pydantic import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lit_rlhf.artifacts import reward_model_seen, write_eval_prompts
from lit_rlhf.data.loaders import resumable_loader
from lit_rlhf.data.oasst1 import conversation, read_oasst1_rows
from lit_rlhf.errors import UserInputError
from lit_rlhf.models.hf import DEFAULT_MODEL, load_tokenizer
from lit_rlhf.text import chat_prompt_ids, require_system_prompt_renders


def split_prompts(
    rows: list[dict],
    lang: str | None,
    num_train: int,
    num_eval: int,
    seed: int,
    follow_ups: bool = False,
    exclude_from_eval: dict[str, set[str]] | None = None,
    stats: Counter | None = None,
) -> tuple[list[dict], list[dict]]:
    """Prompter messages, language-filtered and de-duplicated, split by message tree.

    By default only ROOT prompter messages (`parent_id` null), the standalone questions: three in
    four oasst1 prompter messages are follow-up turns ("Ok thanks") that mean nothing without
    their conversation. With `follow_ups` they are kept WITH it: their `prompt` is the conversation
    from the root as chat messages (`[{"role", "content"}, ...]`, as the reward model's oasst1
    pairs have it); follow-ups whose history is missing from `rows` are left out.

    Evaluation trees are drawn first, so no train prompt shares a `message_tree_id` with an
    evaluation prompt; prompts in the trees or posts of `exclude_from_eval` (the reward model's
    `artifacts.reward_model_seen`) are never evaluation prompts, so they are unseen by the reward
    model too. Then `num_train` prompts are sampled from the remaining trees. Counts go to `stats`.
    """
    stats = stats if stats is not None else Counter()
    by_id = {row["message_id"]: row for row in rows}
    seen: set[str] = set()
    prompts = []
    for row in rows:
        text = (row.get("text") or "").strip()
        if row.get("role") != "prompter" or not text or (lang and row.get("lang") != lang):
            continue
        prompt = text
        if row.get("parent_id"):
            if not follow_ups:
                stats["follow-up turns left out"] += 1
                continue
            prompt = conversation(row, by_id)
            if prompt is None:
                stats["follow-up turns without their conversation left out"] += 1
                continue
        key = json.dumps(prompt, ensure_ascii=False)
        if key in seen:
            continue
        seen.add(key)
        prompts.append({"prompt": prompt, "message_id": row["message_id"], "message_tree_id": row["message_tree_id"]})
    if not prompts:
        raise UserInputError(
            f"No oasst1 prompter message is left after filtering (lang={lang!r}, follow_ups={follow_ups}). Check "
            "data.path and data.lang, or set data.follow_ups true when the rows hold no root prompts."
        )
    excluded = exclude_from_eval or {}
    trees_seen, posts_seen = excluded.get("message_tree_ids", set()), excluded.get("post_ids", set())

    def reward_model_saw(p: dict) -> bool:
        return p["message_tree_id"] in trees_seen or p["message_id"] in posts_seen

    stats["prompts the reward model saw, kept out of evaluation"] += sum(map(reward_model_saw, prompts))
    rng = random.Random(seed)
    trees = sorted({p["message_tree_id"] for p in prompts})
    rng.shuffle(trees)
    by_tree: dict[str, list[dict]] = {}
    for p in prompts:
        by_tree.setdefault(p["message_tree_id"], []).append(p)
    eval_prompts: list[dict] = []
    eval_trees = set()
    for tree in trees:
        if len(eval_prompts) >= num_eval:
            break
        unseen = [p for p in by_tree[tree] if not reward_model_saw(p)]
        if unseen:
            eval_trees.add(tree)
            eval_prompts.extend(unseen)
    eval_prompts = eval_prompts[:num_eval]
    train_pool = [p for p in prompts if p["message_tree_id"] not in eval_trees]
    if not train_pool:
        raise UserInputError("All oasst1 prompts went to evaluation; lower num_eval_prompts or add data.")
    train_prompts = rng.sample(train_pool, min(num_train, len(train_pool)))
    return train_prompts, eval_prompts


class OASST1PromptDataModule(LightningDataModule):
    """Batches of chat-templated prompt ids (left-padded by the PPO module) and their prompts.

    Args:
        path: hub id `OpenAssistant/oasst1` or a local JSONL/parquet file or folder of message rows.
        follow_ups: also use follow-up prompter turns, each with its conversation so far as the
            prompt (a list of chat messages); default: only the root prompts (see `split_prompts`).
        reward_model_path: the reward-model export PPO scores with (linked from
            `model.init_args.reward_model_path` by the CLI); evaluation prompts leave out the
            message trees and posts it trained and validated on.
        num_train_prompts: sampled with `seed` (task: 2 000); fewer if the data has fewer.
        num_eval_prompts: unseen prompts (disjoint message trees) written to
            `<default_root_dir>/eval_prompts.jsonl` for the evaluation stage.
        max_prompt_length: longer prompts lose their oldest turns, then the start of their user
            text (template kept).
        system_prompt: the policy's system instruction (linked from `model.init_args.system_prompt`
            by the CLI), put in front of every training prompt; None keeps the template's default.
    """

    def __init__(
        self,
        path: str = "OpenAssistant/oasst1",
        tokenizer_name_or_path: str = DEFAULT_MODEL,
        lang: str | None = "en",
        follow_ups: bool = False,
        reward_model_path: str | None = None,
        num_train_prompts: PositiveInt = 2000,
        num_eval_prompts: NonNegativeInt = 64,
        max_prompt_length: PositiveInt = 256,
        batch_size: PositiveInt = 64,
        seed: int = 0,
        num_workers: NonNegativeInt = 0,
        system_prompt: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        rows = read_oasst1_rows(hp.path)
        seen = reward_model_seen(hp.reward_model_path) if hp.reward_model_path else None
        stats = Counter()
        train, evaluation = split_prompts(
            rows, hp.lang, hp.num_train_prompts, hp.num_eval_prompts, hp.seed, hp.follow_ups, seen, stats
        )
        tokenizer = load_tokenizer(hp.tokenizer_name_or_path)
        require_system_prompt_renders(tokenizer, hp.system_prompt)
        truncated = 0
        for prompt in tqdm(train, desc="tokenizing prompts", leave=False):
            prompt["input_ids"], kept = chat_prompt_ids(
                tokenizer, prompt["prompt"], hp.max_prompt_length, hp.system_prompt
            )
            truncated += kept != prompt["prompt"]
            prompt["prompt"] = kept
        kind = "root prompts and follow-ups with their conversation" if hp.follow_ups else "root prompts only"
        counts = "; ".join(f"{n} {what}" for what, n in stats.items())
        print(
            f"[lit_rlhf] oasst1 prompts ({kind}): {len(train)} train, {len(evaluation)} unseen eval "
            f"({truncated} train prompts cut from the left to {hp.max_prompt_length} tokens); {counts}."
        )
        if len(evaluation) < hp.num_eval_prompts:
            print(
                f"[lit_rlhf] warning: only {len(evaluation)} of the {hp.num_eval_prompts} evaluation prompts asked for "
                "come from message trees that neither PPO training nor the reward model saw. Add prompt data "
                "(data.path), keep more trees out of the reward model's training, or set data.follow_ups true."
            )
        self.train_prompts, self.eval_prompts = train, evaluation
        if self.trainer is not None and self.trainer.is_global_zero:
            write_eval_prompts(self.eval_prompts, self.trainer.default_root_dir)

    @staticmethod
    def collate(items: list[dict]) -> dict:
        return {"prompt": [i["prompt"] for i in items], "input_ids": [i["input_ids"] for i in items]}

    def train_dataloader(self) -> DataLoader:
        return resumable_loader(
            self.train_prompts,
            batch_size=self.hparams.batch_size,
            drop_last=len(self.train_prompts) >= self.hparams.batch_size,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
        )
