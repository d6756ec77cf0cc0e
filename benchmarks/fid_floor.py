"""Reference points for FID (classifier features): real image sets against the normal test split.

A model that generated exactly the hidden-normal part of U would score about the "U normal" row;
one that reproduced the contaminated U, about the "U" row. Prints one JSON line.

    python benchmarks/fid_floor.py --classifier runs/benchmark/classifier [--preset digits_even]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pudm.classifier import Classifier
from pudm.config import preset
from pudm.evaluation import check_classifier, classifier_fid
from pudm.sampling import to_uint8
from pudm.training import split_from_config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classifier", type=Path, required=True)
    parser.add_argument("--preset", default="digits_even")
    args = parser.parse_args()
    config = preset(args.preset)
    classifier = Classifier.load(args.classifier)
    check_classifier(classifier, config)
    split = split_from_config(config)
    reference = to_uint8(split.test)
    sets = {
        "U normal (hidden)": split.unlabeled[~split.unlabeled_is_sensitive],
        "U (as trained on)": split.unlabeled,
        "S": split.sensitive,
    }
    print(
        json.dumps(
            {
                name: round(classifier_fid(classifier, reference, to_uint8(images)), 3)
                for name, images in sets.items()
            }
        )
    )


if __name__ == "__main__":
    main()
