"""Set-conditional digits models: what U's label and S's label produce, per method.

The CPU twin of the paper's Stable Diffusion experiment (all of U captioned "a photo of a middle
aged man", S captioned "a photo of Brad Pitt"): a class-conditional UNet of the digits_even preset
is conditioned on the set each item came from (class 0 for every U item, 1 for every S item; the
hidden odd digits inside U carry U's label like every other U item). Asked for U's label, a model
should draw even digits only. Trains (or reuses) one run per method, draws ``--num`` samples with
each label and judges them with the evaluation classifier (non-sensitive share = even digits).

    pudm classifier train --preset digits_even --out runs/clf
    python benchmarks/class_conditional.py --classifier runs/clf --out runs/class-conditional
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pudm.classifier import Classifier
from pudm.config import preset
from pudm.datasets import split_from_config
from pudm.models import load_pipeline
from pudm.run_model import SENSITIVE_LABEL, SET_CLASSES, UNLABELED_LABEL
from pudm.runs import is_complete
from pudm.sampling import generate
from pudm.training import Trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/class-conditional"))
    parser.add_argument("--methods", default="unsupervised,supervised,pu")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--num", type=int, default=500, help="samples per label")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    classifier = Classifier.load(args.classifier)
    methods = args.methods.split(",")
    rows = {}
    for method in methods:
        config = preset("digits_even")
        config.train.method, config.train.steps, config.train.seed = method, args.steps, args.seed
        config.model.num_classes = SET_CLASSES
        config.validate()
        run = args.out / f"{method}-seed{args.seed}"
        if not is_complete(run):
            print(f"training {run}", file=sys.stderr)
            Trainer(config, split_from_config(config), run, show_progress=False).train(resume=run.exists())
        pipeline = load_pipeline(run / "pipeline")
        for label in (UNLABELED_LABEL, SENSITIVE_LABEL):
            images = generate(
                pipeline.unet,
                pipeline.scheduler.config,
                num=args.num,
                sampler=config.sample.sampler,
                steps=config.sample.steps,
                seed=args.seed,
                show_progress=False,
                class_labels=torch.full((args.num,), label),
            )
            rows[method, label] = float(classifier.is_normal(classifier.predict(images)).mean())

    print("| method | U's label: non-sensitive rate | S's label: non-sensitive rate |")
    print("|---|---|---|")
    for method in methods:
        print(f"| {method} | {rows[method, UNLABELED_LABEL]:.3f} | {rows[method, SENSITIVE_LABEL]:.3f} |")
    print(
        f"{args.num} samples per label, {config.sample.sampler} {config.sample.steps} steps, "
        f"{args.steps} training steps, seed {args.seed}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
