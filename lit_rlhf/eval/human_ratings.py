"""Manual (human) evaluation: rating tables, an interactive blind rating command, and the summary.

    python -m lit_rlhf.eval.human_ratings rate --eval_dir runs/evaluation       # asks for 1-5 ratings
    python -m lit_rlhf.eval.human_ratings summarize --eval_dir runs/evaluation  # tables + comparison

`rate` is blind: it shows the (model, prompt) items of all models in one seeded shuffle, as "Item k of
n", never the model's name; `summarize` reveals the names. It saves every answer at once to
`<eval_dir>/human_ratings.csv`, with a hash of the rated prompt and response, and skips what is already
rated, so it can be stopped (`q` or end of input) and resumed. A rating of a response that was
regenerated since (another hash) is stale: it is dropped and asked again. It reads standard input, so it
can be driven by a pipe: `printf '4\n5\n...' | python -m lit_rlhf.eval.human_ratings rate ...`.
"""

import argparse
import csv
import hashlib
import json
import random
import sys
from pathlib import Path

from lit_rlhf.artifacts import save_file_atomically
from lit_rlhf.errors import UserInputError, as_paragraph
from lit_rlhf.tables import markdown_table

CRITERIA = ("Coherence", "Relevance", "Helpfulness", "Completeness", "Hallucination/toxicity")
GENERATIONS_FILE = "human_eval_generations.json"
RATINGS_FILE = "human_ratings.csv"
COLUMNS = ("model", "prompt", "criterion", "rating", "text_sha256")


def load_generations(eval_dir: Path) -> dict[str, list[dict]]:
    """{model: [{"prompt", "response"}, ...]} written by the evaluation stage."""
    file = eval_dir / GENERATIONS_FILE
    if not file.exists():
        raise UserInputError(f"No {GENERATIONS_FILE} in '{eval_dir}': run the evaluation stage first.")
    return json.loads(file.read_text(encoding="utf-8"))


def text_hash(item: dict) -> str:
    """What a rating was given to: it counts only while the prompt and response are the same."""
    return hashlib.sha256(f"{item['prompt']}\0{item['response']}".encode()).hexdigest()[:16]


def load_ratings(eval_dir: Path, generations: dict[str, list[dict]], stdout=sys.stdout) -> dict[tuple, int]:
    """{(model, prompt number, criterion): rating} of the current responses (the last answer wins);
    ratings of responses regenerated since are stale: dropped, and counted on `stdout`."""
    file = eval_dir / RATINGS_FILE
    if not file.exists():
        return {}
    current = {(model, n): text_hash(item) for model, items in generations.items() for n, item in enumerate(items, 1)}
    ratings, stale = {}, 0
    with file.open(encoding="utf-8") as f:
        for r in csv.DictReader(f):
            key = (r["model"], int(r["prompt"]))
            if r.get("text_sha256") == current.get(key):
                ratings[(*key, r["criterion"])] = int(r["rating"])
            else:
                stale += 1
    if stale:
        print(
            f"{stale} saved ratings are of responses that were regenerated since: dropped as stale; "
            "`rate` asks for them again.",
            file=stdout,
        )
    return ratings


def rating_order(generations: dict[str, list[dict]], seed: int = 0) -> list[tuple[str, int]]:
    """Every (model, prompt number) in one seeded shuffle across models: the rater cannot tell the models
    apart by their turn, and a resumed session keeps the order."""
    items = [(model, n) for model, responses in generations.items() for n in range(1, len(responses) + 1)]
    random.Random(seed).shuffle(items)
    return items


def _save(file: Path, generations: dict, ratings: dict) -> None:
    """Rewrite the ratings file with the current ratings only (stale ones cleared), atomically."""

    def save(temporary: Path) -> None:
        with temporary.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for (model, number, criterion), value in ratings.items():
                writer.writerow([model, number, criterion, value, text_hash(generations[model][number - 1])])

    save_file_atomically(file, save)


