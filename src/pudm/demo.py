"""The digits PU demo: the unsupervised baseline and the PU model, side by side.

Even digits are normal, odd digits sensitive. Both models train on the same contaminated U (about
9% odd digits); the PU model also sees the labeled odd digits in S. An independent classifier (an
SVM on the real digit labels) counts how often each model generates an odd digit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pudm import runs
from pudm.config import RunConfig, preset
from pudm.evaluation import class_histogram, fit_digits_classifier, non_sensitive_rate
from pudm.models import load_pipeline
from pudm.sampling import generate, make_grid, save_png
from pudm.training import Trainer, split_from_config

DEMO_METHODS = ("unsupervised", "pu")


def demo_config(method: str, seed: int, steps: int | None) -> RunConfig:
    config = preset("digits_even")
    config.train.method = method
    config.train.seed = seed
    if steps is not None:
        config.train.steps = steps
    config.validate()
    return config


def ensure_trained(config: RunConfig, run_dir: Path, show_progress: bool = True) -> None:
    """Train ``config`` into ``run_dir``: reuse a finished run with the same config, resume an
    interrupted one, start afresh otherwise (an existing run of another config is an error)."""
    run_dir = Path(run_dir)
    resume = runs.holds_run(run_dir)
    if resume:
        if runs.read_json(run_dir / runs.CONFIG) != config.to_dict():
            raise runs.RunError(
                f"{run_dir} holds a run with other settings: remove it or choose another --out"
            )
        if runs.is_complete(run_dir):
            print(f"reusing finished run {run_dir}", file=sys.stderr)
            return
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise runs.RunError(f"{run_dir} exists and is not a pudm run: choose another --out")
    Trainer(config, split_from_config(config), run_dir, show_progress=show_progress).train(resume=resume)


def run_demo(
    out: Path, steps: int | None = None, num_samples: int = 500, seed: int = 0, show_progress: bool = True
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classifier = fit_digits_classifier()
    results: dict[str, dict] = {}
    grids = []
    for method in DEMO_METHODS:
        config = demo_config(method, seed, steps)
        run_dir = out / method
        ensure_trained(config, run_dir, show_progress=show_progress)
        pipeline = load_pipeline(run_dir / "pipeline")
        images = generate(
            pipeline.unet,
            pipeline.scheduler.config,
            num=num_samples,
            sampler=config.sample.sampler,
            steps=config.sample.steps,
            seed=10_000 + seed,
            show_progress=show_progress,
        )
        predicted = classifier.predict(images)
        rate = non_sensitive_rate(predicted, config.data.normal_classes)
        results[method] = {
            "non_sensitive_rate": rate,
            "sensitive_rate": 1.0 - rate,
            "class_histogram": class_histogram(predicted),
            "run": str(run_dir),
            "samples_png": str(run_dir / "samples.png"),
        }
        grids.append(images[:64])
    # Side by side: the first 64 samples of each model, separated by a white band.
    tiles = [make_grid(images, columns=8) for images in grids]
    band = np.full((tiles[0].shape[0], 4, tiles[0].shape[-1]), 255, np.uint8)
    save_png(np.concatenate([tiles[0], band, tiles[1]], axis=1), out / "comparison.png", scale=4)

    summary = {
        "preset": "digits_even",
        "seed": seed,
        "num_samples": num_samples,
        "classifier": {"kind": "SVC on scikit-learn digits", "cv_accuracy": classifier.cv_accuracy},
        "results": results,
        "comparison_png": str(out / "comparison.png"),
    }
    runs.atomic_write_json(out / "demo.json", summary)
    print()
    print(f"digits_even: even digits normal, odd digits sensitive; {num_samples} samples per model")
    print(f"classifier: SVC on the real digit labels, 5-fold accuracy {classifier.cv_accuracy:.3f}")
    print(f"{'method':<14}{'odd (sensitive) share':>24}{'non-sensitive rate':>22}")
    for method, values in results.items():
        print(f"{method:<14}{values['sensitive_rate']:>24.3f}{values['non_sensitive_rate']:>22.3f}")
    print(f"grids: {out / 'comparison.png'} (left unsupervised, right pu); per run: RUN/samples.png")
    print(f"details: {out / 'demo.json'}")
    return summary
