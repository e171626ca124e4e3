"""OpenAssistant Conversations (oasst1): message rows and the human preference pairs they hold.

oasst1 stores one row per message (`message_id`, `parent_id`, `role` prompter/assistant, `text`,
`rank`, `message_tree_id`, ...). Sibling assistant replies to one prompter message were ranked by
humans (`rank` 0 = best), so each pair of ranked siblings is a real preference pair.
"""

from collections import Counter

from lit_rlhf.data.files import load_hub_dataset, local_table_files, read_local_tables
from lit_rlhf.errors import UserInputError, is_local_path

OASST1_HUB_ID = "OpenAssistant/oasst1"
OASST1_FIELDS = ("message_id", "parent_id", "text", "role", "rank", "message_tree_id")
_ROLES = {"prompter": "user", "assistant": "assistant"}


def read_oasst1_rows(path: str = OASST1_HUB_ID) -> list[dict]:
    """All message rows of the hub dataset (every split) or of a local JSONL/parquet file or folder.

    A folder's files are read one by one: oasst1 exports differ in which columns are all null
    (the train sample drops user ids and labels), which one combined read cannot cast.
    """
    from datasets import concatenate_datasets

    if is_local_path(path):
        _, files = local_table_files(path, "oasst1 path")
        what = "oasst1 path" if len(files) == 1 else f"oasst1 path '{path}': the file"
        rows = []
        for file in files:
            rows += _checked_rows(read_local_tables(str(file), what)["train"], str(file))
        return rows
    splits = load_hub_dataset(
        path,
        "Pass a local copy of the message rows (.jsonl/.parquet), e.g. "
        "$LIT_RLHF_DATA/oasst1/oasst1_validation_en.jsonl.",
    )
    return _checked_rows(concatenate_datasets(list(splits.values())), path)


def _checked_rows(dataset, path: str) -> list[dict]:
    missing = [field for field in OASST1_FIELDS if field not in dataset.column_names]
    if missing:
        raise UserInputError(
            f"'{path}' does not look like oasst1 message rows: missing columns {missing} "
            f"(found {dataset.column_names})."
        )
    return dataset.to_list()


def conversation(message: dict, by_id: dict[str, dict]) -> list[dict] | None:
    """The chat messages from the tree's root down to `message`, or None when an ancestor is missing."""
    chain = [message]
    while chain[-1].get("parent_id"):
        parent = by_id.get(chain[-1]["parent_id"])
        if parent is None:
            return None
        chain.append(parent)
    return [{"role": _ROLES[m["role"]], "content": m["text"]} for m in reversed(chain)]


def oasst1_preference_pairs(rows: list[dict], stats: Counter | None = None) -> list[dict]:
    """Every (better, worse) pair of ranked sibling assistant replies, lower `rank` preferred.

    Each pair is `{prompt, chosen, rejected, post_id, message_tree_id}`: `prompt` is the
    conversation up to the prompter message as chat messages (`[{"role", "content"}, ...]`), so
    follow-up questions keep their context; `post_id` is that prompter message's id (the analogue
    of an SHP post: one question with its ranked answers). Deleted replies are left out. Skipped
    pairs are counted in `stats` (identical texts, incomplete conversation history).
    """
    stats = stats if stats is not None else Counter()
    by_id = {row["message_id"]: row for row in rows}
    siblings: dict[str, list[dict]] = {}
    for row in rows:
        if row["role"] == "assistant" and row.get("rank") is not None and not row.get("deleted"):
            siblings.setdefault(row["parent_id"], []).append(row)
    pairs = []
    for parent_id, replies in siblings.items():
        if len(replies) < 2:
            continue
        parent = by_id.get(parent_id)
        prompt = conversation(parent, by_id) if parent is not None else None
        replies = sorted(replies, key=lambda r: r["rank"])
        n_pairs = sum(1 for i, a in enumerate(replies) for b in replies[i + 1 :] if a["rank"] < b["rank"])
        if prompt is None:
            stats["skipped: conversation history incomplete"] += n_pairs
            continue
        for i, better in enumerate(replies):
            for worse in replies[i + 1 :]:
                if better["rank"] == worse["rank"]:
                    continue
                if better["text"].strip() == worse["text"].strip():
                    stats["skipped: identical replies"] += 1
                    continue
                pairs.append(
                    {
                        "prompt": prompt,
                        "chosen": better["text"],
                        "rejected": worse["text"],
                        "post_id": parent_id,
                        "message_tree_id": better["message_tree_id"],
                    }
                )
    stats["pairs"] += len(pairs)
    return pairs
