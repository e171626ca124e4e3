"""Derive the packaged oasst1 sample (`lit_rlhf/samples/oasst1_en.jsonl.gz`) from local oasst1 rows.

    python scripts/make_oasst1_sample.py $LIT_RLHF_DATA/oasst1 $LIT_RLHF_DATA/oasst1_train_sample

Keeps, of every English message row, the fields the prompt and preference readers use
(message_id, parent_id, message_tree_id, role, lang, rank, text), whole message trees only, in the
sources' order, gzip-compressed. oasst1 is Apache-2.0 (see lit_rlhf/samples/README.md).
"""

import argparse
import gzip
import json
from pathlib import Path

from lit_rlhf.data.oasst1 import read_oasst1_rows

FIELDS = ("message_id", "parent_id", "message_tree_id", "role", "lang", "rank", "text")
OUT = Path(__file__).resolve().parents[1] / "lit_rlhf" / "samples" / "oasst1_en.jsonl.gz"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="oasst1 message rows: .jsonl/.parquet files or folders")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    rows = [row for source in args.sources for row in read_oasst1_rows(source) if row.get("lang") == "en"]
    lines = "".join(json.dumps({k: row.get(k) for k in FIELDS}, ensure_ascii=False) + "\n" for row in rows)
    with gzip.GzipFile(args.out, "wb", compresslevel=9, mtime=0) as f:  # mtime 0: the same bytes on every run
        f.write(lines.encode("utf-8"))
    trees = len({row["message_tree_id"] for row in rows})
    print(f"wrote {len(rows)} rows of {trees} message trees to {args.out} ({args.out.stat().st_size:,} bytes)")
    return args.out


if __name__ == "__main__":
    main()
