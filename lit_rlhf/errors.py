"""One exception type for problems the user can fix; the CLI prints it as a paragraph, not a trace."""

import os
from pathlib import Path


class UserInputError(RuntimeError):
    """Bad input (missing data, offline hub, bad path, empty dataset...). The message says what to do."""


def data_root() -> Path | None:
    """Where the real data samples live (``LIT_RLHF_DATA``), if set."""
    root = os.environ.get("LIT_RLHF_DATA")
    return Path(root) if root else None


def is_local_path(path: str) -> bool:
    """A path-looking string (absolute, ./, ../, ~ or an existing file) rather than a hub id."""
    return (
        path.startswith(("/", "./", "../", "~"))
        or os.path.exists(path)
        or Path(path).suffix in {".json", ".jsonl", ".parquet", ".txt", ".raw", ".npz", ".csv"}
    )


def require_existing(path: str, what: str) -> Path:
    """Resolve a local path or raise a clear error naming what was expected there."""
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise UserInputError(
            f"{what}: the local path '{path}' does not exist (resolved to '{resolved.resolve()}'). "
            "Check the spelling, or pass a hub id instead of a path when you are online."
        )
    return resolved


def hub_unreachable(kind: str, hub_id: str, error: Exception, local_hint: str) -> UserInputError:
    """The error raised when a hub id cannot be fetched (offline machine, no cache)."""
    return UserInputError(
        f"Could not load the {kind} '{hub_id}' from the Hugging Face Hub and it is not in the local "
        f"cache ({type(error).__name__}: {str(error).splitlines()[0][:200]}). This machine is probably "
        f"offline. {local_hint}"
    )


class NonFiniteError(UserInputError):
    """A loss, reward or KL became NaN/inf: stop instead of training on garbage."""
