"""The ``pudm`` command line: train, sample, demo.

The CLI parses arguments, overrides fields of a preset, and calls the library. User errors come
out as one line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pudm import runs
from pudm.config import PREDICTION_TYPES, PRESETS, SAMPLERS, TRAIN_METHODS, RunConfig, preset
from pudm.models import MODEL_PRESETS, model_preset
from pudm.objectives import CORRECTIONS


class UsageError(ValueError):
    """Bad input from the user; the message names the problem and the fix."""


# CLI flag -> (config section, field). Every flag defaults to None: "keep the preset's value".
TRAIN_OVERRIDES = {
    "method": ("train", "method"),
    "beta": ("train", "beta"),
    "correction": ("train", "correction"),
    "steps": ("train", "steps"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "learning_rate"),
    "warmup_steps": ("train", "warmup_steps"),
    "lr_schedule": ("train", "lr_schedule"),
    "ema_decay": ("train", "ema_decay"),
    "seed": ("train", "seed"),
    "mixed_precision": ("train", "mixed_precision"),
    "log_every": ("train", "log_every"),
    "checkpoint_every": ("train", "checkpoint_every"),
    "keep_checkpoints": ("train", "keep_checkpoints"),
    "num_sensitive": ("data", "num_sensitive"),
    "sensitive_per_batch": ("data", "sensitive_per_batch"),
    "split_seed": ("data", "split_seed"),
    "image_size": ("data", "image_size"),
    "prediction_type": ("model", "prediction_type"),
    "sampler": ("sample", "sampler"),
    "sample_steps": ("sample", "steps"),
    "grid_size": ("sample", "grid_size"),
}


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--preset",
        default="digits_even",
        help=f"named settings: {', '.join(sorted(PRESETS))} (default: digits_even)",
    )
    data.add_argument("--num-sensitive", type=int, help="size of the labeled sensitive set S")
    data.add_argument(
        "--sensitive-per-batch",
        type=int,
        help="exactly K items of S per batch (default: drawn from the pooled U and S, as the paper)",
    )
    data.add_argument("--split-seed", type=int, help="seed of the U/S/test split (default 0)")
    data.add_argument("--image-size", type=int, help="resize images to this many pixels a side")

    method = parser.add_argument_group("objective")
    method.add_argument("--method", help=f"one of {', '.join(TRAIN_METHODS)} (default: pu)")
    method.add_argument("--beta", type=float, help="share of sensitive items in U, in [0, 1) (default 0.1)")
    method.add_argument(
        "--correction", help=f"PU correction: {' or '.join(CORRECTIONS)} (default abs, as the paper)"
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--model", choices=sorted(MODEL_PRESETS), help="UNet preset (default small)")
    optim.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        help="what the UNet predicts, and so what l(x) measures (default: the preset's)",
    )
    optim.add_argument("--steps", type=int, help="optimiser steps")
    optim.add_argument("--batch-size", type=int, help="images per step (per process)")
    optim.add_argument("--lr", type=float, help="peak AdamW learning rate")
    optim.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up steps")
    optim.add_argument("--lr-schedule", choices=("cosine", "constant"), help="after warm-up (default cosine)")
    optim.add_argument("--ema-decay", type=float, help="EMA decay of the saved weights (default 0.999)")
    optim.add_argument("--seed", type=int, help="seed of initialisation, batches and noise")
    optim.add_argument(
        "--mixed-precision", choices=("no", "fp16", "bf16"), help="autocast dtype (loss stays float32)"
    )

    run = parser.add_argument_group("run folder")
    run.add_argument("--out", required=True, type=Path, help="run folder to write")
    run.add_argument("--log-every", type=int, help="steps per metrics line")
    run.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    run.add_argument("--keep-checkpoints", type=int, help="how many checkpoints to keep")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    mode.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    grid = parser.add_argument_group("end-of-run sample grid (also the defaults of pudm sample)")
    grid.add_argument("--sampler", choices=SAMPLERS, help="ddpm, ddim or dpm (DPM-Solver++) (default ddim)")
    grid.add_argument("--sample-steps", type=int, help="sampling steps (default 50)")
    grid.add_argument("--grid-size", type=int, help="samples in RUN/samples.png (default 64)")


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The preset with every flag the user gave applied, validated."""
    config = preset(args.preset or "digits_even")
    if args.model is not None:
        # A model preset sets the architecture; the preset's prediction type stays unless overridden.
        prediction_type = config.model.prediction_type
        config.model = model_preset(args.model)
        config.model.prediction_type = prediction_type
    for flag, (section, field) in TRAIN_OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(getattr(config, section), field, value)
    config.validate()
    return config


