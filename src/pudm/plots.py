"""Benchmark figures (matplotlib, no display): sample grids, rate vs FID, training curves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pudm.evaluation import EVAL_GRID, FID_CLASSIFIER


def _save(figure, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    figure.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_benchmark(out: Path, cells: list, evals: dict[str, dict]) -> None:
    """grids.png, rate_vs_fid.png and training_curves.png of a benchmark folder. The grids and
    curves come from the run folder of each method's first cell that has one; where a method has
    none (cells reused from results.json) the existing pictures are kept rather than redrawn with
    a hole."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(cell.label for cell in cells))
    colours = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    shown = {}
    for cell in cells:
        if (out / "runs" / cell.name).is_dir():
            shown.setdefault(cell.label, cell)
    complete = len(shown) == len(labels)
    for cell in cells:
        shown.setdefault(cell.label, cell)
    if complete or not (out / "grids.png").is_file():
        _plot_grids(out, labels, shown, evals)
    _plot_rate_vs_fid(out, labels, colours, cells, evals)
    if complete or not (out / "training_curves.png").is_file():
        _plot_curves(out, labels, colours, shown)


def _plot_grids(out: Path, labels: list, shown: dict, evals: dict[str, dict]) -> None:
    """Sample grids of one seed of every method, side by side."""
    import matplotlib.pyplot as plt
    from PIL import Image

    figure, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3.6), squeeze=False)
    for axis, label in zip(axes[0], labels, strict=True):
        cell = shown[label]
        grid = out / "runs" / cell.name / EVAL_GRID
        if grid.is_file():
            axis.imshow(np.asarray(Image.open(grid)), cmap="gray")
        rate = evals[cell.name]["non_sensitive_rate"]
        axis.set_title(f"{label}, seed {cell.seed}\nrate {rate:.3f}", fontsize=9)
        axis.axis("off")
    figure.suptitle("samples", fontsize=10)
    _save(figure, out / "grids.png")
    plt.close(figure)


def _plot_rate_vs_fid(out: Path, labels: list, colours: dict, cells: list, evals: dict[str, dict]) -> None:
    """Non-sensitive rate against FID, one point per cell."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4))
    for label in labels:
        points = [evals[c.name] for c in cells if c.label == label]
        axis.scatter(
            [p["fid_classifier"] for p in points],
            [p["non_sensitive_rate"] for p in points],
            color=colours[label],
            label=label,
        )
    axis.set_xlabel(f"{FID_CLASSIFIER} (lower is better)")
    axis.set_ylabel("non-sensitive rate (higher is better)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _save(figure, out / "rate_vs_fid.png")
    plt.close(figure)


def _plot_curves(out: Path, labels: list, colours: dict, shown: dict) -> None:
    """Training curves: the mean denoising error on U, and the PU bracket where there is one."""
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label in labels:
        rows = _metrics(out / "runs" / shown[label].name)
        if not rows:
            continue
        steps = [row["step"] for row in rows]
        left.plot(steps, [row["mean_unlabeled_loss"] for row in rows], color=colours[label], label=label)
        if shown[label].method == "pu":
            right.plot(steps, [row["bracket"] for row in rows], color=colours[label], label=label)
    left.set_title("mean denoising error on the training data", fontsize=9)
    left.set_yscale("log")
    right.set_title("PU bracket: mean_U l - beta mean_S l", fontsize=9)
    right.axhline(0.0, color="grey", lw=0.8)
    for axis in (left, right):
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    _save(figure, out / "training_curves.png")
    plt.close(figure)
