"""Class-conditional digits models: what each requested class produces, unsupervised vs PU.

Trains (or reuses) class-conditional runs of the digits_even preset (U carries the digit classes;
the sensitive odd digits sit in five classes), draws ``--num`` samples of every class from each and
judges them with the evaluation classifier: per requested class, the share classified as that class
and the non-sensitive share (even digit).

    python benchmarks/class_conditional.py --classifier runs/benchmark/classifier --out runs/class-conditional
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from pudm.classifier import Classifier
from pudm.config import preset
from pudm.models import load_pipeline
from pudm.runs import is_complete
from pudm.sampling import generate
from pudm.training import Trainer, split_from_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/class-conditional"))
    parser.add_argument("--methods", default="unsupervised,pu")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--num", type=int, default=200, help="samples per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    classifier = Classifier.load(args.classifier)
    rows = []
    for method in args.methods.split(","):
        config = preset("digits_even")
        config.train.method, config.train.steps, config.train.seed = method, args.steps, args.seed
        config.model.num_classes = 10
        config.validate()
        run = args.out / f"{method}-seed{args.seed}"
        if not is_complete(run):
            print(f"training {run}", file=sys.stderr)
            Trainer(config, split_from_config(config), run, show_progress=False).train(resume=run.exists())
        pipeline = load_pipeline(run / "pipeline")
        for label in range(10):
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
            predicted = classifier.predict(images)
            rows.append(
                (
                    method,
                    label,
                    float(np.mean(predicted == label)),
                    float(classifier.is_normal(predicted).mean()),
                )
            )

    methods = args.methods.split(",")
    print(f"| requested class | {' | '.join(f'{m}: as requested / non-sensitive' for m in methods)} |")
    print("|---|" + "---|" * len(args.methods.split(",")))
    for label in range(10):
        cells = [f"{hit:.2f} / {normal:.2f}" for method, lab, hit, normal in rows if lab == label]
        kind = "even (normal)" if label % 2 == 0 else "odd (sensitive)"
        print(f"| {label} {kind} | {' | '.join(cells)} |")
    for method in args.methods.split(","):
        odd = [normal for m, lab, _, normal in rows if m == method and lab % 2]
        even = [hit for m, lab, hit, _ in rows if m == method and lab % 2 == 0]
        print(
            f"{method}: odd classes requested -> non-sensitive share {np.mean(odd):.3f}; "
            f"even classes requested -> as requested {np.mean(even):.3f}"
        )
    print(
        f"{args.num} samples per class, {config.sample.sampler} {config.sample.steps} steps, seed {args.seed}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
