"""One oasst1 dataset cut by message tree for a whole RLHF experiment, so that "unseen" stays true.

Trees go to one of three groups: the training reward model's pairs, the judge reward model's pairs
(another set of trees, so the judge is a second opinion the policies never optimised), and a
held-out group whose root prompts are the evaluation prompts and whose pairs are both reward
models' test split. Policies train on the prompts of the first two groups only.
"""

import json
from pathlib import Path

from lit_rlhf.artifacts import write_eval_prompts, write_jsonl
from lit_rlhf.data.oasst1 import oasst1_preference_pairs
from lit_rlhf.data.splits import assign_splits
from lit_rlhf.errors import UserInputError

GROUPS = {"reward_model": 0.5, "judge": 0.25, "held_out": 0.25}
PROMPT_ROWS = "prompt_rows.jsonl"


def write_rlhf_splits(rows: list[dict], out: Path, seed: int = 0, lang: str | None = "en") -> dict[str, int]:
    """Write `<out>/{reward_model,judge}/{train,validation,test}.jsonl` (preference pairs),
    `<out>/prompt_rows.jsonl` (message rows for policy training) and `<out>/eval_prompts.jsonl`
    (held-out root prompts); returns the counts."""
    rows = [row for row in rows if not lang or row.get("lang") == lang]
    group = assign_splits((row["message_tree_id"] for row in rows), GROUPS, seed)
    pairs = oasst1_preference_pairs(rows)
    counts = {}
    for name in ("reward_model", "judge"):
        trees = sorted({p["message_tree_id"] for p in pairs if group[p["message_tree_id"]] == name})
        if len(trees) < 2:
            raise UserInputError(
                f"Only {len(trees)} message trees with ranked replies fall to the {name} reward model: the oasst1 "
                "rows hold too few ranked sibling replies for two reward models. Pass more data (--preference_data)."
            )
        split = assign_splits(trees, {"train": 0.85, "validation": 0.15}, seed)
        for part in ("train", "validation"):
            chosen = [p for p in pairs if split.get(p["message_tree_id"]) == part]
            write_jsonl(chosen, out / name / f"{part}.jsonl")
            counts[f"{name}/{part}"] = len(chosen)
        held_out = [p for p in pairs if group[p["message_tree_id"]] == "held_out"]
        write_jsonl(held_out, out / name / "test.jsonl")
        counts[f"{name}/test"] = len(held_out)
    training_rows = [row for row in rows if group[row["message_tree_id"]] != "held_out"]
    write_jsonl(training_rows, out / PROMPT_ROWS)
    prompts = [
        {"prompt": row["text"].strip(), "message_id": row["message_id"], "message_tree_id": row["message_tree_id"]}
        for row in rows
        if group[row["message_tree_id"]] == "held_out"
        and row.get("role") == "prompter"
        and row.get("parent_id") is None
        and (row.get("text") or "").strip()
    ]
    write_eval_prompts(prompts, out)
    counts.update({"prompt_rows": len(training_rows), "eval_prompts": len(prompts)})
    return counts


def message_trees(path: Path) -> set[str]:
    """The message trees of a JSONL of pairs, prompts or message rows."""
    trees = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            trees.add(json.loads(line).get("message_tree_id"))
    return trees - {None}


def main(argv: list[str] | None = None) -> dict[str, int]:
    """`python -m lit_rlhf.data.rlhf_splits ROWS OUT [--seed S]`: the pipeline's `pairs` stage."""
    import argparse
    import sys

    from lit_rlhf.data.oasst1 import read_oasst1_rows
    from lit_rlhf.errors import as_paragraph

    parser = argparse.ArgumentParser(prog="python -m lit_rlhf.data.rlhf_splits", description=__doc__)
    parser.add_argument("rows", help="oasst1 message rows: hub id, .jsonl(.gz)/.parquet file or folder")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split by message tree")
    args = parser.parse_args(argv)
    try:
        counts = write_rlhf_splits(read_oasst1_rows(args.rows), args.out, args.seed)
    except UserInputError as error:
        print(as_paragraph(error), file=sys.stderr)
        sys.exit(2)
    print("[lit_rlhf] " + ", ".join(f"{key}: {value}" for key, value in counts.items()))
    return counts


if __name__ == "__main__":
    main()
