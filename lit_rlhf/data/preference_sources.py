"""Several preference sources read at once (`PreferenceDataModule(sources=...)`), each under its own
`domain` name, each split into train/validation/test by conversation, so that every metric can be
reported per source and no conversation of a source is in two splits.

A source is `{domain: name, path: file, folder or hub id (or a list of them)}`. Its files are read one
by one and recognised by their columns: oasst1 message rows (ranked sibling replies become pairs,
`oasst1.oasst1_preference_pairs`), SHP rows, or `prompt, chosen, rejected` rows (a prompt is a string or
chat messages). Every prompt becomes chat messages, so the sources share one schema.
"""

import os
import re
from collections import Counter

from lit_rlhf.data.files import local_table_files, read_local_tables
from lit_rlhf.data.oasst1 import OASST1_FIELDS, oasst1_preference_pairs
from lit_rlhf.data.splits import assign_splits
from lit_rlhf.errors import UserInputError, is_local_path

SPLITS = ("train", "validation", "test")


def check_sources(sources: list) -> list[dict]:
    """`[{domain, paths}]` from the `data.sources` entries: every entry names a domain and a path,
    environment variables in paths are expanded, and two sources never share a domain."""
    checked, seen = [], {}
    for index, entry in enumerate(sources):
        if not isinstance(entry, dict) or set(entry) != {"domain", "path"} or not str(entry["domain"]).strip():
            raise UserInputError(
                f"data.sources[{index}] is {entry!r}: each source is a mapping with exactly the keys `domain` (its "
                "name in the per-source metrics) and `path` (a file, folder or hub id, or a list of them), e.g. "
                "{domain: hh_helpful, path: $LIT_RLHF_DATA/hh_helpful}."
            )
        domain = str(entry["domain"]).strip()
        if domain.lower() in seen:
            raise UserInputError(
                f"data.sources has two sources named '{domain}' (entries {seen[domain.lower()]} and {index}): the "
                "per-source metrics and splits need one domain per source. Rename one, or give one source a list "
                "of paths."
            )
        seen[domain.lower()] = index
        paths = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
        checked.append({"domain": domain, "paths": [_expand(str(path), domain) for path in paths]})
    if not checked:
        raise UserInputError("data.sources is an empty list: give at least one {domain, path} source.")
    return checked


def _expand(path: str, domain: str) -> str:
    expanded = os.path.expandvars(path)
    unset = re.findall(r"\$\{?(\w+)", expanded)
    if unset:
        raise UserInputError(
            f"data.sources '{domain}': the path '{path}' uses the environment variable(s) {unset}, which are not "
            "set. Export them (e.g. LIT_RLHF_DATA=<folder of the real data samples>) or write the path out."
        )
    return expanded


def first_user_turn(prompt) -> str:
    """The conversation's opening user message: conversations that start alike are one tree."""
    if isinstance(prompt, str):
        return prompt
    return next((str(m.get("content", "")) for m in prompt if isinstance(m, dict) and m.get("role") == "user"), "")


def read_source(domain: str, paths: list[str], normalise_row, split_of) -> dict[str, list[dict]]:
    """`{split: normalised rows}` of one source, every row with this `domain` and its `group` (the
    message tree, else the first user turn). `normalise_row(row, columns, where)` turns a raw SHP or
    pairs row into the common schema (or raises); `split_of(file)` reads a split from a file name.
    oasst1 message rows go to the train pool (their file names name oasst1's own splits)."""
    from lit_rlhf.data.files import load_hub_dataset

    splits: dict[str, list[dict]] = {}
    oasst1_rows: list[dict] = []
    for path in paths:
        if is_local_path(path):
            what = f"data.sources '{domain}'"
            tables = [
                (f"{what}: the file '{file}'", split_of(file), read_local_tables(str(file), what)["train"])
                for file in local_table_files(path, what)[1]
            ]
        else:
            hint = f"Pass a local copy as the path of data.sources '{domain}'."
            splits_of_hub = load_hub_dataset(path, hint)
            tables = [
                (f"data.sources '{domain}': '{path}' ({split})", split, ds) for split, ds in splits_of_hub.items()
            ]
        for where, split, table in tables:
            if set(OASST1_FIELDS) <= set(table.column_names):
                oasst1_rows += table.to_list()
                continue
            rows = [normalise_row(row, table.column_names, where) for row in table.to_list()]
            splits.setdefault(split or "train", []).extend(rows)
    if oasst1_rows:
        stats: Counter = Counter()
        pairs = oasst1_preference_pairs(oasst1_rows, stats)
        skipped = {key: value for key, value in stats.items() if key.startswith("skipped")}
        if skipped:
            print(f"[lit_rlhf] source '{domain}': oasst1 pairs {dict(skipped)}")
        splits.setdefault("train", []).extend(
            normalise_row(pair, list(pair), f"data.sources '{domain}' (oasst1 pairs)") for pair in pairs
        )
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise UserInputError(f"data.sources '{domain}' has splits {sorted(unknown)}; expected {SPLITS}.")
    for rows in splits.values():
        for row in rows:
            row["domain"] = domain
            if isinstance(row["prompt"], str):
                row["prompt"] = [{"role": "user", "content": row["prompt"]}]
            row["group"] = f"{domain}/{row['message_tree_id'] or first_user_turn(row['prompt'])}"
    return splits


def split_source(
    domain: str, splits: dict[str, list[dict]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[dict]]:
    """The source's own splits, the missing validation/test ones cut from its train pool by a seeded
    split of its groups (conversations)."""
    missing = [s for s in ("validation", "test") if s not in splits]
    if "train" in splits and missing:
        pool = splits.pop("train")
        shares = {s: val_fraction if s == "validation" else test_fraction for s in missing}
        fractions = {"train": 1 - sum(shares.values()), **shares}
        split_of = assign_splits((row["group"] for row in pool), fractions, seed)
        for split in fractions:
            splits[split] = [row for row in pool if split_of[row["group"]] == split]
        sizes = ", ".join(f"{s} {len(splits[s])}" for s in SPLITS if s in splits)
        groups = len({row["group"] for row in pool})
        print(
            f"[lit_rlhf] source '{domain}': {len(pool)} pairs, split by conversation ({groups}; seed {seed}): {sizes}"
        )
    return splits
