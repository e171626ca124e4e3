"""PreferenceDataModule: SHP schema and generic pairs, splits, filters, chat-template truncation, preview."""

import json
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch import Trainer
from preference_fixtures import make_shp_folder, separable_pairs, shp_row, shp_rows, write_jsonl

from lit_rlhf.data.preference import CUT_FLAGS, PreferenceDataModule
from lit_rlhf.errors import UserInputError
from lit_rlhf.models.hf import load_tokenizer
from lit_rlhf.text import encode_prompt_response, render_prompt_response


@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer_dir):
    return load_tokenizer(str(smol_tokenizer_dir))


def datamodule(path, smol_tokenizer_dir, **kwargs) -> PreferenceDataModule:
    kwargs.setdefault("min_score_ratio", None)
    return PreferenceDataModule(str(path), tokenizer_name_or_path=str(smol_tokenizer_dir), **kwargs)


def decoded(dm, split, key="chosen_ids"):
    return [dm.tokenizer.decode(ids) for ids in dm.datasets[split][key]]


def test_shp_folder_uses_its_own_splits_and_labels(tmp_path, smol_tokenizer_dir):
    dm = datamodule(make_shp_folder(tmp_path / "shp"), smol_tokenizer_dir, max_length=128)
    dm.prepare()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 36, "validation": 12, "test": 12}
    assert dm.domains == ["askculinary", "askphysics"]  # "_train" suffix stripped
    # labels == 1 -> A preferred; the fixture's preferred comment is always the "Clear answer".
    assert all("Clear answer" in text for text in decoded(dm, "train"))
    assert all("no idea lol" in text for text in decoded(dm, "train", "rejected_ids"))
    text = decoded(dm, "train")[0]
    assert "<|im_start|>user\nPost " in text and "<|im_start|>assistant\nClear answer" in text


def test_score_ratio_filter_pairs_per_post_domains_and_subset(tmp_path, smol_tokenizer_dir, capsys):
    root = make_shp_folder(tmp_path / "shp", pairs_per_post=4)
    dm = datamodule(root, smol_tokenizer_dir, min_score_ratio=2.0, max_pairs_per_post=2, domains=["askphysics"])
    dm.prepare(("train",))
    train = dm.datasets["train"]
    assert min(train["score_ratio"]) >= 2.0
    assert set(train["domain"]) == {"askphysics"}
    posts = list(train["post_id"])
    assert max(posts.count(p) for p in posts) <= 2
    out = capsys.readouterr().out
    assert "skipped: score_ratio < 2.0" in out and "skipped: domain not in" in out
    dm = datamodule(root, smol_tokenizer_dir, max_train_pairs=10, seed=3)
    dm.prepare(("train",))
    assert len(dm.datasets["train"]) == 10


def test_single_file_is_split_by_post_with_a_seed(tmp_path, smol_tokenizer_dir):
    path = write_jsonl(tmp_path / "shp_all.jsonl", shp_rows("train", 20))
    splits = []
    for _ in range(2):
        dm = datamodule(path, smol_tokenizer_dir, val_fraction=0.2, test_fraction=0.2, seed=1)
        dm.prepare()
        splits.append({s: set(d["post_id"]) for s, d in dm.datasets.items()})
    assert splits[0] == splits[1]
    train, val, test = splits[0]["train"], splits[0]["validation"], splits[0]["test"]
    assert train and val and test and not (train & val or train & test or val & test)


