"""W&B's mode, decided in one place for every logger and report: offline unless the user asks otherwise.

The mode is passed to `wandb.init(mode=...)` itself. Lightning's `WandbLogger(offline=True)` only sets
`WANDB_MODE=dryrun`, which wandb 0.31 no longer treats as offline (it asks for an API key), and a later
rename would break it again; an explicit `mode` is W&B's documented argument.
"""

import os

from lit_rlhf.errors import UserInputError

MODES = ("online", "offline", "disabled", "shared")
ALIASES = {"dryrun": "offline", "run": "online"}  # W&B's older names


def wandb_mode(offline: bool | None = True) -> str:
    """`WANDB_MODE` when the user set it (W&B's own variable), else `offline` for a logger configured
    `offline: true` (every config of this project) and `online` for one configured `offline: false`."""
    value = os.environ.get("WANDB_MODE", "").strip().lower()
    if not value:
        return "offline" if offline or offline is None else "online"
    value = ALIASES.get(value, value)
    if value not in MODES:
        raise UserInputError(
            f"WANDB_MODE={os.environ['WANDB_MODE']!r} is not a W&B mode: set it to one of {', '.join(MODES)} "
            "(offline is the default when WANDB_MODE is unset), or unset it."
        )
    return value
