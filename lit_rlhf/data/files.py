"""Local table files (JSON / JSONL / parquet) as `datasets.load_dataset` reads them."""

from pathlib import Path

from lit_rlhf.errors import UserInputError, require_existing

TABLE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")  # JSON files `datasets` decompresses on the fly


def table_format(file: Path) -> str | None:
    """The `datasets` builder of a table file (`x.jsonl`, `x.jsonl.gz`, `x.parquet`), or None."""
    suffixes = file.suffixes[-2:] if file.suffix in COMPRESSION else file.suffixes[-1:]
    builder = TABLE_FORMATS.get(suffixes[0]) if suffixes else None
    return None if builder == "parquet" and len(suffixes) == 2 else builder


def local_table_files(path: str, what: str) -> tuple[str, list[Path]]:
    """(`datasets` builder name, files) of one such file or a folder of them, all in one format."""
    root = require_existing(path, what)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if table_format(f))
    formats = {table_format(f) for f in files}
    if not files or None in formats or len(formats) > 1:
        raise UserInputError(
            f"{what} '{path}' must be a .json/.jsonl (optionally .gz) or .parquet file or a folder of such files in one "
            f"format; found {[f.name for f in files][:5] or 'no such file'}."
        )
    return formats.pop(), files
