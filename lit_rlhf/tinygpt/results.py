"""The reference report's results table (pre-training vs SFT vs RL-lite on TinyGPT), built from the
runs' own `metrics.csv` files.

    python -m lit_rlhf.tinygpt.results --pretrain runs/pretrain_tinygpt --sft runs/sft_tinygpt \
        --rl runs/rl_lite --out runs/tinygpt_results [--wandb]

A run folder is a trainer.default_root_dir; all its `csv/version_*` are read (a resumed run whole).
The keyword rate is measured by RL-lite's own samples: the RL row holds the mean over its last `window`
steps, and the row of the run RL-lite started from (its `init_from`) the mean over its first `window` steps.
"""

import argparse
import math
import sys
from pathlib import Path

import pandas as pd
import yaml

from lit_rlhf.errors import UserInputError, as_paragraph
from lit_rlhf.eval.runs import latest_version, read_metrics
from lit_rlhf.tables import markdown_table
from lit_rlhf.tracking import wandb_mode

COLUMNS = ["Method", "Final_Train_Loss", "Val_Loss", "Perplexity", "BLEU", "Keyword_Rate", "Notes"]


def read_hparams(run_dir: str | Path) -> dict:
    file = latest_version(run_dir) / "hparams.yaml"
    return (yaml.safe_load(file.read_text()) or {}) if file.is_file() else {}


def last(metrics: pd.DataFrame, key: str) -> float:
    values = metrics[key].dropna() if key in metrics else ()
    return float(values.iloc[-1]) if len(values) else math.nan


def window_mean(metrics: pd.DataFrame, key: str, n: int, tail: bool) -> float:
    values = metrics[key].dropna() if key in metrics else pd.Series(dtype=float)
    values = values.tail(n) if tail else values.head(n)
    return float(values.mean()) if len(values) else math.nan


def _lm_row(method: str, metrics: pd.DataFrame, notes: list[str]) -> dict:
    val_loss = last(metrics, "val/loss")
    steps = int(metrics["step"].max()) + 1 if "step" in metrics else 0
    return {
        "Method": method,
        "Final_Train_Loss": last(metrics, "train/loss"),
        "Val_Loss": val_loss,
        "Perplexity": math.exp(val_loss) if not math.isnan(val_loss) else math.nan,
        "BLEU": math.nan,
        "Keyword_Rate": math.nan,
        "Notes": "; ".join([*notes, f"{steps} steps"]),
    }


def _started_from(init_from: str | None, run_dir: str | Path | None) -> bool:
    if not init_from or run_dir is None:
        return False
    return Path(run_dir).resolve() in Path(init_from).resolve().parents


def results_table(
    pretrain: str | Path | None = None,
    sft: str | Path | None = None,
    rl: str | Path | None = None,
    window: int = 10,
) -> pd.DataFrame:
    """One row per given run, in the report's columns (BLEU is character-level corpus BLEU, 0..1;
    losses are per character, nats; Perplexity = exp(Val_Loss))."""
    rows = {}
    if pretrain is not None:
        m = read_metrics(pretrain)
        notes = ["char LM, all characters", f"val bpc {last(m, 'val/bpc'):.3f}"]
        if "train/tokens_per_sec" in m:
            notes.append(f"{m['train/tokens_per_sec'].dropna().median():.0f} tokens/s")
        rows["pretrain"] = _lm_row("Pre-training", m, notes)
    if sft is not None:
        m = read_metrics(sft)
        row = _lm_row(
            "SFT",
            m,
            [
                "instruction->answer, loss on answer characters only",
                f"BLEU word {last(m, 'val/bleu_word'):.3f}",
                f"chrF {last(m, 'val/chrf'):.3f}",
            ],
        )
        row["BLEU"] = last(m, "val/bleu_char")
        rows["sft"] = row
    if rl is not None:
        m = read_metrics(rl)
        init_from = read_hparams(rl).get("init_from")
        start, end = (window_mean(m, "train/keyword_rate", window, tail) for tail in (False, True))
        for key, run in (("sft", sft), ("pretrain", pretrain)):
            if key in rows and _started_from(init_from, run):
                rows[key]["Keyword_Rate"] = start
                rows[key]["Notes"] += f"; keyword rate = RL-lite's first {window} steps"
                break
        steps = int(m["step"].max()) + 1 if "step" in m else 0
        rows["rl"] = {
            "Method": "RL-lite (REINFORCE)",
            "Final_Train_Loss": math.nan,
            "Val_Loss": math.nan,
            "Perplexity": math.nan,
            "BLEU": math.nan,
            "Keyword_Rate": end,
            "Notes": (
                f"keyword rate {start:.3f} -> {end:.3f} (first/last {window} steps); "
                f"training reward {window_mean(m, 'train/reward', window, False):.3f} -> "
                f"{window_mean(m, 'train/reward', window, True):.3f}; "
                f"KL to start {window_mean(m, 'train/kl', window, True):.4f} nats/char; "
                f"distinct char frac {window_mean(m, 'train/distinct_char_frac', window, False):.3f} -> "
                f"{window_mean(m, 'train/distinct_char_frac', window, True):.3f}; {steps} steps"
            ),
        }
    if not rows:
        raise UserInputError("Give at least one run folder (--pretrain, --sft or --rl).")
    return pd.DataFrame(list(rows.values()), columns=COLUMNS)


def to_markdown(table: pd.DataFrame) -> str:
    def cell(value):
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.4f}"
        return value

    return markdown_table(COLUMNS, [[cell(v) for v in row] for row in table[COLUMNS].itertuples(index=False)])


def log_wandb_table(table: pd.DataFrame, key: str = "results/tinygpt") -> bool:
    """Log the table to the active W&B run, if there is one."""
    import wandb

    if wandb.run is None:
        return False
    wandb.run.log({key: wandb.Table(dataframe=table)})
    return True


def write_results(table: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """`tinygpt_results.md` and `.csv` in `out_dir`, and the table in the active W&B run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "tinygpt_results.md", "csv": out / "tinygpt_results.csv"}
    paths["markdown"].write_text(to_markdown(table) + "\n", encoding="utf-8")
    table.to_csv(paths["csv"], index=False)
    log_wandb_table(table)
    return paths


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain", help="pretrain_tinygpt run folder (trainer.default_root_dir)")
    parser.add_argument("--sft", help="sft_tinygpt run folder")
    parser.add_argument("--rl", help="rl_lite run folder")
    parser.add_argument("--out", required=True, help="folder for tinygpt_results.{md,csv}")
    parser.add_argument("--window", type=int, default=10, help="steps averaged for the start/end keyword rate")
    parser.add_argument("--wandb", action="store_true", help="also log the table to an offline W&B run in --out")
    args = parser.parse_args(argv)
    try:
        table = results_table(args.pretrain, args.sft, args.rl, args.window)
    except UserInputError as error:
        print(as_paragraph(error), file=sys.stderr)
        sys.exit(2)
    if args.wandb:
        import wandb

        Path(args.out).mkdir(parents=True, exist_ok=True)
        with wandb.init(project="lit_rlhf", group="tinygpt_results", dir=args.out, mode=wandb_mode()):
            paths = write_results(table, args.out)
    else:
        paths = write_results(table, args.out)
    print(to_markdown(table))
    print(f"\nwrote {paths['markdown']} and {paths['csv']}")
    return table


if __name__ == "__main__":
    main()
