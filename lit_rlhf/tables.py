"""Tables of text (samples, previews) to the console, every W&B logger, and a file in the run folder.

(Formerly `lit_rlhf/logging.py`: renamed for what it does, and so as not to shadow the stdlib `logging`.)
"""

import json
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


def run_dir(trainer: Trainer) -> Path:
    return Path(trainer.default_root_dir)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", "⏎")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@rank_zero_only
def log_table(trainer: Trainer, key: str, columns: list[str], rows: list[list], echo: bool = True) -> None:
    """Log a text table to W&B, append it (with the step) to `<run>/samples/<key>.jsonl`, print it."""
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_text(key=key, columns=columns, data=[[str(v) for v in row] for row in rows], step=step)
    out = run_dir(trainer) / "samples" / f"{key.replace('/', '_')}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"step": step, **dict(zip(columns, map(str, row)))}, ensure_ascii=False) + "\n")
    if echo:
        print(f"\n[{key} @ step {step}]\n{markdown_table(columns, rows)}\n")