def _given_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {flag: getattr(args, flag) for flag in TRAIN_OVERRIDES if getattr(args, flag) is not None}


def _resume_config(args: argparse.Namespace) -> RunConfig:
    if not runs.holds_run(args.out):
        raise UsageError(f"--resume: {args.out} holds no run (no config.json): run without --resume")
    config = RunConfig.from_dict(runs.read_json(args.out / runs.CONFIG))
    for flag, value in _given_overrides(args).items():
        section, field = TRAIN_OVERRIDES[flag]
        stored = getattr(getattr(config, section), field)
        if stored != value:
            raise UsageError(
                f"--resume: {args.out} was trained with --{flag.replace('_', '-')} {stored}, not {value}: "
                "drop the flag to resume, or start a new run with --overwrite"
            )
    if args.model is not None:
        wanted = model_preset(args.model)
        if wanted.block_out_channels != config.model.block_out_channels:
            raise UsageError(f"--resume: {args.out} was not trained with --model {args.model}: drop --model")
    if args.preset is not None and args.preset != config.preset:
        raise UsageError(f"--resume: {args.out} is a {config.preset} run, not {args.preset}: drop --preset")
    return config


def _prepare_out(args: argparse.Namespace) -> None:
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not args.resume:
        if not runs.holds_run(out):
            raise UsageError(f"--out {out} exists and is not a pudm run: choose an empty or new folder")
        if not args.overwrite:
            raise UsageError(
                f"--out {out} already holds a run: pass --resume to continue it or --overwrite to replace it"
            )


def command_train(args: argparse.Namespace) -> int:
    from pudm.training import Trainer, check_method_fits_data, split_from_config

    _prepare_out(args)
    config = _resume_config(args) if args.resume else resolve_config(args)
    split = split_from_config(config)
    check_method_fits_data(config.train.method, split)
    if args.resume and runs.is_complete(args.out):
        print(f"{args.out} is complete ({config.train.steps} steps); nothing to resume")
        return 0
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / f".write-test-{id(args)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(
            f"--out {args.out} is not writable ({error.strerror}): choose another folder"
        ) from None
    if args.overwrite:
        for child in args.out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    summary = split.summary()
    print(
        f"pudm train: {config.preset}, method {config.train.method}, beta {config.train.beta}, "
        f"U {summary['unlabeled']} (hidden sensitive {summary['unlabeled_sensitive']}), "
        f"S {summary['sensitive']}, {config.train.steps} steps -> {args.out}",
        file=sys.stderr,
    )
    Trainer(config, split, args.out, show_progress=not args.quiet).train(resume=args.resume)
    print(f"done: pipeline in {args.out / 'pipeline'}, samples in {args.out / 'samples.png'}")
    return 0


def _pipeline_dir(path: Path) -> Path:
    if (path / "model_index.json").is_file():
        return path
    if (path / "pipeline" / "model_index.json").is_file():
        return path / "pipeline"
    if runs.holds_run(path):
        raise UsageError(
            f"{path} has no pipeline/ yet (the run did not finish): finish it with "
            f"pudm train --resume --out {path}"
        )
    raise UsageError(f"{path} is neither a pudm run folder nor a diffusers pipeline folder: check the path")


