"""Turn oasst1 message rows into reward-model preference pairs (`prompt, chosen, rejected` JSONL).

    python scripts/oasst1_to_pairs.py $LIT_RLHF_DATA/oasst1/oasst1_validation_en.jsonl \
        $LIT_RLHF_DATA/oasst1_train_sample/oasst1_train_en_sample.jsonl /tmp/pairs --split 0.7 0.15 0.15 --seed 0

writes /tmp/pairs/{train,validation,test}.jsonl, split by `message_tree_id` (no conversation in
two files) over the pairs of all sources together; without --split, one file `pairs.jsonl` (a
file path as OUT also works then). Each row keeps `post_id` (the prompter message) and
`message_tree_id`. A source is a local .jsonl/.parquet file or folder, or the hub id
OpenAssistant/oasst1; the sources' message ids must not overlap (the same message twice would
put one conversation in two splits).
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from lit_rlhf.data.oasst1 import oasst1_preference_pairs, read_oasst1_rows
from lit_rlhf.data.splits import assign_splits
from lit_rlhf.errors import UserInputError

SPLITS = ("train", "validation", "test")


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="oasst1 rows: .jsonl/.parquet files or folders, or a hub id")
    parser.add_argument("out", help="output folder (or a .jsonl file when --split is not given)")
    parser.add_argument("--split", nargs=3, type=float, metavar=("TRAIN", "VAL", "TEST"), help="fractions of trees")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        stats = Counter()
        rows = [row for source in args.sources for row in read_oasst1_rows(source)]
        repeated = len(rows) - len({row["message_id"] for row in rows})
        if repeated:
            raise UserInputError(
                f"{repeated} message ids appear more than once across {args.sources}: a source was given twice "
                "or two sources overlap. Pass each oasst1 file once and sources with disjoint message trees."
            )
        pairs = oasst1_preference_pairs(rows, stats)
        if not pairs:
            raise UserInputError(f"No ranked sibling assistant replies in {args.sources}: no pairs to write.")
        out = Path(args.out)
        if args.split is None:
            target = out if out.suffix == ".jsonl" else out / "pairs.jsonl"
            write_jsonl(pairs, target)
            counts = {str(target): len(pairs)}
        else:
            split_of = assign_splits((p["message_tree_id"] for p in pairs), dict(zip(SPLITS, args.split)), args.seed)
            counts = {}
            for split in SPLITS:
                rows = [p for p in pairs if split_of[p["message_tree_id"]] == split]
                write_jsonl(rows, out / f"{split}.jsonl")
                counts[str(out / f"{split}.jsonl")] = len(rows)
    except UserInputError as error:
        print(f"oasst1_to_pairs error: {error}", file=sys.stderr)
        sys.exit(2)
    for key, value in sorted(stats.items()):
        print(f"{key}: {value}")
    for path, n in counts.items():
        print(f"wrote {n} pairs to {path}")
    return counts


if __name__ == "__main__":
    main()