def test_generic_pairs_string_and_chat_prompts(tmp_path, smol_tokenizer_dir):
    rows = separable_pairs(6)
    rows[0]["prompt"] = "plain string prompt"
    write_jsonl(tmp_path / "strings" / "train.jsonl", rows)
    write_jsonl(tmp_path / "strings" / "validation.jsonl", separable_pairs(2))
    dm = datamodule(tmp_path / "strings", smol_tokenizer_dir)
    dm.prepare(("train", "validation"))
    assert "<|im_start|>user\nplain string prompt<|im_end|>" in decoded(dm, "train")[0]
    chat = [
        {
            "prompt": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Shorter please."},
            ],
            "chosen": "Hi.",
            "rejected": "Greetings to you, dear user.",
        }
    ]
    dm = datamodule(write_jsonl(tmp_path / "chat" / "test.jsonl", chat), smol_tokenizer_dir)
    dm.prepare(("test",))
    text = decoded(dm, "test")[0]
    assert "assistant\nHello!<|im_end|>" in text and text.endswith("<|im_start|>assistant\nHi.<|im_end|>\n")


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_response_start(tokenizer):
    prompt = "START " + "filler words " * 300 + "END OF QUESTION?"
    response = "The answer begins here and is short."
    ids, flags = encode_prompt_response(tokenizer, prompt, response, max_length=64, min_prompt_tokens=16)
    _, tail = render_prompt_response(tokenizer, prompt, response)
    response_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    assert len(ids) == 64 and ids[-len(response_ids) :] == response_ids
    text = tokenizer.decode(ids)
    assert "START" not in text and "END OF QUESTION?<|im_end|>\n<|im_start|>assistant\nThe answer begins" in text
    assert {flag: flags[flag] for flag in CUT_FLAGS} == {
        "prompt_cut": True,
        "prompt_over_max_length": True,
        "response_cut": False,
    }
    head, _ = render_prompt_response(tokenizer, prompt, response)
    assert flags["prompt_tokens"] == 64 - len(response_ids)  # the response starts right after the kept prompt
    assert flags["untruncated_tokens"] == len(tokenizer(head, add_special_tokens=False)["input_ids"]) + len(
        response_ids
    )
    # A response longer than max_length - min_prompt_tokens keeps its start and loses its end.
    ids, flags = encode_prompt_response(tokenizer, "Q?", "First words. " + "more " * 400, 96, min_prompt_tokens=32)
    assert len(ids) <= 96 and flags["response_cut"] and not flags["prompt_cut"]
    assert "Q?<|im_end|>\n<|im_start|>assistant\nFirst words." in tokenizer.decode(ids)


def test_both_sides_of_a_pair_share_the_identical_prompt_tokens(tmp_path, smol_tokenizer_dir):
    """A long prompt, a short chosen and a long rejected reply: the prompt is cut once, to the budget
    the longer side leaves, so DPO compares two log-probs given the same prompt (not two cuts of it)."""
    prompt = "START " + "filler words " * 200 + "END?"
    row = {"prompt": prompt, "chosen": "Short.", "rejected": "A much longer reply that goes on. " * 8}
    dm = datamodule(
        write_jsonl(tmp_path / "long" / "test.jsonl", [row]), smol_tokenizer_dir, max_length=128, min_prompt_tokens=32
    )
    dm.prepare(("test",))
    pair = dm.datasets["test"][0]
    chosen, rejected = pair["chosen_ids"], pair["rejected_ids"]
    assert pair["chosen_prompt_tokens"] == pair["rejected_prompt_tokens"]
    prompt_tokens = pair["chosen_prompt_tokens"]
    assert chosen[:prompt_tokens] == rejected[:prompt_tokens] and pair["prompt_cut"]
    assert len(rejected) == 128 and len(chosen) < 128  # the longer side sets the budget
    assert dm.tokenizer.decode(chosen[prompt_tokens:]) == "Short.<|im_end|>\n"


def test_identical_and_empty_responses_are_skipped_with_a_count(tmp_path, smol_tokenizer_dir, capsys):
    rows = separable_pairs(5) + [
        {"prompt": "p", "chosen": "same answer", "rejected": " same answer "},
        {"prompt": "p2", "chosen": "", "rejected": "x"},
    ]
    dm = datamodule(write_jsonl(tmp_path / "test.jsonl", rows), smol_tokenizer_dir)
    dm.prepare(("test",))
    assert len(dm.datasets["test"]) == 5
    out = capsys.readouterr().out
    assert "skipped: identical responses: 1" in out and "skipped: empty response: 1" in out


