"""Pairwise preference data for the reward model: Stanford Human Preferences (SHP) and any
`prompt, chosen, rejected` files (e.g. oasst1 pairs from scripts/oasst1_to_pairs.py).

Every pair is rendered through the tokenizer's chat template (prompt = user turn(s), response =
assistant turn) exactly as the reward model, PPO and evaluation score text
(`lit_rlhf.text.encode_prompt_response`).
"""

import math
import re
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from pydantic import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from lit_rlhf.data.files import load_hub_dataset, read_local_tables
from lit_rlhf.data.loaders import EpochShuffle, resumable_loader
from lit_rlhf.data.preference_sources import check_sources, read_source, split_source
from lit_rlhf.data.splits import assign_splits
from lit_rlhf.errors import UserInputError, is_local_path
from lit_rlhf.tables import log_table, markdown_table, run_dir
from lit_rlhf.text import encode_prompt_responses, pad_sequences

SHP_HUB_ID = "stanfordnlp/SHP"
SHP_FIELDS = (
    "post_id",
    "domain",
    "upvote_ratio",
    "history",
    "c_root_id_A",
    "c_root_id_B",
    "created_at_utc_A",
    "created_at_utc_B",
    "score_A",
    "score_B",
    "human_ref_A",
    "human_ref_B",
    "labels",
    "seconds_difference",
    "score_ratio",
)
PAIR_FIELDS = ("prompt", "chosen", "rejected")
SPLITS = ("train", "validation", "test")
PREVIEW_COLUMNS = ["input_chosen", "input_rejected"]
_SPLIT_IN_NAME = re.compile(r"(?:^|[_\-.])(train|valid|validation|val|dev|test)(?:[_\-.]|$)")
_SPLIT_NAMES = {
    "train": "train",
    "valid": "validation",
    "validation": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


# ---------------------------------------------------------------------------------------------
# Reading


def _split_of(file: Path) -> str | None:
    match = _SPLIT_IN_NAME.search(file.stem.lower())
    return _SPLIT_NAMES[match.group(1)] if match else None


def read_preference_source(path: str):
    """`{split: datasets.Dataset}` from a hub id, or a local JSON/JSONL/parquet file or folder.

    Local split names come from the file names (`train.jsonl`, `askphysics/validation.json`, ...);
    files without one form the `train` pool, which is split by `post_id` later.
    """
    if not is_local_path(path):
        return dict(
            load_hub_dataset(
                path,
                "Pass a local copy with --data.path <file or folder> (JSON/JSONL/parquet with SHP's fields or "
                "with prompt, chosen, rejected columns), e.g. oasst1 pairs written by scripts/oasst1_to_pairs.py.",
            )
        )
    return read_local_tables(path, "data.path", split_of=lambda file: _split_of(file) or "train")


# ---------------------------------------------------------------------------------------------
# Normalising SHP and generic rows to one schema


def _shp_row(row: dict, margin_from_score_ratio: float) -> dict:
    a_preferred = int(row["labels"]) == 1
    ratio = float(row["score_ratio"])
    return {
        "prompt": row["history"],
        "chosen": row["human_ref_A"] if a_preferred else row["human_ref_B"],
        "rejected": row["human_ref_B"] if a_preferred else row["human_ref_A"],
        "post_id": str(row["post_id"]),
        "message_tree_id": "",
        "domain": re.sub(r"_(train|validation|test)$", "", str(row["domain"])),
        "score_ratio": ratio,
        "margin": margin_from_score_ratio * math.log(ratio),
    }


def _generic_row(row: dict) -> dict:
    prompt = row["prompt"]
    post_id = row.get("post_id")
    return {
        "prompt": prompt,
        "chosen": row["chosen"],
        "rejected": row["rejected"],
        # Without post ids, pairs of the same prompt stay together when splitting.
        "post_id": str(post_id) if post_id is not None else str(prompt),
        "message_tree_id": str(row.get("message_tree_id") or ""),
        "domain": str(row.get("domain") or ""),
        "score_ratio": float(row["score_ratio"]) if row.get("score_ratio") is not None else math.nan,
        "margin": float(row.get("margin") or 0.0),
    }


def missing_columns_error(columns, where: str) -> UserInputError:
    """The error for rows that are no preference pairs: where they are and the columns they lack."""
    columns = set(columns)
    shp_like = bool(columns & {"history", "human_ref_A", "human_ref_B", "labels"})
    schema, fields = ("SHP's", SHP_FIELDS) if shp_like else ("a pairs file's (prompt, chosen, rejected)", PAIR_FIELDS)
    return UserInputError(
        f"{where} has columns {sorted(columns)}, which are neither SHP's nor a generic preference file's: it lacks "
        f"the column(s) {[field for field in fields if field not in columns]} of {schema} rows. Rename the columns, "
        "or convert oasst1 message rows with scripts/oasst1_to_pairs.py."
    )


def normalise(dataset, path: str, margin_from_score_ratio: float = 0.0):
    """SHP rows or `prompt, chosen, rejected` rows -> prompt, chosen, rejected, post_id,
    message_tree_id ("" when the file has none), domain, score_ratio, margin (a per-pair margin for
    the loss; 0 unless asked for)."""
    columns = set(dataset.column_names)
    if set(SHP_FIELDS) <= columns:
        fn, kind = partial(_shp_row, margin_from_score_ratio=margin_from_score_ratio), "SHP"
    elif set(PAIR_FIELDS) <= columns:
        fn, kind = _generic_row, "prompt/chosen/rejected"
    else:
        raise missing_columns_error(columns, f"data.path '{path}'")
    return dataset.map(fn, remove_columns=dataset.column_names, desc=f"Reading {kind} pairs", keep_in_memory=True)


def normalise_row(row: dict, columns, where: str, margin_from_score_ratio: float = 0.0) -> dict:
    """`normalise` for one row of a file with these columns (the multi-source reader's)."""
    if set(SHP_FIELDS) <= set(columns):
        return _shp_row(row, margin_from_score_ratio)
    if set(PAIR_FIELDS) <= set(columns):
        return _generic_row(row)
    raise missing_columns_error(columns, where)


def has_user_turn(prompt) -> bool:
    """A string prompt, or chat messages with at least one user turn: what the chat template renders
    as a question (an empty list or assistant-only messages fail deep inside the template)."""
    if isinstance(prompt, str):
        return True
    return any(isinstance(m, dict) and m.get("role") == "user" for m in prompt or [])


# ---------------------------------------------------------------------------------------------
# Encoding pairs (the chat template and its truncation are `lit_rlhf.text`'s, shared with scoring)


CUT_FLAGS = ("prompt_cut", "prompt_over_max_length", "response_cut")


def _encode_row(row: dict, tokenizer, max_length: int, min_prompt_tokens: int) -> dict:
    # one prompt cut for the pair: both sides condition on identical prompt tokens (DPO's contract)
    (chosen, chosen_info), (rejected, rejected_info) = encode_prompt_responses(
        tokenizer, row["prompt"], [row["chosen"], row["rejected"]], max_length, min_prompt_tokens
    )
    return {
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        **{flag: chosen_info[flag] or rejected_info[flag] for flag in CUT_FLAGS},
        **{
            f"{side}_{key}": info[key]
            for side, info in (("chosen", chosen_info), ("rejected", rejected_info))
            for key in ("prompt_tokens", "untruncated_tokens")
        },
        # untruncated character lengths: the "longer reply wins" baseline and the test subsets
        "chosen_chars": len(str(row["chosen"])),
        "rejected_chars": len(str(row["rejected"])),
    }


LOADER_COLUMNS = [
    "chosen_ids",
    "rejected_ids",
    "margin",
    "weight",
    "score_ratio",
    "domain",
    "domain_id",
    "post_index",
    "chosen_prompt_tokens",
    "rejected_prompt_tokens",
    "chosen_chars",
    "rejected_chars",
]


def collate_pairs(items: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen then rejected sequences in ONE right-padded batch of 2B rows (one forward pass).

    Per row (chosen rows first): `prompt_tokens` (where the response starts) and `response_chars`
    (the untruncated reply's characters); per pair: `post_index` (the pair's post within its split,
    for intervals that resample a post's pairs together) and `domain` (its name, "" if none) with
    `domain_id` (its index).
    """
    sequences = [item["chosen_ids"] for item in items] + [item["rejected_ids"] for item in items]
    input_ids, attention_mask = pad_sequences(sequences, pad_token_id, side="right")
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "margin": torch.tensor([item["margin"] for item in items], dtype=torch.float32),
        "weight": torch.tensor([item["weight"] for item in items], dtype=torch.float32),
        "score_ratio": torch.tensor([item["score_ratio"] for item in items], dtype=torch.float32),
        "domain": [item["domain"] for item in items],
        "domain_id": torch.tensor([item["domain_id"] for item in items], dtype=torch.long),
        "post_index": torch.tensor([item["post_index"] for item in items], dtype=torch.long),
        "prompt_tokens": torch.tensor(
            [item["chosen_prompt_tokens"] for item in items] + [item["rejected_prompt_tokens"] for item in items]
        ),
        "response_chars": torch.tensor(
            [item["chosen_chars"] for item in items] + [item["rejected_chars"] for item in items]
        ),
    }


class PostGroupedShuffle(EpochShuffle):
    """An epoch shuffle that keeps each post's pairs next to each other, so a batch holds the
    comparisons of few prompts (InstructGPT's batching) and a reply that is in several of its pairs
    is scored once. Posts are shuffled from (seed, epoch); with `lengths`, each window of
    `group_posts` posts is sorted by its posts' longest pair (little padding). The order is cut into
    batches whose full ones are shuffled, the short remainder last, as in `LengthGroupedShuffle`.
    """

    def __init__(
        self,
        data_source,
        seed: int,
        posts: list,
        batch_size: int,
        lengths: list[int] | None = None,
        group_posts: int = 100,
    ):
        super().__init__(data_source, seed)
        self.batch_size, self.group_posts = batch_size, group_posts
        by_post: dict = {}
        for index, post in enumerate(posts):
            by_post.setdefault(post, []).append(index)
        self.posts = list(by_post.values())
        self.longest = [max(lengths[i] for i in pairs) for pairs in self.posts] if lengths is not None else None

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.posts), generator=generator).tolist()
        if self.longest is not None:
            windows = [order[i : i + self.group_posts] for i in range(0, len(order), self.group_posts)]
            order = [post for window in windows for post in sorted(window, key=lambda p: -self.longest[p])]
        indices = torch.tensor([i for post in order for i in self.posts[post]], dtype=torch.long)
        batches = list(indices.split(self.batch_size))
        full = [b for b in batches if len(b) == self.batch_size]
        rest = [b for b in batches if len(b) < self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator)] + rest
        yield from torch.cat(shuffled).tolist() if shuffled else []


# ---------------------------------------------------------------------------------------------
# The data module


class PreferenceDataModule(LightningDataModule):
    """Preference pairs for `RewardModel`: SHP (hub or local copy) or `prompt, chosen, rejected` files,
    from one `path` or from several `sources` at once.

    The schema is detected from the columns: SHP's fields (`labels` = 1 means A preferred), or
    `prompt` (a string, or chat messages), `chosen`, `rejected` with optional `post_id`, `domain`,
    `score_ratio`, `margin`. Pipeline, with a count printed for every skip:

    1. splits: the source's own train/validation/test when present; missing ones are cut from the
       train pool by a seeded split of `post_id` (no post in two splits). With `sources`, each source
       is split on its own, by conversation (message tree, else first user turn), and each row
       keeps its source's name as `domain`, so the test reports every metric per source;
    2. filters: `domains`, `score_ratio >= min_score_ratio` (when the data has score ratios),
       prompts without a user turn (an empty message list, assistant turns only: skipped),
       empty or identical responses (skipped), at most `max_pairs_per_post` per post (highest
       score ratio first), then seeded subsets of `max_train_pairs` / `max_eval_pairs`;
    3. encoding through the chat template, cut to `max_length` from the prompt's left
       (`encode_prompt_responses`, one prompt cut per pair); pairs identical after the cut are skipped;
    4. before training, a preview of `preview_rows` encoded pairs (`input_chosen | input_rejected`)
       to the console, W&B and `<run>/preprocessed_preview.md`.

    Args:
        path: hub id (default `stanfordnlp/SHP`) or a local file/folder.
        sources: several sources instead of `path`, each `{domain: name, path: file, folder or hub id,
            or a list of them}` (`$VARS` expanded): oasst1 message rows (their ranked pairs), SHP or
            `prompt, chosen, rejected` files. Two sources with one domain are refused.
        tokenizer_name_or_path: defaults to the reward model's tokenizer (`model.tokenizer`).
        margin_from_score_ratio: per-pair loss margin = this * log(score_ratio) (SHP only).
        group_by_length: training batches of pairs of similar length (less padding, same pairs
            per epoch; `LengthGroupedShuffle`). Validation/test batches keep the file order.
        balance_length: weight the training pairs (the loss's `weight`) so that those whose chosen
            reply is the shorter one (characters) weigh as much in total as those where it is the
            longer one: preferring the longer reply alone no longer lowers the loss.
        batch_by_post: training batches keep each post's pairs together (`PostGroupedShuffle`;
            with group_by_length, posts of similar length): fewer prompts and replies to score
            per batch, the same number of pairs per batch and per epoch.
    """

    def __init__(
        self,
        path: str = SHP_HUB_ID,
        sources: list[dict[str, Any]] | None = None,
        tokenizer_name_or_path: str | None = None,
        max_length: PositiveInt = 512,
        min_prompt_tokens: NonNegativeInt = 64,
        min_score_ratio: float | None = 2.0,
        max_pairs_per_post: int | None = None,
        domains: list[str] | None = None,
        max_train_pairs: int | None = None,
        max_eval_pairs: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        margin_from_score_ratio: float = 0.0,
        batch_size: PositiveInt = 8,
        eval_batch_size: PositiveInt | None = None,
        group_by_length: bool = True,
        batch_by_post: bool = False,
        balance_length: bool = False,
        num_workers: NonNegativeInt = 0,
        preview_rows: NonNegativeInt = 5,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.sources = check_sources(sources) if sources is not None else None
        if self.sources and path != SHP_HUB_ID:
            raise UserInputError(f"Set data.path ('{path}') or data.sources, not both: sources replace the path.")
        self.datasets: dict = {}
        self.length_stats: dict[str, dict] = {}
        self.domains: list[str] = []
        self.tokenizer = None

    # -- tokenizer ----------------------------------------------------------------------------

    def _tokenizer(self):
        if self.tokenizer is None:
            if self.hparams.tokenizer_name_or_path is not None:
                from lit_rlhf.models.hf import load_tokenizer

                self.tokenizer = load_tokenizer(self.hparams.tokenizer_name_or_path)
            else:
                module = self.trainer.lightning_module if self.trainer is not None else None
                self.tokenizer = getattr(module, "tokenizer", None)
                if self.tokenizer is None:
                    raise UserInputError(
                        "PreferenceDataModule needs a tokenizer: set data.tokenizer_name_or_path or use it with "
                        "a model that has a `tokenizer` (RewardModel)."
                    )
        return self.tokenizer

    # -- pipeline -----------------------------------------------------------------------------

    def _splits(self) -> dict:
        hp = self.hparams
        if self.sources:
            return self._source_splits()
        source = read_preference_source(hp.path)
        splits = {split: normalise(ds, hp.path, hp.margin_from_score_ratio) for split, ds in source.items()}
        unknown = set(splits) - set(SPLITS)
        if unknown:
            raise UserInputError(f"data.path '{hp.path}' has splits {sorted(unknown)}; expected {SPLITS}.")
        missing = [s for s in ("validation", "test") if s not in splits]
        if "train" in splits and missing:
            pool = splits.pop("train")
            shares = {s: hp.val_fraction if s == "validation" else hp.test_fraction for s in missing}
            fractions = {"train": 1 - sum(shares.values()), **shares}
            posts = list(pool["post_id"])
            split_of = assign_splits(posts, fractions, hp.seed)
            labels = [split_of[post] for post in posts]
            for split in fractions:
                indices = [i for i, label in enumerate(labels) if label == split]
                splits[split] = pool.select(indices, keep_in_memory=True)
            sizes = ", ".join(f"{s} {len(d)}" for s, d in splits.items())
            print(f"[lit_rlhf] split '{hp.path}' by post_id (seed {hp.seed}): {sizes}")
        return splits

    def _source_splits(self) -> dict:
        """Every source read and split on its own, then the splits of all sources together."""
        from datasets import Dataset

        hp = self.hparams
        normalise = partial(normalise_row, margin_from_score_ratio=hp.margin_from_score_ratio)
        merged: dict[str, list[dict]] = {}
        for source in self.sources:
            rows = read_source(source["domain"], source["paths"], normalise, _split_of)
            for split, part in split_source(source["domain"], rows, hp.val_fraction, hp.test_fraction, hp.seed).items():
                merged.setdefault(split, []).extend(part)
        return {split: Dataset.from_list(rows) for split, rows in merged.items() if rows}

    def _filter(self, dataset, split: str) -> tuple:
        hp = self.hparams
        stats: Counter = Counter({"read": len(dataset)})

        def keep(mask_fn, reason: str):
            nonlocal dataset
            before = len(dataset)
            dataset = dataset.filter(mask_fn, keep_in_memory=True)
            if before - len(dataset):
                stats[f"skipped: {reason}"] += before - len(dataset)

        if hp.domains:
            if not any(dataset["domain"]):
                raise UserInputError(f"data.domains is set but '{hp.path}' has no domain column.")
            wanted = {d.lower() for d in hp.domains}
            keep(lambda row: row["domain"].lower() in wanted, f"domain not in {sorted(wanted)}")
        keep(lambda row: has_user_turn(row["prompt"]), "prompt without a user turn")
        if hp.min_score_ratio is not None:
            keep(
                lambda row: math.isnan(row["score_ratio"]) or row["score_ratio"] >= hp.min_score_ratio,
                f"score_ratio < {hp.min_score_ratio}",
            )
        keep(lambda row: bool(str(row["chosen"]).strip()) and bool(str(row["rejected"]).strip()), "empty response")
        keep(lambda row: str(row["chosen"]).strip() != str(row["rejected"]).strip(), "identical responses")
        if hp.max_pairs_per_post is not None:
            ratios, posts = list(dataset["score_ratio"]), list(dataset["post_id"])
            order = sorted(range(len(dataset)), key=lambda i: -_nan_to(ratios[i], 0.0))
            seen: Counter = Counter()
            kept = []
            for i in order:
                seen[posts[i]] += 1
                if seen[posts[i]] <= hp.max_pairs_per_post:
                    kept.append(i)
            if len(kept) < len(dataset):
                stats[f"skipped: over {hp.max_pairs_per_post} pairs per post"] += len(dataset) - len(kept)
                dataset = dataset.select(sorted(kept), keep_in_memory=True)
        limit = hp.max_train_pairs if split == "train" else hp.max_eval_pairs
        if limit is not None and len(dataset) > limit:
            stats[f"left out: subset of {limit}"] += len(dataset) - limit
            dataset = dataset.shuffle(seed=hp.seed, keep_in_memory=True).select(range(limit), keep_in_memory=True)
        return dataset, stats

    def _encode(self, dataset, split: str, stats: Counter):
        hp = self.hparams
        tokenizer = self._tokenizer()
        domain_ids = {name: i for i, name in enumerate(self.domains)}
        dataset = dataset.map(
            _encode_row,
            fn_kwargs={"tokenizer": tokenizer, "max_length": hp.max_length, "min_prompt_tokens": hp.min_prompt_tokens},
            desc=f"Encoding {split} pairs",
            keep_in_memory=True,
        )
        # the unit that intervals resample: a post, or with sources a conversation of one source
        unit = "group" if "group" in dataset.column_names else "post_id"
        post_index = {post: i for i, post in enumerate(sorted(set(dataset[unit])))}
        dataset = dataset.map(
            lambda row: {"domain_id": domain_ids.get(row["domain"], -1), "post_index": post_index[row[unit]]},
            keep_in_memory=True,
        )
        for flag, label in (
            ("prompt_cut", "prompts cut from the left"),
            ("prompt_over_max_length", f"prompts alone longer than max_length {hp.max_length} (cut)"),
            ("response_cut", "responses cut at their end"),
        ):
            if sum(dataset[flag]):
                stats[label] = sum(dataset[flag])
        before = len(dataset)
        dataset = dataset.filter(lambda row: row["chosen_ids"] != row["rejected_ids"], keep_in_memory=True)
        if before - len(dataset):
            stats["skipped: identical after truncation"] = before - len(dataset)
        weights = length_balance_weights(dataset) if hp.balance_length and split == "train" else None
        dataset = dataset.add_column("weight", weights or [1.0] * len(dataset))
        self.length_stats[split] = length_report(dataset, hp.max_length)
        return dataset

    def prepare(self, splits: tuple[str, ...] = SPLITS) -> None:
        """Read, filter and encode the requested splits into `self.datasets` (idempotent)."""
        todo = [s for s in splits if s not in self.datasets]
        if not todo:
            return
        raw = self._splits()
        filtered = {}
        for split in todo:
            if split not in raw:
                continue
            dataset, stats = self._filter(raw[split], split)
            if len(dataset) == 0:
                raise UserInputError(
                    f"No {split} pairs left in '{self._what()}' after filtering ({_describe(stats)}). "
                    "Loosen min_score_ratio / domains / max_pairs_per_post or check the file."
                )
            filtered[split] = (dataset, stats)
        self.domains = sorted({d for ds in raw.values() for d in ds.unique("domain") if d})
        for split, (dataset, stats) in filtered.items():
            self.datasets[split] = self._encode(dataset, split, stats)
            print(f"[lit_rlhf] {split}: {len(self.datasets[split])} pairs ({_describe(stats)})")
            print(f"[lit_rlhf] {split} {_describe_lengths(self.length_stats[split], self.hparams.max_length)}")

    def _what(self) -> str:
        return ", ".join(s["domain"] for s in self.sources) if self.sources else self.hparams.path

    def export_record(self) -> dict:
        """What `RewardModel.export` records (see lit_rlhf.artifacts): the scoring settings it trained
        with, the posts / message trees of its train and validation splits and (with `sources`) the
        path(s) of each source."""
        seen = [self.datasets[split] for split in ("train", "validation") if split in self.datasets]
        record = {
            "scoring": {
                "max_length": self.hparams.max_length,
                "min_prompt_tokens": self.hparams.min_prompt_tokens,
            },
            "trained_on": {
                "message_tree_ids": sorted({tree for ds in seen for tree in ds["message_tree_id"] if tree}),
                "post_ids": sorted({post for ds in seen for post in ds["post_id"]}),
            },
        }
        if self.sources:
            record["sources"] = {source["domain"]: source["paths"] for source in self.sources}
        return record

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}.get(stage, SPLITS)
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a dozen 'Filter'/'Map' bars per run; the counts are printed instead
        try:
            self.prepare(wanted)
        finally:
            if bars:
                datasets.enable_progress_bars()
        for split in wanted:
            if split not in self.datasets:
                raise UserInputError(f"data.path '{self._what()}' has no {split} split (stage '{stage}').")
        if stage == "fit":
            self.show_preview()

    # -- preview ------------------------------------------------------------------------------

    def preview_rows(self, split: str = "train") -> list[list[str]]:
        """Encoded pairs spread over the split, decoded back to text: exactly what the model receives."""
        tokenizer = self._tokenizer()
        dataset = self.datasets[split]
        n = min(self.hparams.preview_rows, len(dataset))
        rows = dataset.select([i * len(dataset) // n for i in range(n)])
        return [[tokenizer.decode(r["chosen_ids"]), tokenizer.decode(r["rejected_ids"])] for r in rows]

    def show_preview(self) -> None:
        rows = self.preview_rows()
        if self.trainer is None:
            print(markdown_table(PREVIEW_COLUMNS, rows))
            return
        log_table(self.trainer, "preview/reward_model_inputs", PREVIEW_COLUMNS, rows)
        if self.trainer.is_global_zero:
            out = run_dir(self.trainer) / "preprocessed_preview.md"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(
                f"# Reward model inputs ({len(rows)} training pairs spread over the split, after the chat "
                f"template and truncation to {self.hparams.max_length} tokens)\n\n"
                f"{markdown_table(PREVIEW_COLUMNS, rows)}\n",
                encoding="utf-8",
            )

    # -- loaders ------------------------------------------------------------------------------

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        dataset = self.datasets[split].select_columns(LOADER_COLUMNS)
        collate = partial(collate_pairs, pad_token_id=self._tokenizer().pad_token_id)
        if not shuffle:
            batch_size = hp.eval_batch_size or hp.batch_size
            return DataLoader(dataset, batch_size=batch_size, num_workers=hp.num_workers, collate_fn=collate)
        lengths = None
        if hp.group_by_length:  # a batch is padded to its longest sequence, chosen or rejected
            lengths = [max(len(c), len(r)) for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"])]
        if hp.batch_by_post:  # resumable as `resumable_loader`'s: the order is a function of (seed, epoch)
            sampler = PostGroupedShuffle(
                dataset, torch.initial_seed(), self.datasets[split]["post_id"], hp.batch_size, lengths
            )
            return StatefulDataLoader(
                dataset, batch_size=hp.batch_size, sampler=sampler, num_workers=hp.num_workers, collate_fn=collate
            )
        return resumable_loader(
            dataset, batch_size=hp.batch_size, lengths=lengths, num_workers=hp.num_workers, collate_fn=collate
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


# The class was first written for SHP only; the old name keeps older configs, checkpoints and
# scripts (class_path lit_rlhf.data.preference.SHPDataModule) loading.
SHPDataModule = PreferenceDataModule


def _nan_to(value: float, default: float) -> float:
    return default if math.isnan(value) else value


def length_balance_weights(dataset) -> list[float]:
    """Per pair: n / (2 n_side) for the pairs whose chosen reply is the shorter (or the longer) one,
    1 for replies of equal length, so both sides weigh n/2 and the mean weight stays 1."""
    sides = np.sign(np.asarray(dataset["chosen_chars"]) - np.asarray(dataset["rejected_chars"]))
    counts = {side: int((sides == side).sum()) for side in (-1, 1)}
    paired = counts[-1] + counts[1]
    return [1.0 if side == 0 or not counts[-side] else paired / (2 * counts[side]) for side in sides]


def length_report(dataset, max_length: int) -> dict:
    """Untruncated token lengths (chat template included) of chosen and rejected: p50/p95/max,
    and how many pairs `max_length` still cuts (they are kept, cut as `encode_prompt_response` says)."""
    report = {"pairs": len(dataset), "truncated_pairs": 0}
    if len(dataset):
        for side in ("chosen", "rejected"):
            lengths = np.asarray(dataset[f"{side}_untruncated_tokens"])
            report[side] = {
                "p50": float(np.percentile(lengths, 50)),
                "p95": float(np.percentile(lengths, 95)),
                "max": int(lengths.max()),
            }
        longest = np.maximum(dataset["chosen_untruncated_tokens"], dataset["rejected_untruncated_tokens"])
        report["truncated_pairs"] = int((longest > max_length).sum())
    return report


def _describe_lengths(report: dict, max_length: int) -> str:
    sides = "; ".join(
        f"{side} p50 {report[side]['p50']:.0f} / p95 {report[side]['p95']:.0f} / max {report[side]['max']}"
        for side in ("chosen", "rejected")
        if side in report
    )
    return (
        f"token lengths before truncation: {sides}; {report['truncated_pairs']} of {report['pairs']} pairs "
        f"longer than max_length {max_length} (kept, cut)"
    )


def _describe(stats: Counter) -> str:
    return ", ".join(f"{key}: {value}" for key, value in stats.items()) or "nothing skipped"