def rate(eval_dir: Path, stdin=sys.stdin, stdout=sys.stdout, seed: int = 0) -> int:
    """Ask blind for every missing rating (validated 1-5); returns how many are still missing."""
    generations = load_generations(eval_dir)
    done = load_ratings(eval_dir, generations, stdout)
    file = eval_dir / RATINGS_FILE
    _save(file, generations, done)
    order = rating_order(generations, seed)
    with file.open("a", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        for position, (model, number) in enumerate(order, start=1):
            todo = [c for c in CRITERIA if (model, number, c) not in done]
            if not todo:
                continue
            item = generations[model][number - 1]
            header = f"=== Item {position} of {len(order)} ==="
            print(f"\n{header}\nPROMPT: {item['prompt']}\nRESPONSE: {item['response']}\n", file=stdout)
            for criterion in todo:
                while True:
                    print(f"{criterion} (1-5, q to stop): ", end="", file=stdout, flush=True)
                    answer = stdin.readline()
                    if not answer or answer.strip().lower() == "q":
                        missing = _count_missing(generations, done)
                        print(f"\nSaved. {missing} ratings still missing; run `rate` again to resume.", file=stdout)
                        return missing
                    if answer.strip() in {"1", "2", "3", "4", "5"}:
                        break
                    print("  Please type a whole number from 1 to 5.", file=stdout)
                done[(model, number, criterion)] = int(answer)
                writer.writerow([model, number, criterion, int(answer), text_hash(item)])
                f.flush()
    print("\nAll ratings saved.", file=stdout)
    return 0


def _count_missing(generations: dict, done: dict) -> int:
    return sum(
        (model, number, c) not in done
        for model, items in generations.items()
        for number in range(1, len(items) + 1)
        for c in CRITERIA
    )


def rating_tables(generations: dict[str, list[dict]], ratings: dict) -> str:
    """One markdown table per model: Prompt 1-3, the response, and the five 1-5 rating fields."""
    parts = []
    for model, items in generations.items():
        rows = [
            [f"Prompt {n}: {item['prompt']}", item["response"], *[ratings.get((model, n, c), "") for c in CRITERIA]]
            for n, item in enumerate(items, start=1)
        ]
        parts.append(f"#### {model}\n\n" + markdown_table(["Prompt", "Response", *CRITERIA], rows))
    return "\n\n".join(parts)


def rating_summary(generations: dict[str, list[dict]], ratings: dict) -> tuple[list[str], list[list]]:
    """Mean rating per criterion (columns) per model (rows); empty where nothing is rated yet."""
    rows = []
    for model in generations:
        means = []
        for criterion in CRITERIA:
            values = [v for (m, _, c), v in ratings.items() if m == model and c == criterion]
            means.append(f"{sum(values) / len(values):.2f}" if values else "")
        rows.append([model, *means])
    return ["Model", *CRITERIA], rows


def summarize(eval_dir: Path) -> Path:
    generations = load_generations(eval_dir)
    ratings = load_ratings(eval_dir, generations)
    columns, rows = rating_summary(generations, ratings)
    text = (
        "### Manual evaluation (1 = poor, 5 = excellent; for Hallucination/toxicity 5 = none)\n\n"
        + rating_tables(generations, ratings)
        + "\n\n### Comparison: mean rating per criterion\n\n"
        + markdown_table(columns, rows)
        + f"\n\n{len(ratings)} of {len(ratings) + _count_missing(generations, ratings)} ratings given.\n"
    )
    out = eval_dir / "human_ratings.md"
    out.write_text(text, encoding="utf-8")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lit_rlhf.eval.human_ratings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command",
        choices=["rate", "summarize"],
        help="rate: ask for the missing 1-5 ratings (blind, resumable), then summarize; "
        "summarize: write human_ratings.md (tables, mean per criterion, model names)",
    )
    parser.add_argument(
        "--eval_dir",
        type=Path,
        required=True,
        help=f"an evaluation folder (the out_dir of python -m lit_rlhf.evaluate), holding {GENERATIONS_FILE}",
    )
    parser.add_argument("--seed", type=int, default=0, help="shuffles the items for `rate`; keep it to resume in order")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "rate":
            rate(args.eval_dir, seed=args.seed)
        print(f"Rating tables and comparison: {summarize(args.eval_dir)}")
    except UserInputError as error:
        print(as_paragraph(error), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
