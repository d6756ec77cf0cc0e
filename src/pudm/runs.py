"""The run folder: atomic writes, checkpoints that a killed run resumes from, and safe loading.

Layout of a run folder::

    RUN/config.json          resolved configuration (written before the first step)
    RUN/metrics.jsonl        one JSON line per log tick
    RUN/checkpoints/step_N/  model.safetensors, ema.safetensors, state.pt, config.json
    RUN/samples.png          sample grid of the final (EMA) model
    RUN/pipeline/            the final model as a standard diffusers pipeline folder
    RUN/summary.json         written last: the run finished

Every file and folder is written under a temporary name, flushed to disk and renamed into place,
so a killed process never leaves a half-written checkpoint, config or pipeline.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pudm.errors import UsageError

CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
SUMMARY = "summary.json"
_STEP_PREFIX = "step_"


class RunError(UsageError):
    """A problem with a run folder that the user can fix (named in the message)."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync, and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, values: Any) -> None:
    """Strict JSON (non-finite numbers written as null), written atomically."""
    text = json.dumps(finite_or_none(values), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_write_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary folder with ``write(tmp)``, then rename it to ``path`` (replacing it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        _fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete what a killed writer left behind (``.NAME.tmp-PID``, ``.NAME.old-PID``,
    ``.NAME.trash-PID`` in the run folder and its checkpoints folder); complete files and folders
    are never touched.

    A kill between the two renames of :func:`atomic_write_dir` leaves ``NAME`` missing and its
    previous version in ``.NAME.old-PID``: that one is put back instead.
    """
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / CHECKPOINTS):
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            name = child.name
            if not name.startswith(".") or not any(tag in name for tag in (".tmp-", ".old-", ".trash-")):
                continue
            original = folder / name[1:].rsplit(".old-", 1)[0]
            if ".old-" in name and not original.exists():
                os.replace(child, original)
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
            removed.append(child)
    return removed


def read_json(path: Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a pudm run (its config.json is written before the first step)."""
    return (Path(run_dir) / CONFIG).is_file()


def is_complete(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` finished (summary.json is written last)."""
    return (Path(run_dir) / SUMMARY).is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        name = child.name
        if child.is_dir() and name.startswith(_STEP_PREFIX) and name[len(_STEP_PREFIX) :].isdigit():
            found.append(child)
    return sorted(found, key=lambda p: int(p.name[len(_STEP_PREFIX) :]))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``checkpoints/step_<step>`` atomically and keep only the newest ``keep``."""
    folder = Path(run_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{_STEP_PREFIX}{step:08d}"

    def write(tmp: Path) -> None:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors"
        )
        save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, tmp / "ema.safetensors")
        torch.save({**trainer_state, "step": step}, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    atomic_write_dir(target, write)
    for old in list_checkpoints(run_dir)[:-keep]:
        remove_dir(old)
    return target


def remove_dir(path: Path) -> None:
    """Delete a folder so that a kill midway never leaves a half-deleted one under its name: rename
    it to ``.NAME.trash-PID`` first (atomic), then delete that."""
    path = Path(path)
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint folder with safetensors and ``torch.load(weights_only=True)`` only.

    Raises:
        RunError: when the checkpoint is incomplete or cannot be read (tampered or corrupt).
    """
    path = Path(path)
    try:
        model = load_file(path / "model.safetensors")
        ema = load_file(path / "ema.safetensors")
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        config = read_json(path / "config.json")
    except Exception as error:  # any unreadable part makes the whole checkpoint unusable
        raise RunError(
            f"checkpoint {path} cannot be read ({type(error).__name__}): delete it to resume from "
            "an earlier one, or start again with --overwrite"
        ) from None
    return {"model": model, "ema": ema, "state": state, "config": config}


def finite_or_none(values: Any) -> Any:
    """``values`` with every non-finite float (NaN, inf) replaced by None, recursively.

    JSON has no NaN or Infinity: Python's ``json`` would write bare ``NaN`` tokens that ``jq`` and
    most other readers refuse.
    """
    if isinstance(values, float):
        return values if math.isfinite(values) else None
    if isinstance(values, dict):
        return {key: finite_or_none(value) for key, value in values.items()}
    if isinstance(values, (list, tuple)):
        return [finite_or_none(value) for value in values]
    return values


def append_jsonl(path: Path, values: dict[str, Any]) -> None:
    """Append one line of strict JSON (non-finite numbers written as null)."""
    line = json.dumps(finite_or_none(values), sort_keys=True, allow_nan=False)
    with open(path, "a") as handle:
        handle.write(line + "\n")
        handle.flush()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop log lines written after ``last_step`` (a resumed run logs those steps again)."""
    if not Path(path).exists():
        return
    kept = []
    for line in Path(path).read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


class RunFolder:
    """One run folder as train, sd and benchmark use it: checked before anything is written,
    made writable, cleared for ``overwrite``, and asked whether it holds a (complete) run.

    The messages name the command-line flags (``--out``, ``--resume``, ``--overwrite``); the
    Python API's keywords have the same names.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def holds_run(self) -> bool:
        return holds_run(self.path)

    @property
    def complete(self) -> bool:
        return is_complete(self.path)

    def check(self, resume: bool = False, overwrite: bool = False) -> None:
        """Raise :class:`UsageError` unless the folder can take this run (nothing is written)."""
        out = self.path
        if resume and overwrite:
            raise UsageError("--resume and --overwrite exclude each other: choose one")
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file: choose a folder path")
        if out.is_dir() and any(out.iterdir()) and not resume:
            if not self.holds_run:
                raise UsageError(f"--out {out} exists and is not a pudm run: choose an empty or new folder")
            if not overwrite:
                raise UsageError(
                    f"--out {out} already holds a run: pass --resume to continue it "
                    "or --overwrite to replace it"
                )

    def make_writable(self) -> None:
        """Create the folder and prove it takes a file, or raise a one-line :class:`UsageError`."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise UsageError(
                f"--out {self.path} is not writable ({error.strerror}): choose another folder"
            ) from None

    def clear(self) -> None:
        """``overwrite``: remove everything in the folder (the folder itself stays)."""
        for child in self.path.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
