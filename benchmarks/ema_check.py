"""Does EMA help? Evaluate a finished run's raw (non-EMA) weights beside its saved EMA pipeline.

The last checkpoint of a run holds both the raw model and the EMA weights; ``RUN/pipeline`` is the
EMA model. This script builds a second pipeline from the raw weights in a temporary folder and
judges both with the same classifier, sampler, seed and number of samples. Prints one JSON line.

    python benchmarks/ema_check.py runs/benchmark/runs/pu-seed0 --classifier runs/benchmark/classifier
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from pudm import runs
from pudm.classifier import Classifier
from pudm.datasets import split_from_config
from pudm.evaluation import check_classifier, evaluate_samples, run_config
from pudm.models import build_noise_scheduler, build_unet, load_pipeline, save_pipeline
from pudm.sampling import generate, to_uint8


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--classifier", type=Path, required=True)
    parser.add_argument("--num", type=int, default=1000)
    args = parser.parse_args()

    config = run_config(args.run)
    classifier = Classifier.load(args.classifier)
    check_classifier(classifier, config)
    checkpoint = runs.load_checkpoint(runs.list_checkpoints(args.run)[-1])
    split = split_from_config(config)
    reference = to_uint8(split.test)
    raw = build_unet(config.model, image_size=split.image_shape[-1], channels=split.image_shape[0])
    raw.load_state_dict(checkpoint["model"])
    result = {"run": str(args.run), "step": int(checkpoint["state"]["step"])}
    with tempfile.TemporaryDirectory() as folder:
        save_pipeline(raw.eval(), build_noise_scheduler(config.model), Path(folder) / "raw")
        for name, path in (("ema", args.run / "pipeline"), ("raw", Path(folder) / "raw")):
            pipeline = load_pipeline(path)
            images = generate(
                pipeline.unet,
                pipeline.scheduler.config,
                num=args.num,
                sampler=config.sample.sampler,
                steps=config.sample.steps,
                seed=0,
                show_progress=False,
            )
            metrics = evaluate_samples(images, reference, classifier)
            result[name] = {
                k: metrics[k] for k in ("non_sensitive_rate", "fid_classifier", "class_histogram")
            }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
