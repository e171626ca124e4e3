"""A side virtual environment holding `trl==0.29.1` (the last TRL with a PPO trainer) for the
reference side of `bench_ppo.py`, so the project's own `trl` (1.x) stays as it is.

The side environment sees the project's environment through a `.pth` hook and only adds TRL 0.29.1
(`--no-deps`) in front of it: both sides of the benchmark run the very same torch, transformers,
peft and accelerate, and the install takes seconds. Cached in `$LIT_RLHF_CACHE/bench-trl-0.29.1`.
"""

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from lit_rlhf.models.hf import cache_dir

TRL_REFERENCE = "trl==0.29.1"


def trl_python() -> Path:
    """The side environment's python, created on first use."""
    folder = cache_dir() / "bench-trl-0.29.1"
    python = folder / "bin" / "python"
    if python.exists() and _has_trl(python):
        return python
    print(f"[bench] creating {folder} with {TRL_REFERENCE} (once)...", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    site_packages = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # `import` lines in a .pth run at start-up: addsitedir also runs the project env's own .pth
    # files (the editable lit_rlhf install) and appends it after the side env's site-packages.
    (site_packages / "project_env.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
    )
    subprocess.check_call([python, "-m", "pip", "install", "-q", "--no-deps", TRL_REFERENCE])
    if not _has_trl(python):
        raise RuntimeError(f"{TRL_REFERENCE} did not install into {folder}")
    return python


def _has_trl(python: Path) -> bool:
    probe = "import trl, sys; from trl.experimental.ppo import PPOTrainer; sys.exit(trl.__version__ != '0.29.1')"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


if __name__ == "__main__":
    print(trl_python())
    sys.exit(0)
