"""Errors the user can fix and the helpers that turn bad input into them; the commands print them
as one paragraph (`as_paragraph`), not a trace."""

import os
import pickle
import textwrap
from pathlib import Path

import torch


class UserInputError(RuntimeError):
    """Bad input (missing data, offline hub, bad path, empty dataset...). The message says what to do."""


def as_paragraph(error: Exception) -> str:
    """What the commands print: one paragraph of 100 columns that never breaks a path (they hold
    hyphens) or a long word, so paths can be copied from the terminal."""
    return textwrap.fill(f"lit_rlhf error: {error}", width=100, break_on_hyphens=False, break_long_words=False)


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


def reason(error: Exception) -> str:
    """One line naming a library error, for a message that stays one paragraph (library messages
    often span many lines; a refused weights-only load hides its cause in the middle)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
    if line.endswith(":") and len(lines) > 1:  # "Error(s) in loading state_dict for X:" names nothing yet
        line = f"{line} {lines[1]}"
    line = line.split(". ")[0].removesuffix(".")  # the first sentence; the rest is generic advice
    return f"{type(error).__name__}: {line[:300]}" if line else type(error).__name__


def hub_unreachable(kind: str, hub_id: str, error: Exception, local_hint: str) -> UserInputError:
    """The error raised when a hub id cannot be fetched (offline machine, no cache)."""
    return UserInputError(
        f"Could not load the {kind} '{hub_id}' from the Hugging Face Hub and it is not in the local "
        f"cache ({reason(error)}). This machine is probably offline. {local_hint}"
    )


def not_a_checkpoint_file(path: str | Path, what: str) -> UserInputError:
    """The error for a run folder given where a checkpoint file is expected, naming the file inside
    it that was probably meant (the newest `last*.ckpt`, else the newest `.ckpt`)."""
    checkpoints = sorted(Path(path).expanduser().rglob("*.ckpt"), key=lambda f: f.stat().st_mtime, reverse=True)
    last = [f for f in checkpoints if f.name.startswith("last")]
    if last or checkpoints:
        hint = f"Pass the checkpoint file inside it, probably '{(last or checkpoints)[0]}'."
    else:
        hint = "It holds no .ckpt file: pass a checkpoint file, e.g. <run folder>/checkpoints/last.ckpt."
    return UserInputError(f"{what}: '{path}' is a folder, not a checkpoint file. {hint}")


def load_checkpoint(path: str | Path, what: str) -> dict:
    """A Lightning checkpoint read with `weights_only=True` (a checkpoint is data: loading it must
    not run code), or one clear error for a missing, truncated or foreign file, or a folder."""
    file = require_existing(str(path), what)
    if file.is_dir():
        raise not_a_checkpoint_file(path, what)
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zips, garbage bytes and refused pickles share no base class
        if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error):
            fix = (
                "It holds Python objects that a weights-only load refuses: it was written by other code or an "
                "older version of this project. Pass a checkpoint written by this project's stages."
            )
        else:
            fix = "The file is truncated or corrupt (an interrupted save or copy): copy it again or use an earlier one."
        raise UserInputError(f"{what}: '{path}' is not a readable checkpoint ({reason(error)}). {fix}") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserInputError(f"{what}: '{path}' is not a Lightning checkpoint (it holds no state_dict).")
    return checkpoint


class NonFiniteError(UserInputError):
    """A loss, reward or KL became NaN/inf: stop instead of training on garbage."""


LOWER_LR = "Lower the learning rate or use fp32 (trainer.precision: 32-true)."


def require_finite(name: str, value: torch.Tensor, step: int, fix: str = LOWER_LR) -> None:
    """Raise `NonFiniteError` when a loss or reward holds NaN/inf: a run that goes on would only
    optimise garbage and overwrite good checkpoints with it."""
    finite = torch.isfinite(value)
    if not finite.all():
        shown = value.tolist() if value.numel() <= 8 else f"NaN/inf in {int((~finite).sum())} of {value.numel()}"
        raise NonFiniteError(f"{name} = {shown} at step {step}. {fix} The run stopped instead of training on NaN/inf.")