def test_bad_input_raises_user_input_error(tmp_path, smol_tokenizer_dir):
    missing = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserInputError, match="neither SHP's"):
        datamodule(missing, smol_tokenizer_dir).prepare()
    no_history = write_jsonl(
        tmp_path / "shp_missing.jsonl",
        [{k: v for k, v in shp_row("p", 0, "askvet", "train", 3.0, True).items() if k != "history"}],
    )
    with pytest.raises(UserInputError, match="neither SHP's"):
        datamodule(no_history, smol_tokenizer_dir).prepare()
    low = write_jsonl(tmp_path / "low" / "train.jsonl", [shp_row("p", 0, "askvet", "train", 1.2, True)])
    with pytest.raises(UserInputError, match="No train pairs left.*score_ratio < 2"):
        datamodule(low, smol_tokenizer_dir, min_score_ratio=2.0).prepare(("train",))
    with pytest.raises(UserInputError, match="does not exist"):
        datamodule(tmp_path / "nope.jsonl", smol_tokenizer_dir).prepare()
    with pytest.raises(UserInputError, match="offline.*--data.path"):
        datamodule("stanfordnlp/SHP", smol_tokenizer_dir).prepare()
    only_test = write_jsonl(tmp_path / "only" / "test.jsonl", separable_pairs(3))
    with pytest.raises(UserInputError, match="no train split"):
        datamodule(only_test, smol_tokenizer_dir).setup("fit")


def test_preview_table_console_file_and_samples(tmp_path, smol_tokenizer_dir, capsys):
    dm = datamodule(make_shp_folder(tmp_path / "shp"), smol_tokenizer_dir, max_length=96)
    dm.trainer = Trainer(default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False)
    dm.setup("fit")
    preview = (tmp_path / "run" / "preprocessed_preview.md").read_text()
    table_rows = [line for line in preview.splitlines() if line.startswith("| ")]
    assert table_rows[0] == "| input_chosen | input_rejected |" and len(table_rows) >= 6
    assert "<\\|im_start\\|>assistant⏎Clear answer" in preview
    samples = (tmp_path / "run" / "samples" / "preview_reward_model_inputs.jsonl").read_text().splitlines()
    assert len(samples) == 5 and set(json.loads(samples[0])) == {"step", "input_chosen", "input_rejected"}
    assert "| input_chosen | input_rejected |" in capsys.readouterr().out


def test_batches_put_chosen_and_rejected_in_one_padded_tensor(tmp_path, smol_tokenizer_dir):
    dm = datamodule(make_shp_folder(tmp_path / "shp"), smol_tokenizer_dir, batch_size=4, max_length=96)
    dm.prepare(("validation",))
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["margin"].shape == (4,)
    lengths = batch["attention_mask"].sum(1)
    first = dm.datasets["validation"][0]
    assert lengths[0] == len(first["chosen_ids"]) and lengths[4] == len(first["rejected_ids"])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == dm.tokenizer.pad_token_id).all()
    assert batch["domain_id"].tolist()[0] in (0, 1) and batch["score_ratio"][0] > 1
    # per row: where the response starts and its untruncated characters; per pair: its post
    head, _ = render_prompt_response(dm.tokenizer, first["prompt"], first["chosen"])
    assert batch["prompt_tokens"][0] == len(dm.tokenizer(head, add_special_tokens=False)["input_ids"])
    assert batch["response_chars"].tolist()[0] == len(first["chosen"]) and batch["response_chars"].tolist()[4] == len(
        first["rejected"]
    )
    posts = sorted(set(dm.datasets["validation"]["post_id"]))
    assert batch["post_index"].tolist()[0] == posts.index(first["post_id"])


