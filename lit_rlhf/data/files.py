"""Data sources as `datasets.load_dataset` reads them. Local table files (JSON / JSONL / parquet):
the one reader of every local oasst1, preference and pairs source, so an empty, truncated or corrupt
file is named (with its line, for JSON) instead of surfacing as a `datasets` traceback. Hub ids: one
loader whose failure offline says which local copy to pass instead."""

import bz2
import gzip
import json
import lzma
from collections.abc import Callable
from pathlib import Path

from lit_rlhf.errors import UserInputError, hub_unreachable, reason, require_existing

TABLE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")  # JSON files `datasets` decompresses on the fly
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # .zst: not checked, `datasets` reports it
_BROKEN = "truncated or corrupt (an interrupted download or copy): copy it again, fix it, or leave it out"


def load_hub_dataset(hub_id: str, local_hint: str, name: str | None = None):
    """`datasets.load_dataset(hub_id, name)`; offline without a cached copy, one paragraph ending in
    `local_hint` (the local path to pass instead)."""
    from datasets import load_dataset

    try:
        return load_dataset(hub_id, name)
    except (ConnectionError, OSError, ValueError) as error:
        raise hub_unreachable("dataset", f"{hub_id}/{name}" if name else hub_id, error, local_hint) from error


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
            f"{what} '{path}' must be a .json/.jsonl (optionally .gz) or .parquet file or a folder of such files "
            "in one "
            f"format; found {[f.name for f in files][:5] or 'no such file'}."
        )
    return formats.pop(), files


def read_local_tables(path: str, what: str, split_of: Callable[[Path], str] = lambda file: "train") -> dict:
    """`{split: datasets.Dataset}` of a local file or folder, each file in the split `split_of` names.

    `datasets` answers an empty file with a bare StopIteration and a broken line with an error that
    names neither file nor line: both are checked here and named in one `UserInputError`.
    """
    from datasets import load_dataset

    builder, files = local_table_files(path, what)
    for file in files:
        if _is_empty(file):
            raise UserInputError(
                f"{_subject(path, what, file)} is empty. An interrupted download or copy leaves an empty file: "
                "copy it again, or leave it out of the folder."
            )
    data_files: dict[str, list[str]] = {}
    for file in files:
        data_files.setdefault(split_of(file), []).append(str(file))
    try:
        return dict(load_dataset(builder, data_files=data_files))
    except Exception as error:  # StopIteration, ArrowInvalid, DatasetGenerationError...: no common base
        raise _unreadable(path, what, builder, files, error) from error


def _subject(path: str, what: str, file: Path) -> str:
    return f"{what} '{path}'" if Path(path).expanduser().is_file() else f"{what} '{path}': the file '{file}'"


def _open(file: Path):
    """The file's (decompressed) bytes, or None for a compression this module does not read."""
    if file.suffix in COMPRESSION:
        opener = _OPENERS.get(file.suffix)
        return opener(file, "rb") if opener else None
    return file.open("rb")


def _is_empty(file: Path) -> bool:
    """No bytes, or (JSON) nothing but whitespace."""
    if file.stat().st_size == 0:
        return True
    stream = _open(file) if table_format(file) == "json" else None
    if stream is None:
        return False
    with stream:
        try:
            return not stream.read(4096).strip() and not stream.read(1)
        except (OSError, EOFError, lzma.LZMAError):  # a broken archive: named by `_unreadable` after the load
            return False


def _unreadable(path: str, what: str, builder: str, files: list[Path], error: Exception) -> UserInputError:
    """The error naming the first file (and line) that cannot be parsed, else the library's reason."""
    for file in files:
        problem = _json_problem(file) if builder == "json" else _parquet_problem(file)
        if problem:
            return UserInputError(f"{_subject(path, what, file)} cannot be read{problem}. The file is {_BROKEN}.")
    innermost = error
    while innermost.__cause__ or innermost.__context__:
        innermost = innermost.__cause__ or innermost.__context__
    return UserInputError(
        f"{what} '{path}' could not be read as {builder} ({reason(innermost)}). Check that every file in it holds "
        "rows with the same columns and types."
    )


def _json_problem(file: Path) -> str | None:
    """' at line N (the parser's complaint)' for the first line that is not a JSON object (JSON lines),
    or the parser's position in a whole-file JSON array; None when the file parses."""
    stream = _open(file)
    if stream is None:
        return None
    try:
        with stream:
            text = stream.read().decode("utf-8")
    except (OSError, EOFError, lzma.LZMAError) as error:  # a truncated .gz/.bz2/.xz archive
        return f" as a {file.suffix} archive ({reason(error)})"
    except UnicodeDecodeError as error:
        return f" as UTF-8 text ({reason(error)})"
    if text.lstrip().startswith("["):  # one JSON document: an array of rows
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            return f" at line {error.lineno}, column {error.colno} ({error.msg})"
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return f" at line {number} ({error.msg}: each line must be one complete JSON object)"
        if not isinstance(row, dict):
            return f' at line {number} (a {type(row).__name__}, not a JSON object {{"column": value, ...}})'
    return None


def _parquet_problem(file: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(file)
    except Exception as error:  # pyarrow raises ArrowInvalid or OSError for a broken footer
        return f" as parquet ({reason(error)})"
    return None
