"""Run ``pudm ARGS`` in this process and SIGKILL it the N-th time it reaches a chosen point.

    python tests/killpoint.py POINT N pudm-args...      (POINT "none": run to the end)

Each point is a phase of a training step, of a checkpoint write, of a resume or of the end of a
run (``POINTS``); the test that drives this (``test_reliability.py``) kills a run at every one in
turn and checks that the resumed run ends with exactly the weights and metrics of a run that was
never killed. One intra-op thread, so every process of the test computes alike.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap(owner, name: str, when: str, nth: int) -> None:
    """Replace ``owner.name`` so that its ``nth`` call dies before or after the real one."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        hit = calls["n"] == nth
        if hit and when == "before":
            _die()
        result = real(*args, **kwargs)
        if hit and when == "after":
            _die()
        return result

    setattr(owner, name, wrapper)


def _half_a_line(nth: int) -> None:
    """The nth metrics line: half of it written, then the kill."""
    from pudm import runs

    real, calls = runs.append_jsonl, {"n": 0}

    def append(path, values):
        calls["n"] += 1
        if calls["n"] != nth:
            return real(path, values)
        with open(path, "a") as handle:
            handle.write('{"step": ')
        _die()

    runs.append_jsonl = append


def _between_rename_and_delete(nth: int) -> None:
    """The nth old checkpoint rotated out: renamed to its trash name, not yet deleted."""
    from pudm import runs

    real, calls = runs.remove_dir, {"n": 0}

    def remove(path):
        calls["n"] += 1
        if calls["n"] != nth:
            return real(path)
        os.replace(path, path.with_name(f".{path.name}.trash-{os.getpid()}"))
        _die()

    runs.remove_dir = remove


def install(point: str, nth: int) -> None:
    import torch

    from pudm import runs, tasks, training

    simple = {
        # a step: the gradients are computed, the weights not yet updated
        "optimizer-step": (torch.optim.AdamW, "step", "before"),
        # a step: the weights updated, their EMA not yet
        "ema-update": (training, "update_ema", "before"),
        # a checkpoint: model.safetensors written in its temporary folder, nothing else
        "checkpoint-model": (runs, "save_file", "after"),
        # a checkpoint: state.pt written, config.json not
        "checkpoint-state": (torch, "save", "after"),
        # a checkpoint: complete in its temporary folder, not yet renamed into place
        "checkpoint-rename": (runs, "_fsync_tree", "after"),
        # a resume: before the metrics past the checkpoint are dropped
        "resume-truncate": (runs, "truncate_metrics", "before"),
        # the end: the pipeline written in its temporary folder, not yet renamed
        "pipeline": (tasks, "save_pipeline", "after"),
        # the end: everything but summary.json, which marks a complete run
        "summary": (runs, "atomic_write_json", "before"),
    }
    if point in simple:
        _wrap(*simple[point], nth)
    elif point == "metrics-line":
        _half_a_line(nth)
    elif point == "checkpoint-rotate":
        _between_rename_and_delete(nth)
    elif point != "none":
        raise SystemExit(f"unknown kill point {point!r}")


POINTS = (
    "metrics-line",
    "checkpoint-model",
    "checkpoint-state",
    "checkpoint-rename",
    "checkpoint-rotate",
    "optimizer-step",
    "ema-update",
    "resume-truncate",
    "pipeline",
    "summary",
)

if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    point, nth, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    install(point, nth)
    from pudm.cli import main

    sys.exit(main(args))
