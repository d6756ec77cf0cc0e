"""Reference points for both quality measures: real image sets against the normal test split.

A model that generated exactly the hidden-normal part of U would score about the "U normal" row;
one that reproduced the contaminated U, about the "U" row. Prints one JSON line per measure:
FID (classifier features) and the Frechet distance in pixel space; and the judge's non-sensitive
rate on each real set, the normal test split included (a model that drew only real normal images
would score the test split's rate: the ceiling this judge allows).

    python benchmarks/fid_floor.py --classifier runs/benchmark/classifier [--preset digits_even]
    python benchmarks/fid_floor.py --classifier runs/fashion/classifier --preset fashion_shirt --data-dir DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pudm.classifier import Classifier
from pudm.config import preset
from pudm.datasets import split_from_config
from pudm.evaluation import check_classifier, classifier_fid, pixel_fid
from pudm.sampling import to_uint8


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classifier", type=Path, required=True)
    parser.add_argument("--preset", default="digits_even")
    parser.add_argument(
        "--data-dir", type=Path, help="where the preset's files are (Fashion-MNIST, MNIST, ...)"
    )
    args = parser.parse_args()
    config = preset(args.preset)
    if args.data_dir is not None:
        config.data.data_dir, config.data.download = str(args.data_dir), False
    classifier = Classifier.load(args.classifier)
    check_classifier(classifier, config)
    split = split_from_config(config)
    reference = to_uint8(split.test)
    sets = {
        "U normal (hidden)": split.unlabeled[~split.unlabeled_is_sensitive],
        "U (as trained on)": split.unlabeled,
        "S": split.sensitive,
    }
    rates = {"normal test split": split.test, **sets}
    print(
        json.dumps(
            {
                "measure": "non-sensitive rate (judge)",
                **{
                    n: round(float(classifier.is_normal(classifier.predict(to_uint8(i))).mean()), 3)
                    for n, i in rates.items()
                },
            }
        )
    )
    for measure, distance in (
        ("FID (classifier features)", lambda images: classifier_fid(classifier, reference, images)),
        ("Frechet distance (pixels)", lambda images: pixel_fid(reference, images)),
    ):
        print(
            json.dumps({"measure": measure, **{n: round(distance(to_uint8(i)), 3) for n, i in sets.items()}})
        )


if __name__ == "__main__":
    main()
