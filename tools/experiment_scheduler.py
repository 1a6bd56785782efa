"""The TensLoRA+ seed's experiment scheduler, on tenslora: ``python tools/experiment_scheduler.py``.

Runs the seed's kind of ablation queue, ``tools/ablation.yaml`` (constructions x ranks x core
learning-rate multipliers, 3 seeds), through ``tenslora sweep run``: jobs are spread over the GPUs
found (placed by free memory, several per GPU when the file declares ``memory_gb``) or over CPU
slots, each with its own log, retried on failure, and skipped when already done (rerun to resume).

    python tools/experiment_scheduler.py [SWEEP_FILE] [tenslora sweep run options]
    python tools/experiment_scheduler.py --dry-run            # the jobs and their commands
    python tools/experiment_scheduler.py --dir sweeps/mine --slots 2 --cpu

Everything after the optional SWEEP_FILE goes to ``tenslora sweep run`` (``--dir``, ``--slots``,
``--cpu``, ``--backend ray``, ``--retry-failed``, ``--dry-run``; see ``tenslora sweep run --help``).
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = REPO_ROOT / "tools" / "ablation.yaml"


def sweep_argv(args: list[str]) -> list[str]:
    """``tenslora`` arguments: ``sweep run SWEEP_FILE ...`` (the default file unless one is given first)."""
    if not args or args[0].startswith("-"):
        args = [str(DEFAULT_SWEEP), *args]
    return ["sweep", "run", *args]


def main() -> None:
    if (REPO_ROOT / "tenslora" / "__init__.py").is_file() and str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # this checkout's tenslora, from any cwd
    from tenslora.cli import main as tenslora_main
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)  # then tenslora sweep run's own help
    sys.argv = ["tenslora", *sweep_argv(sys.argv[1:])]
    tenslora_main()


if __name__ == "__main__":
    main()
