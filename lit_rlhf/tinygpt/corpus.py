"""Read a plain-text corpus from the hub, a local folder/file, or a text shipped with Python.

Returns `{split: text}` with split names `train`, `validation`, `test` (whatever exists).
"""

from pathlib import Path

from lit_rlhf.data.files import load_hub_dataset
from lit_rlhf.errors import UserInputError, is_local_path, require_existing

PYDOC_TOPICS = "builtin:pydoc-topics"
_SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("valid", "validation", "val"),
    "test": ("test",),
}
_TEXT_SUFFIXES = {".raw", ".txt", ".tokens"}


def _split_of(file: Path) -> str | None:
    stem = file.name.lower()
    for split, aliases in _SPLIT_ALIASES.items():
        if any(f"{alias}." in stem or stem.startswith(f"{alias}-") for alias in aliases):
            return split
    return None


def _read_file(file: Path) -> str:
    if file.suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(file)
        if "text" not in frame.columns:
            raise UserInputError(f"{file} has no 'text' column (columns: {list(frame.columns)}).")
        return "".join(frame["text"].astype(str))
    try:
        return file.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as error:
        raise UserInputError(f"Could not read '{file}' as UTF-8 text: {error}") from error


def read_local(path: str) -> dict[str, str]:
    root = require_existing(path, "data.path")
    if root.is_file():
        return {_split_of(root) or "train": _read_file(root)}
    files = [f for f in sorted(root.iterdir()) if f.suffix in _TEXT_SUFFIXES | {".parquet"}]
    splits: dict[str, str] = {}
    for file in files:
        split = _split_of(file)
        if split is not None and split not in splits:
            splits[split] = _read_file(file)
    if not splits and len(files) == 1:
        splits["train"] = _read_file(files[0])
    if not splits:
        raise UserInputError(
            f"data.path '{path}' is a folder without a recognisable text file. Expected files such as "
            "wiki.train.raw / wiki.valid.raw / wiki.test.raw, train.txt / valid.txt, or *.parquet "
            "with a 'text' column."
        )
    return splits


def read_hub(path: str, name: str | None) -> dict[str, str]:
    dataset = load_hub_dataset(
        path,
        "Pass a local copy with --data.path <folder or file> (e.g. a folder with "
        "wiki.test.raw; CI uses $LIT_RLHF_DATA/wikitext-2-raw) or the offline text "
        f"--data.path {PYDOC_TOPICS}.",
        name,
    )
    return {split: "".join(dataset[split]["text"]) for split in dataset}


def read_pydoc_topics() -> dict[str, str]:
    """The Python reference documentation topics shipped with every CPython (real English prose)."""
    from pydoc_data.topics import topics

    return {"train": "\n\n".join(topics[key] for key in sorted(topics))}


def read_corpus(path: str, name: str | None = None) -> dict[str, str]:
    if path == PYDOC_TOPICS:
        return read_pydoc_topics()
    if is_local_path(path):
        return read_local(path)
    return read_hub(path, name)