def test_pair_ids_length_report_and_export_record(tmp_path, smol_tokenizer_dir, tokenizer, capsys):
    rows = separable_pairs(12)
    rows[3]["chosen"] = "A long answer. " * 30  # longer than max_length with its prompt: kept, cut
    write_jsonl(tmp_path / "pairs" / "train.jsonl", rows[:8])
    write_jsonl(tmp_path / "pairs" / "validation.jsonl", rows[8:10])
    write_jsonl(tmp_path / "pairs" / "test.jsonl", rows[10:])
    dm = datamodule(tmp_path / "pairs", smol_tokenizer_dir, max_length=64, min_prompt_tokens=16)
    dm.prepare()
    train = dm.datasets["train"]
    assert list(train["post_id"]) == [f"q{i}" for i in range(8)]
    assert list(train["message_tree_id"]) == [f"t{i // 2}" for i in range(8)]

    def length(prompt, response) -> int:
        head, tail = render_prompt_response(tokenizer, prompt, response)
        return len(tokenizer(head + tail, add_special_tokens=False)["input_ids"])

    chosen = [length(r["prompt"], r["chosen"]) for r in rows[:8]]
    rejected = [length(r["prompt"], r["rejected"]) for r in rows[:8]]
    report = dm.length_stats["train"]
    assert report["chosen"] == {"p50": np.percentile(chosen, 50), "p95": np.percentile(chosen, 95), "max": max(chosen)}
    assert report["rejected"]["max"] == max(rejected)
    assert report["truncated_pairs"] == sum(max(c, r) > 64 for c, r in zip(chosen, rejected)) == 1
    assert len(train) == 8 and max(len(ids) for ids in train["chosen_ids"]) == 64  # counted, not dropped
    assert "1 of 8 pairs longer than max_length 64 (kept, cut)" in capsys.readouterr().out
    assert dm.export_record() == {
        "scoring": {"max_length": 64, "min_prompt_tokens": 16},
        "trained_on": {"message_tree_ids": [f"t{i}" for i in range(5)], "post_ids": [f"q{i}" for i in range(10)]},
    }


def test_balance_length_weighs_both_length_sides_equally(tmp_path, smol_tokenizer_dir):
    rows = separable_pairs(8)  # chosen is the longer reply in all 8 ...
    for row in rows[:2]:  # ... but in these 2 it is the shorter one
        row["chosen"], row["rejected"] = "Ok.", "A much longer reply than the chosen one, which is short."
    rows.append({"prompt": "Tie?", "chosen": "abc", "rejected": "xyz", "post_id": "tie"})
    write_jsonl(tmp_path / "pairs" / "train.jsonl", rows)
    write_jsonl(tmp_path / "pairs" / "validation.jsonl", rows)
    write_jsonl(tmp_path / "pairs" / "test.jsonl", rows)
    dm = datamodule(tmp_path / "pairs", smol_tokenizer_dir, max_length=96, min_prompt_tokens=16, balance_length=True)
    dm.prepare(("train", "validation"))
    weights = list(dm.datasets["train"]["weight"])
    assert weights == pytest.approx([8 / (2 * 2)] * 2 + [8 / (2 * 6)] * 6 + [1.0])  # each side weighs 4 of 8
    assert set(dm.datasets["validation"]["weight"]) == {1.0}  # val/test losses stay unweighted
    batch = next(iter(dm.val_dataloader()))
    assert batch["weight"].tolist() == [1.0] * 8


# -- several sources, each split by conversation -------------------------------------------------


def _oasst1_rows(n_trees: int) -> list[dict]:
    """oasst1 message rows: per tree a question with three ranked replies (three pairs)."""
    rows = []
    for t in range(n_trees):
        rows.append(
            {
                "message_id": f"q{t}",
                "parent_id": None,
                "role": "prompter",
                "text": f"Question {t}?",
                "rank": None,
                "message_tree_id": f"tree{t}",
                "lang": "en",
            }
        )
        for rank, text in enumerate(("A clear, helpful answer.", "A vague answer.", "No.")):
            rows.append(
                {
                    "message_id": f"a{t}_{rank}",
                    "parent_id": f"q{t}",
                    "role": "assistant",
                    "text": f"{text} {t}",
                    "rank": rank,
                    "message_tree_id": f"tree{t}",
                    "lang": "en",
                }
            )
    return rows


def _chat_pairs(n_conversations: int, turns: int = 2) -> list[dict]:
    """Pairs whose conversations come `turns` at a time from one opening question (HH-style)."""
    return [
        {
            "prompt": [
                {"role": "user", "content": f"Opening {c}"},
                {"role": "assistant", "content": "Sure."},
                {"role": "user", "content": f"Follow-up {k}"},
            ],
            "chosen": f"Helpful reply {c}.{k}",
            "rejected": f"Unhelpful {c}.{k}",
            "post_id": f"hh-{c}-{k}",
            "domain": "ignored",
        }
        for c in range(n_conversations)
        for k in range(turns)
    ]


