"""Training throughput per objective and precision, through the real Trainer.

Each configuration trains ``--steps`` steps into a temporary run folder; the figure is the mean of
the log ticks after the first (the first holds compilation/allocation warm-up). On a GPU the peak
memory of the step is reported too.

    python benchmarks/train_speed.py                                   # digits, small UNet, CPU
    python benchmarks/train_speed.py --model paper --image-size 32 --precisions no,fp16,bf16
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from pudm.config import preset
from pudm.models import model_preset
from pudm.training import Trainer, split_from_config


def measure(method: str, precision: str, args: argparse.Namespace) -> dict:
    config = preset("digits_even")
    prediction_type = config.model.prediction_type
    config.model = model_preset(args.model)
    config.model.prediction_type = prediction_type
    config.data.image_size = args.image_size
    config.train.method = method
    config.train.steps = args.steps
    config.train.batch_size = args.batch_size
    config.train.log_every = args.log_every
    config.train.checkpoint_every = args.steps
    config.train.mixed_precision = precision
    config.sample.grid_size, config.sample.steps = 4, 2  # the end-of-run grid is not measured
    config.validate()
    # accelerate keeps one process-wide state; reset it so each precision gets its own.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=precision)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        Trainer(
            config, split_from_config(config), run_dir, accelerator=accelerator, show_progress=False
        ).train()
        ticks = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = ticks[1:] or ticks
    steps_per_second = sum(t["steps_per_second"] for t in timed) / len(timed)
    return {
        "method": method,
        "precision": precision,
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps_per_second": round(steps_per_second, 2),
        "images_per_second": round(steps_per_second * args.batch_size, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="unsupervised,pu")
    parser.add_argument("--precisions", default="no")
    parser.add_argument("--model", default="small")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
    rows = []
    for precision in args.precisions.split(","):
        for method in args.methods.split(","):
            rows.append(measure(method, precision, args))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print("| method | precision | steps/s | images/s | peak GPU memory (GiB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row['precision']} | {row['steps_per_second']} | "
            f"{row['images_per_second']} | {row['peak_memory_gib']} |"
        )


if __name__ == "__main__":
    main()
