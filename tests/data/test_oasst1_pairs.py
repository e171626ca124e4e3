"""oasst1 message rows -> preference pairs (package function and the scripts/ CLI)."""

import json
import runpy
import sys
from pathlib import Path

import pytest
from preference_fixtures import write_jsonl

from lit_rlhf.data.oasst1 import oasst1_preference_pairs, read_oasst1_rows
from lit_rlhf.errors import UserInputError

SCRIPT = str(Path(__file__).resolve().parents[2] / "scripts" / "oasst1_to_pairs.py")


def message(mid, parent, role, text, rank=None, tree="t1", deleted=False):
    return {
        "message_id": mid,
        "parent_id": parent,
        "role": role,
        "text": text,
        "rank": rank,
        "message_tree_id": tree,
        "deleted": deleted,
        "lang": "en",
    }


ROWS = [
    message("q", None, "prompter", "What is 2+2?"),
    message("a0", "q", "assistant", "4.", rank=0),
    message("a1", "q", "assistant", "Probably 5.", rank=1),
    message("a2", "q", "assistant", "Who knows.", rank=2),
    message("ax", "q", "assistant", "deleted reply", rank=3, deleted=True),
    message("f", "a0", "prompter", "And times 3?"),
    message("b0", "f", "assistant", "12.", rank=0),
    message("b1", "f", "assistant", "12.", rank=1),  # identical text: skipped
    message("orphan_reply", "missing_parent", "assistant", "x", rank=0, tree="t2"),
    message("orphan_reply2", "missing_parent", "assistant", "y", rank=1, tree="t2"),
]


def test_pairs_from_ranked_siblings_lower_rank_preferred():
    from collections import Counter

    stats = Counter()
    pairs = oasst1_preference_pairs(ROWS, stats)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("4.", "Probably 5."),
        ("4.", "Who knows."),
        ("Probably 5.", "Who knows."),
    ]
    assert pairs[0]["prompt"] == [{"role": "user", "content": "What is 2+2?"}]
    assert pairs[0]["post_id"] == "q" and pairs[0]["message_tree_id"] == "t1"
    assert stats == Counter(
        {"pairs": 3, "skipped: identical replies": 1, "skipped: conversation history incomplete": 1}
    )


def test_follow_up_prompts_keep_the_conversation():
    rows = ROWS[:6] + [message("b0", "f", "assistant", "12.", rank=0), message("b1", "f", "assistant", "9.", rank=1)]
    follow_up = [p for p in oasst1_preference_pairs(rows) if p["post_id"] == "f"]
    assert follow_up[0]["prompt"] == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And times 3?"},
    ]


def test_real_oasst1_rows(data_root):
    rows = read_oasst1_rows(str(data_root / "oasst1" / "oasst1_validation_en.jsonl"))
    pairs = oasst1_preference_pairs(rows)
    assert len(rows) == 1588 and len(pairs) > 700
    rank = {r["text"]: r["rank"] for r in rows if r["role"] == "assistant"}
    assert all(rank[p["chosen"]] < rank[p["rejected"]] for p in pairs[:50])


def test_a_folder_of_both_real_oasst1_files_is_read_file_by_file(data_root, tmp_path):
    """The validation file and the train sample differ in all-null columns: one combined read fails."""
    folder = tmp_path / "oasst1_both"
    folder.mkdir()
    for file in ("oasst1/oasst1_validation_en.jsonl", "oasst1_train_sample/oasst1_train_en_sample.jsonl"):
        (folder / Path(file).name).symlink_to(data_root / file)
    rows = read_oasst1_rows(str(folder))
    assert len(rows) == 1588 + 1060
    assert len({row["message_tree_id"] for row in rows}) == 153 + 88
    assert sum(row["parent_id"] is None for row in rows) == 150 + 88  # 3 validation roots are not English


def test_script_writes_disjoint_seeded_splits(tmp_path, monkeypatch, capsys):
    trees = [
        dict(
            r,
            message_tree_id=f"t{k}",
            message_id=f"{r['message_id']}{k}",
            parent_id=r["parent_id"] and f"{r['parent_id']}{k}",
        )
        for k in range(10)
        for r in ROWS[:4]
    ]
    source = write_jsonl(tmp_path / "rows.jsonl", trees)
    out = tmp_path / "pairs"
    monkeypatch.setattr(sys, "argv", [SCRIPT, str(source), str(out), "--split", "0.6", "0.2", "0.2", "--seed", "1"])
    runpy.run_path(SCRIPT, run_name="__main__")
    trees = {}
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        trees[split] = {r["message_tree_id"] for r in rows}
        assert rows and {"prompt", "chosen", "rejected"} <= set(rows[0])
    assert not (
        trees["train"] & trees["validation"] or trees["train"] & trees["test"] or trees["validation"] & trees["test"]
    )
    assert sum(len(t) for t in trees.values()) == 10 and "wrote" in capsys.readouterr().out


def test_bad_source_is_a_user_input_error(tmp_path):
    with pytest.raises(UserInputError, match="missing columns"):
        read_oasst1_rows(str(write_jsonl(tmp_path / "x.jsonl", [{"text": "hi"}])))
    with pytest.raises(UserInputError, match="does not exist"):
        read_oasst1_rows(str(tmp_path / "none.jsonl"))


def test_script_pools_several_sources_and_refuses_overlapping_ones(tmp_path, monkeypatch, capsys):
    def tree(k):
        return [
            dict(
                r,
                message_tree_id=f"{k}",
                message_id=f"{r['message_id']}{k}",
                parent_id=r["parent_id"] and f"{r['parent_id']}{k}",
            )
            for r in ROWS[:4]
        ]

    first = write_jsonl(tmp_path / "a.jsonl", [row for k in range(6) for row in tree(f"a{k}")])
    second = write_jsonl(tmp_path / "b.jsonl", [row for k in range(4) for row in tree(f"b{k}")])
    out = tmp_path / "pairs"
    monkeypatch.setattr(sys, "argv", [SCRIPT, str(first), str(second), str(out), "--split", "0.6", "0.2", "0.2"])
    runpy.run_path(SCRIPT, run_name="__main__")
    rows = [
        json.loads(line)
        for split in ("train", "validation", "test")
        for line in (out / f"{split}.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 10 * 3 and {r["message_tree_id"][0] for r in rows} == {"a", "b"}
    assert all(r["post_id"] == f"q{r['message_tree_id']}" for r in rows)  # the prompter message's id
    monkeypatch.setattr(sys, "argv", [SCRIPT, str(first), str(first), str(out)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert exit_info.value.code == 2 and "appear more than once" in capsys.readouterr().err