def sources_module(tmp_path, smol_tokenizer_dir, **kwargs) -> PreferenceDataModule:
    write_jsonl(tmp_path / "oasst" / "a_validation.jsonl", _oasst1_rows(12))  # oasst1's own split name: ignored
    write_jsonl(tmp_path / "oasst_more.jsonl", _oasst1_rows(20)[48:])
    write_jsonl(tmp_path / "hh" / "pairs.jsonl", _chat_pairs(30))
    write_jsonl(
        tmp_path / "instructions.jsonl",
        [
            {
                "prompt": f"Instruction {i % 10}",
                "chosen": row["chosen"],
                "rejected": row["rejected"],
                "post_id": f"panda-{i}",
            }
            for i, row in enumerate(separable_pairs(40))
        ],
    )
    sources = [
        {"domain": "oasst1", "path": [str(tmp_path / "oasst"), str(tmp_path / "oasst_more.jsonl")]},
        {"domain": "hh", "path": str(tmp_path / "hh")},
        {"domain": "panda", "path": str(tmp_path / "instructions.jsonl")},
    ]
    kwargs.setdefault("min_score_ratio", None)
    return PreferenceDataModule(
        sources=sources,
        tokenizer_name_or_path=str(smol_tokenizer_dir),
        max_length=96,
        min_prompt_tokens=16,
        val_fraction=0.2,
        test_fraction=0.2,
        **kwargs,
    )


