"""Mean per-sample loss l by noise level, for the parts of a digits PU split.

Shows *where* in the noise schedule a model separates sensitive from normal data:

    python benchmarks/loss_by_timestep.py runs/demo/pu runs/demo/unsupervised

Columns: U-normal, U-sensitive (hidden), S, the normal test split, and odd digits never used in
the split ("unseen sensitive"). Same noise for every model, 300 items per column at most.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pudm import runs
from pudm.config import RunConfig
from pudm.datasets import load_source, split_from_config
from pudm.models import load_pipeline
from pudm.training import per_sample_denoising_loss

TIMESTEPS = (10, 50, 100, 200, 300, 500, 700, 900)


@torch.no_grad()
def profile(run_dir: Path, per_column: int = 300) -> None:
    config = RunConfig.from_dict(runs.read_json(run_dir / "config.json"))
    split = split_from_config(config)
    source = load_source(config.data.source, config.data.image_size, config.data.channels)
    used = torch.cat([split.unlabeled, split.sensitive]).flatten(1)
    sensitive_pool = source.images[~torch.isin(source.labels, torch.tensor(config.data.normal_classes))]
    unseen = sensitive_pool[~(sensitive_pool.flatten(1)[:, None] == used[None]).all(-1).any(-1)]
    hidden = split.unlabeled_is_sensitive
    columns = {
        "U-normal": split.unlabeled[~hidden],
        "U-sensitive": split.unlabeled[hidden],
        "S": split.sensitive,
        "test-normal": split.test,
        "unseen-sens.": unseen,
    }
    pipeline = load_pipeline(run_dir / "pipeline")
    unet, scheduler = pipeline.unet.eval(), pipeline.scheduler
    print(f"{run_dir} ({config.train.method}, {config.model.prediction_type})")
    print("t".ljust(6) + "".join(f"{name:>14}" for name in columns))
    for t in TIMESTEPS:
        row = []
        for images in columns.values():
            images = images[:per_column]
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(t))
            timesteps = torch.full((len(images),), t)
            row.append(per_sample_denoising_loss(unet, scheduler, images, noise, timesteps).mean().item())
        print(f"{t:<6}" + "".join(f"{value:>14.2f}" for value in row))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with config.json and pipeline/)")
    for run_dir in parser.parse_args().runs:
        profile(run_dir)


if __name__ == "__main__":
    main()
