"""The processes a run trains on (accelerate), and the experiment trackers that mirror its metrics.

The same command trains on one CPU, one GPU or many processes (``accelerate launch``): accelerate
owns the process group and the devices; this module sets it up for pudm's runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState

from pudm.errors import UsageError

TRACKERS = ("tensorboard", "wandb")
LOGS = "logs"  # RUN/logs/: what the trackers write (TensorBoard: RUN/logs/pudm, wandb: RUN/logs/wandb)


def launched_on_cpus() -> bool:
    """True for a multi-process launch (``accelerate launch``, torchrun) on a machine without GPUs.

    accelerate makes such a launch data-parallel over gloo only when asked for the CPU; otherwise
    every process would silently train alone on its own copy. (The launcher's ``WORLD_SIZE`` is
    how a process learns it was launched with others; it is the launcher's, not a setting.)
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def process_state() -> PartialState:
    """accelerate's process state (rank, world size), set up for CPU-only launches too."""
    return PartialState(cpu=launched_on_cpus())


def check_trackers(report_to: str) -> list[str]:
    """``--report-to``: none, tensorboard, wandb or all; a tracker that is not installed is a
    one-line error naming the extra that brings it."""
    import importlib.util

    if report_to not in ("none", "all", *TRACKERS):
        raise UsageError(f"--report-to must be none, tensorboard, wandb or all, got {report_to!r}")
    wanted = [] if report_to == "none" else list(TRACKERS) if report_to == "all" else [report_to]
    for name in wanted:
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"--report-to {name}: {name} is not installed: pip install 'pudm[{name}]'")
    return wanted


def tracker_config(config) -> dict:
    """The run's config flattened for a tracker's hyperparameters (scalars and strings only)."""
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items() if isinstance(values, dict) else [("", values)]:
            name = f"{section}.{key}" if key else section
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def make_accelerator(
    mixed_precision: str, trackers: list[str] | None = None, run_dir: Path | None = None
) -> Accelerator:
    """An Accelerator with this run's autocast dtype (and its trackers, logging into RUN/logs).

    accelerate keeps one process-wide state and refuses a second precision; a process that trains
    several runs (a benchmark, a notebook) gets each run's own. The process group is kept.
    """
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=launched_on_cpus(),
        log_with=trackers or None,
        project_dir=run_dir / LOGS if trackers else None,
    )