def test_sources_are_each_split_by_conversation_and_keep_their_domain(tmp_path, smol_tokenizer_dir, capsys):
    dm = sources_module(tmp_path, smol_tokenizer_dir, seed=1)
    dm.prepare()
    assert dm.domains == ["hh", "oasst1", "panda"]
    out = capsys.readouterr().out
    for domain, pairs in (("oasst1", 20 * 3), ("hh", 60), ("panda", 40)):
        assert f"source '{domain}': {pairs} pairs, split by conversation" in out
    sizes = {split: {d: list(ds["domain"]).count(d) for d in dm.domains} for split, ds in dm.datasets.items()}
    assert all(n > 0 for per_domain in sizes.values() for n in per_domain.values()), sizes
    assert sum(sizes[s]["panda"] for s in sizes) == 40 and sum(sizes[s]["hh"] for s in sizes) == 60
    # one conversation (oasst1 tree, HH opening, PandaLM instruction) is never in two splits
    trees = {s: {t for t in zip(ds["domain"], ds["message_tree_id"]) if t[1]} for s, ds in dm.datasets.items()}
    openings = {s: {(d, p[0]["content"]) for d, p in zip(ds["domain"], ds["prompt"])} for s, ds in dm.datasets.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not trees[a] & trees[b] and not openings[a] & openings[b]
    # a string prompt is one user turn; intervals resample conversations, not single pairs
    test = dm.datasets["test"]
    assert all(isinstance(p, list) and p[0]["role"] == "user" for p in test["prompt"])
    panda = [i for i, d in enumerate(test["domain"]) if d == "panda"]
    instructions = {test["prompt"][i][0]["content"] for i in panda}
    assert len({test["post_index"][i] for i in panda}) == len(instructions) < len(panda)
    # seeded: the same seed gives the same splits, another seed others
    again = sources_module(tmp_path, smol_tokenizer_dir, seed=1)
    again.prepare()
    posts = {s: list(d["post_id"]) for s, d in dm.datasets.items()}
    assert {s: list(d["post_id"]) for s, d in again.datasets.items()} == posts
    other = sources_module(tmp_path, smol_tokenizer_dir, seed=2)
    other.prepare(("test",))
    assert set(other.datasets["test"]["post_id"]) != set(dm.datasets["test"]["post_id"])
    assert dm.export_record()["sources"]["hh"] == [str(tmp_path / "hh")]


def test_the_sources_config_reads_the_real_samples_split_per_source(data_root, smol_tokenizer_dir, monkeypatch, capsys):
    import yaml

    monkeypatch.setenv("LIT_RLHF_DATA", str(data_root))
    config = Path(__file__).resolve().parents[2] / "configs" / "cpu" / "reward_model_sources.yaml"
    sources = yaml.safe_load(config.read_text())["data"]["init_args"]["sources"]
    assert [s["domain"] for s in sources] == ["oasst1", "hh_helpful", "pandalm"]
    dm = PreferenceDataModule(sources=sources, tokenizer_name_or_path=str(smol_tokenizer_dir))
    splits = dm._splits()
    assert {s: len(d) for s, d in splits.items()} == {"train": 3193, "validation": 381, "test": 394}
    out = capsys.readouterr().out
    assert "'oasst1': 1462 pairs" in out and "'hh_helpful': 1664 pairs" in out and "'pandalm': 842 pairs" in out


def test_prompts_without_a_user_turn_are_skipped_with_a_count(tmp_path, smol_tokenizer_dir, capsys):
    """#29: an empty message list or assistant-only messages ended in a chat-template traceback."""
    rows = separable_pairs(4) + [
        {"prompt": [], "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "assistant", "content": "Hello, how can I help?"}], "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go."},
    ]
    dm = datamodule(write_jsonl(tmp_path / "test.jsonl", rows), smol_tokenizer_dir)
    dm.prepare(("test",))
    assert len(dm.datasets["test"]) == 5
    assert "skipped: prompt without a user turn: 2" in capsys.readouterr().out


def test_bad_sources_name_the_file_the_column_or_the_clash(tmp_path, smol_tokenizer_dir, monkeypatch):
    good = write_jsonl(tmp_path / "src" / "good.jsonl", separable_pairs(4))
    write_jsonl(tmp_path / "src" / "broken.jsonl", [{"prompt": "q", "chosen": "a", "answer_b": "b"}])

    def module(sources, **kwargs):
        return PreferenceDataModule(sources=sources, tokenizer_name_or_path=str(smol_tokenizer_dir), **kwargs)

    with pytest.raises(UserInputError, match=r"broken\.jsonl' has columns .*lacks the column\(s\) \['rejected'\]"):
        module([{"domain": "mine", "path": str(tmp_path / "src")}]).prepare()
    shp = {k: v for k, v in shp_row("p", 0, "askvet", "train", 3.0, True).items() if k != "human_ref_B"}
    write_jsonl(tmp_path / "shp" / "x.jsonl", [shp])
    with pytest.raises(UserInputError, match=r"x\.jsonl' has columns .*\['human_ref_B'\] of SHP's"):
        module([{"domain": "shp", "path": str(tmp_path / "shp")}]).prepare()
    with pytest.raises(UserInputError, match="two sources named 'HH'"):
        module([{"domain": "hh", "path": str(good)}, {"domain": "HH", "path": str(good)}])
    with pytest.raises(UserInputError, match=r"exactly the keys `domain`"):
        module([{"name": "hh", "path": str(good)}])
    monkeypatch.delenv("NOT_SET_H32", raising=False)
    with pytest.raises(UserInputError, match=r"\['NOT_SET_H32'\], which are not set"):
        module([{"domain": "hh", "path": "$NOT_SET_H32/hh"}])
    with pytest.raises(UserInputError, match="not both"):
        module([{"domain": "hh", "path": str(good)}], path=str(good))
    # a single path's missing column is named too
    with pytest.raises(UserInputError, match=r"lacks the column\(s\) \['rejected'\]"):
        datamodule(tmp_path / "src" / "broken.jsonl", smol_tokenizer_dir).prepare()


def test_reward_model_set_up_prints_no_library_noise(tmp_path, smol_tokenizer_dir, tiny_llama_dir, capfd):
    """A new user's first reward-model run printed a dozen `datasets` progress bars (Generating, Filter,
    Map) and transformers' "score.weight MISSING" load report for the head it is about to train."""
    from lit_rlhf.models.hf import load_sequence_scorer

    dm = datamodule(make_shp_folder(tmp_path / "shp"), smol_tokenizer_dir, max_length=128)
    dm.setup("fit")
    load_sequence_scorer(str(tiny_llama_dir), pad_token_id=0)
    captured = capfd.readouterr()
    output = captured.out + captured.err
    assert "[lit_rlhf] train:" in output  # the data module's own counts still show
    for noise in ("Generating train split", "Filter:", "Map:", "MISSING", "LOAD REPORT"):
        assert noise not in output
