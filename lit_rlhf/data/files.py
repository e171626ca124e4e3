"""Local table files (JSON / JSONL / parquet) as `datasets.load_dataset` reads them."""

from pathlib import Path

from lit_rlhf.errors import UserInputError, require_existing

TABLE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def local_table_files(path: str, what: str) -> tuple[str, list[Path]]:
    """(`datasets` builder name, files) of one such file or a folder of them, all in one format."""
    root = require_existing(path, what)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.suffix in TABLE_FORMATS)
    formats = {TABLE_FORMATS.get(f.suffix) for f in files}
    if not files or None in formats or len(formats) > 1:
        raise UserInputError(
            f"{what} '{path}' must be a .json/.jsonl/.parquet file or a folder of such files in one "
            f"format; found {[f.name for f in files][:5] or 'no such file'}."
        )
    return formats.pop(), files
