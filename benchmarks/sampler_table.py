"""Sampling time and quality per sampler, on the same trained model(s), side by side.

For each run folder and each ``sampler:steps`` pair: draw ``--num`` samples with the same seed,
time them, and judge them with the evaluation classifier (non-sensitive rate with its 95% interval,
FID (classifier features) and pixel Frechet distance against the run's normal test split). The
sampler ``pipeline`` is the saved folder loaded in plain diffusers with its own scheduler (what a
user of the pipeline alone gets; a ``reject`` run's rejector is not applied there, nor anywhere in
this script). Nothing is written into the runs.

    python benchmarks/sampler_table.py runs/benchmark/runs/pu-seed0 runs/benchmark/runs/unsupervised-seed0 \\
        --classifier runs/benchmark/classifier
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pudm.classifier import Classifier
from pudm.datasets import split_from_config
from pudm.evaluation import check_classifier, evaluate_samples, run_config
from pudm.models import load_pipeline
from pudm.sampling import generate, to_uint8


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="finished pudm run folders")
    parser.add_argument("--classifier", type=Path, required=True)
    parser.add_argument("--samplers", default="ddpm:1000,ddim:50,dpm:20,dpm-sde:10,pipeline:1000")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    classifier = Classifier.load(args.classifier)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for run in args.runs:
        config = run_config(run)
        check_classifier(classifier, config)
        reference = to_uint8(split_from_config(config).test)
        pipeline = load_pipeline(run / "pipeline", device=device)
        for pair in args.samplers.split(","):
            sampler, steps = pair.split(":")
            start = time.perf_counter()
            if sampler == "pipeline":
                images = _plain_diffusers(run / "pipeline", args.num, int(steps), args.seed, device)
            else:
                images = generate(
                    pipeline.unet,
                    pipeline.scheduler.config,
                    num=args.num,
                    sampler=sampler,
                    steps=int(steps),
                    seed=args.seed,
                    show_progress=False,
                )
            seconds = time.perf_counter() - start
            metrics = evaluate_samples(images, reference, classifier)
            rows.append(
                {
                    "run": run.name,
                    "sampler": sampler,
                    "steps": int(steps),
                    "seconds": round(seconds, 2),
                    "samples_per_second": round(args.num / seconds, 1),
                    "non_sensitive_rate": metrics["non_sensitive_rate"],
                    "rate_95ci": [round(v, 3) for v in metrics["non_sensitive_rate_95ci"]],
                    "fid_classifier": round(metrics["fid_classifier"], 2),
                    "fid_pixels": round(metrics["fid_pixels"], 2),
                    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(
        "| run | sampler | steps | seconds | samples/s | non-sensitive rate (95% CI) | "
        "FID (classifier features) | Frechet distance (pixels) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        low, high = row["rate_95ci"]
        print(
            f"| {row['run']} | {row['sampler']} | {row['steps']} | {row['seconds']} | "
            f"{row['samples_per_second']} | {row['non_sensitive_rate']:.3f} ({low:.3f}-{high:.3f}) | "
            f"{row['fid_classifier']} | {row['fid_pixels']} |"
        )


def _plain_diffusers(folder: Path, num: int, steps: int, seed: int, device: str):
    """The pipeline folder as diffusers alone samples it: its saved scheduler, no pudm code."""
    import numpy as np
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(folder, use_safetensors=True).to(device)
    pipeline.set_progress_bar_config(disable=True)
    batches = []
    for i, start in enumerate(range(0, num, 256)):
        generator = torch.Generator().manual_seed(seed + i)
        out = pipeline(
            batch_size=min(256, num - start), generator=generator, num_inference_steps=steps, output_type="np"
        )
        batches.append(out.images)
    return np.clip(np.round(np.concatenate(batches) * 255.0), 0, 255).astype(np.uint8)


if __name__ == "__main__":
    main()