def command_sample(args: argparse.Namespace) -> int:
    from pudm.models import load_pipeline
    from pudm.sampling import generate, save_grid

    if args.num <= 0:
        raise UsageError(f"--num must be > 0, got {args.num}")
    if args.steps is not None and args.steps <= 0:
        raise UsageError(f"--steps must be > 0, got {args.steps}")
    for out in args.out:
        if out.suffix not in (".png", ".npz"):
            raise UsageError(f"--out {out}: use a .png (grid) or .npz (uint8 array) file name")
        if not out.parent.exists() and str(out.parent):
            raise UsageError(f"--out {out}: folder {out.parent} does not exist: create it first")
    pipeline_dir = _pipeline_dir(args.run)
    defaults = RunConfig().sample
    if pipeline_dir != args.run and runs.holds_run(args.run):
        defaults = RunConfig.from_dict(runs.read_json(args.run / runs.CONFIG)).sample
    sampler = args.sampler or defaults.sampler
    steps = args.steps or (
        defaults.steps if sampler == defaults.sampler else 1000 if sampler == "ddpm" else 50
    )
    pipeline = load_pipeline(pipeline_dir)
    images = generate(
        pipeline.unet, pipeline.scheduler.config, num=args.num, sampler=sampler, steps=steps, seed=args.seed
    )
    for out in args.out:
        if out.suffix == ".png":
            save_grid(images, out)
        else:
            tmp = out.with_name(f".{out.stem}.tmp.npz")
            import numpy as np

            np.savez_compressed(tmp, images=images)
            tmp.replace(out)
        print(f"wrote {len(images)} samples ({sampler}, {steps} steps) to {out}")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from pudm.demo import run_demo

    if args.steps is not None and args.steps <= 0:
        raise UsageError(f"--steps must be > 0, got {args.steps}")
    if args.num <= 0:
        raise UsageError(f"--num must be > 0, got {args.num}")
    run_demo(args.out, steps=args.steps, num_samples=args.num, seed=args.seed, show_progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pudm",
        description=(
            "Positive-unlabeled diffusion models: train a diffusion model on unlabeled data U that "
            "hides some sensitive items, plus a small labeled sensitive set S, so that it generates "
            "normal data only."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a diffusion model (unsupervised, supervised, pu or oracle)",
        description="Train a diffusion model into a run folder: config.json, metrics.jsonl, "
        "checkpoints/, samples.png and the final diffusers pipeline in pipeline/.",
    )
    _add_train_arguments(train)
    train.set_defaults(handler=command_train)

    sample = sub.add_parser(
        "sample",
        help="draw samples from a trained run or pipeline folder",
        description="Sample from RUN/pipeline (or any local DDPM pipeline folder) into a PNG grid "
        "and/or an .npz of uint8 images (key 'images', shape N,H,W,C).",
    )
    sample.add_argument("run", type=Path, help="run folder or pipeline folder")
    sample.add_argument("--num", type=int, default=64, help="number of samples (default 64)")
    sample.add_argument(
        "--sampler", choices=SAMPLERS, help="ddpm, ddim or dpm (DPM-Solver++); default from the run"
    )
    sample.add_argument("--steps", type=int, help="sampling steps (default: the run's, 1000 for ddpm)")
    sample.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    sample.add_argument(
        "--out", type=Path, action="append", required=True, help="FILE.png and/or FILE.npz; repeatable"
    )
    sample.set_defaults(handler=command_sample)

    demo = sub.add_parser(
        "demo",
        help="the digits PU demo: unsupervised vs pu, side by side",
        description="Train the unsupervised baseline and the PU model on digits_even (even digits "
        "normal, odd sensitive), sample both and report how often each generates odd digits, "
        "judged by an independent classifier. Offline, CPU, a few minutes.",
    )
    demo.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="folder for both runs (default runs/demo)"
    )
    demo.add_argument("--steps", type=int, help="training steps per model (default: the preset's)")
    demo.add_argument("--num", type=int, default=500, help="samples per model to classify (default 500)")
    demo.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=command_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (UsageError, runs.RunError, ValueError) as error:
        print(f"pudm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pudm {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as error:
        from pudm.training import TrainingInterrupted

        if not isinstance(error, TrainingInterrupted):
            raise
        print(f"pudm {args.command}: {error}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
