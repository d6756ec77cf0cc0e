"""The ``pudm`` command line: train, sample, classifier train, evaluate, audit, benchmark, demo.

The CLI parses arguments, turns them into the settings of :mod:`pudm.api` and calls it. The flags
of train and sd come from the config dataclasses (:mod:`pudm.flags`); the few options of the other
commands are the tables below. User errors come out as one line on stderr with exit code 2, never
as a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from pathlib import Path

from pudm import flags, runs
from pudm.config import AUTO, PRESETS, SAMPLERS, SECTIONS, DataConfig
from pudm.errors import UsageError
from pudm.models import MODEL_PRESETS

DATA_GROUP, OPTIM_GROUP, RUN_GROUP = "data", "optimisation", "run folder"
PRESET_HELP = f"named settings: {', '.join(PRESETS)} (default: digits_even)"
FLAG = "flag"  # an option table's type for a store_true option


def _train_flags() -> list[flags.Flag]:
    return flags.flags_of(SECTIONS, "train")


def _data_flags() -> list[flags.Flag]:  # which U, S and test split: train's and estimate-prior's
    return flags.flags_of({"data": DataConfig}, "estimate-prior")


def _sd_flags() -> list[flags.Flag]:
    from pudm.sd import SD_SECTIONS

    return flags.flags_of(SD_SECTIONS, "sd")


# The options of the commands without a config section: (name, type, default, help[, extra]).
# The type is a callable, a tuple of choices, or FLAG (store_true).
TRAIN_OPTIONS = (
    ("--model", tuple(sorted(MODEL_PRESETS)), None, "UNet preset (default small)"),
    ("--pretrained", str, None, "fine-tune this DDPM/DDIM pipeline (folder, run or hub id), not a new UNet"),
    ("--class-conditional", FLAG, False, "condition the UNet on each item's set (U: 0, S: 1; not the truth)"),
)
OUT_OPTION = ("--out", Path, None, "run folder to write", {"required": True})
RESUME_OPTION = ("--resume", FLAG, False, "continue the run in --out from its last checkpoint")
CONFIG_OPTIONS = (
    ("--config", Path, None, "start from a TOML file or a run's config.json; flags override it"),
    ("--print-config", FLAG, False, "print the resolved config (as config.json holds it) and exit"),
)
QUIET_OPTION = ("--quiet", FLAG, False, "no progress bar")
RUN_END_OPTIONS = (
    ("--push-to-hub", str, None, "upload the saved model and its card to this Hub repo at the end"),
    ("--report-to", ("none", "tensorboard", "wandb", "all"), "none", "experiment trackers (into RUN/logs)"),
)
SAMPLE_OPTIONS = (
    ("run", Path, None, "run folder or pipeline folder"),
    ("--num", int, 64, "number of samples (default 64)"),
    ("--sampler", SAMPLERS, None, "ddpm, ddim, dpm or dpm-sde; default from the run"),
    (
        ("--sample-steps", "--steps"),
        int,
        None,
        "sampling steps (default: the run's, 1000 for ddpm); --steps is an alias",
        {"dest": "steps"},
    ),
    ("--seed", int, 0, "sampling seed (default 0)"),
    (
        "--class",
        int,
        None,
        "class-conditional runs: class K (0: U's, the default; 1: S's)",
        {"dest": "class_label"},
    ),
    ("--prompt", str, None, "pudm sd runs: the text prompt (default: the run's)"),
    ("--guidance-scale", float, None, "pudm sd runs: classifier-free guidance"),
    ("--out", Path, None, "FILE.png and/or FILE.npz; repeatable", {"action": "append", "required": True}),
)
ESTIMATE_OPTIONS = (
    ("--epochs", int, 20, "classifier epochs per fold (default 20)"),
    ("--no-cross-check", FLAG, False, "skip the second estimator"),
    ("--json", FLAG, False, "print one JSON object"),
)
CLASSIFIER_OPTIONS = (
    ("--preset", str, "digits_even", "named settings (default digits_even)"),
    ("--arch", str, "cnn", "cnn (small images), resnet18 or resnet34"),
    ("--epochs", int, 30, "training epochs (default 30)"),
    ("--seed", int, 0, "seed (default 0)"),
    ("--image-size", int, None, "the runs' image size (default: the preset's)"),
    ("--weights", Path, None, "ResNet: start from these ImageNet weights (a local state dict file)"),
    (
        "--normal",
        flags.data_source,
        None,
        "normal images, any form --unlabeled takes (with --sensitive: a two-class classifier)",
    ),
    ("--sensitive", flags.data_source, None, "sensitive images (a folder, Parquet, shards, ...)"),
    ("--channels", (1, 3), 3, "folders: grey (1) or RGB (3, default)", {"type": int}),
    ("--strict", FLAG, False, "folders: stop at an unreadable file"),
    ("--data-dir", Path, None, "paper presets: where the data set's files are"),
    (
        "--no-download",
        FLAG,
        False,
        "paper presets: never download",
        {"dest": "download", "action": "store_false"},
    ),
    ("--out", Path, None, "classifier folder to write", {"required": True}),
    ("--overwrite", FLAG, False, "replace the classifier in --out"),
)
EVALUATE_OPTIONS = (
    ("run", Path, None, "run folder"),
    ("--classifier", Path, None, "folder from pudm classifier train", {"required": True}),
    ("--num", int, 1000, "samples to draw (default 1000)"),
    ("--sampler", SAMPLERS, None, "default: the run's"),
    ("--sample-steps", int, None, "default: the run's (ddpm 1000, ddim 50, dpm 20, dpm-sde 10)"),
    ("--seed", int, 0, "sampling seed (default 0)"),
    ("--inception", FLAG, False, "also Inception FID (needs torch-fidelity)"),
    ("--inception-weights", Path, None, "local Inception-v3 weights file (offline)"),
    ("--prompt", str, None, "pudm sd runs: the prompt to judge (default: the run's)"),
    (
        "--reference",
        Path,
        None,
        "pudm sd runs: normal images for the classifier FID (any form --unlabeled takes)",
    ),
    ("--quiet", FLAG, False, "no progress bars"),
)

AUDIT_OPTIONS = (
    ("target", Path, None, "a run, a pipeline, a folder of generated images or the .npz of pudm sample"),
    ("--unlabeled", flags.data_source, None, "U (default: the run's); any form pudm train takes"),
    ("--sensitive", flags.data_source, None, "S (default: the run's)"),
    ("--beta", float, None, "share of sensitive items in U (default: the run's, else estimated)"),
    ("--num", int, 1000, "samples to draw (default 1000)"),
    ("--sampler", SAMPLERS, None, "default: the run's"),
    ("--sample-steps", int, None, "default: the run's"),
    ("--seed", int, 0, "sampling seed (default 0)"),
    ("--noise-level", flags.noise_level, None, "DDPM timestep (of 1000) to compare items at, or auto"),
    ("--channels", (1, 3), None, "a folder of samples: grey (1) or RGB (3)", {"type": int}),
    ("--out", Path, None, "folder for audit.json and audit.png (default: the run)"),
    ("--json", FLAG, False, "print the report as one JSON object"),
    ("--quiet", FLAG, False, "no progress bar"),
)


def _pick(args: argparse.Namespace, *keys: str) -> dict:
    return {key: getattr(args, key) for key in keys}


def _add_options(group, options) -> None:
    """Add ``(flag or (flag, alias...), type or choices or FLAG, default, help[, argparse kwargs])``."""
    for name, kind, default, help_text, *extra in options:
        kwargs = {"help": help_text, **(extra[0] if extra else {})}
        if kind == FLAG:
            kwargs.setdefault("action", "store_true")
        elif isinstance(kind, tuple):
            kwargs["choices"] = kind
        else:
            kwargs.setdefault("type", kind)
        if default is not None and kwargs.get("action") != "store_false":
            kwargs["default"] = default
        group.add_argument(*((name,) if isinstance(name, str) else name), **kwargs)


def resolve_config(args: argparse.Namespace):
    """The preset (or --config file) with every flag the user gave applied, validated."""
    from pudm import api
    from pudm.settings import resolve

    train = args.command == "train"
    settings = flags.given(args, _train_flags() if train else _data_flags())
    if settings.get("beta") == AUTO:
        del settings["beta"]  # estimated by api.train(auto_beta=True)
    extra = _pick(args, "model", "pretrained", "class_conditional") if train else {}
    if not (train and args.config is not None):
        config = resolve(args.preset, given_by="flag", **extra, **settings)
        config.validate()
        return config
    if args.preset is not None:
        raise UsageError("--preset: --config names its own preset: give one of them")
    return api.load_config(args.config, given_by="flag", **extra, **settings)


def command_train(args: argparse.Namespace) -> int:
    """train a diffusion model (unsupervised, supervised, pu, filter, oracle, or a method beyond the paper)

    Train a diffusion model into a run folder: config.json, metrics.jsonl, checkpoints/,
    samples.png and the final diffusers pipeline in pipeline/.
    """
    from pudm import api

    if args.out is None and (args.resume or not args.print_config):
        raise UsageError("the following arguments are required: --out (see pudm train --help)")
    if args.resume and args.config is not None:
        raise UsageError("--config: a resumed run keeps its own config: drop --config")
    if not args.print_config:
        runs.RunFolder(args.out).check(args.resume, args.overwrite)
    given = {**_pick(args, "preset", "model", "pretrained"), **flags.given(args, _train_flags())}
    config = api.resume_config(args.out, **given) if args.resume else resolve_config(args)
    if args.print_config:  # what config.json would hold (stdout), where it came from (stderr)
        from pudm.settings import sources_of

        print(json.dumps(config.to_dict(), indent=2))
        print("\n".join(sources_of(config).lines(config)), file=sys.stderr)
        return 0
    was_complete = args.resume and runs.is_complete(args.out)
    api.train(config, args.out, auto_beta=args.beta == AUTO, **_run_mode(args))
    saved = f"pipeline in {args.out / 'pipeline'}, samples in {args.out / 'samples.png'}"
    return _done(args, config, was_complete, saved)


def _run_mode(args: argparse.Namespace) -> dict:
    return {**_pick(args, "resume", "overwrite", "push_to_hub", "report_to"), "show_progress": not args.quiet}


def _done(args: argparse.Namespace, config, was_complete: bool, saved: str) -> int:
    from pudm.processes import process_state

    if was_complete:
        print(f"{args.out} is complete ({config.train.steps} steps); nothing to resume")
    elif process_state().is_main_process:
        print(f"done: {saved}")
    return 0


def command_sample(args: argparse.Namespace) -> int:
    """draw samples from a trained run or pipeline folder

    Sample from RUN/pipeline (or any local DDPM pipeline folder) into a PNG grid and/or an .npz
    of uint8 images (key 'images', shape N,H,W,C).
    """
    from pudm import api
    from pudm.sampling import check_sample_files, save_samples
    from pudm.sd import is_sd_run

    if args.num <= 0:
        raise UsageError(f"--num must be > 0, got {args.num}")
    if args.steps is not None and args.steps <= 0:
        raise UsageError(f"--sample-steps must be > 0, got {args.steps}")
    check_sample_files(args.out)
    keys = ("sampler", "steps", "class_label", "prompt", "guidance_scale")
    images, how = api.sample_described(args.run, args.num, args.seed, **_pick(args, *keys))
    for out in args.out:
        save_samples(images, out, scale=1 if is_sd_run(args.run) else 4)
        print(f"wrote {len(images)} samples ({how}) to {out}")
    return 0


def _sd_config(args: argparse.Namespace):
    """The Stable Diffusion run's settings: the paper's defaults with every given flag applied."""
    from pudm import api

    return api.sd_config(given_by="flag", **flags.given(args, _sd_flags()))


def command_sd(args: argparse.Namespace) -> int:
    """PU fine-tuning of a Stable Diffusion pipeline (full UNet or LoRA) on two image folders

    Fine-tune the UNet of a Stable Diffusion pipeline on VAE latents of U (--unlabeled) and S
    (--sensitive) with the text encoder and VAE frozen. Captions: metadata.jsonl lines
    {file_name, text} in a folder, else the folder's --*-prompt. Saves RUN/pipeline (full) or
    RUN/lora/pytorch_lora_weights.safetensors (--lora-rank R), metrics.jsonl, checkpoints/ and
    samples.png. Defaults are the paper's: pu, beta 0.2, batch 16, lr 1e-5 (pu) / 1e-4, 512 px,
    1000 epochs.
    """
    from pudm import api

    runs.RunFolder(args.out).check(args.resume, args.overwrite)
    if args.resume:
        config = api.sd_resume_config(args.out, **flags.given(args, _sd_flags()))
    else:
        config = _sd_config(args)
    was_complete = args.resume and runs.is_complete(args.out)
    api.train_sd(config, args.out, **_run_mode(args))
    saved = f"{args.out / ('lora/pytorch_lora_weights.safetensors' if config.lora else 'pipeline/')}"
    return _done(
        args, config, was_complete, saved + (", samples in samples.png" if config.sample.grid_size else "")
    )


def command_estimate_prior(args: argparse.Namespace) -> int:
    """estimate beta, the share of sensitive items in U, from U and S

    Best Bin Estimation (Garg et al. 2021) on a cross-fitted S-vs-U CNN, with a bootstrap 95%
    interval and a cross-check by BBE on PCA + logistic regression. Prints the estimate; --json
    prints {beta, low, high, method, cross_check, warnings}.
    """
    from pudm import api
    from pudm.datasets import split_from_config
    from pudm.prior import describe

    if args.epochs <= 0:
        raise UsageError(f"--epochs must be > 0, got {args.epochs}")
    config = resolve_config(args)  # the data options it has; everything else stays the preset's
    estimate = api.estimate_beta(config, epochs=args.epochs, cross_check=not args.no_cross_check)
    if args.json:
        keys = ("beta", "low", "high", "method", "cross_check", "warnings")
        print(json.dumps({key: getattr(estimate, key) for key in keys}))
        return 0
    print(f"{describe(estimate)}; U {estimate.num_unlabeled}, S {estimate.num_sensitive}")
    true_beta = None if config.data.source == "folders" else split_from_config(config).summary()["true_beta"]
    if true_beta is not None:
        print(f"(the hidden truth of this labeled split: {true_beta:.3f})")
    return 0


def command_classifier_train(args: argparse.Namespace) -> int:
    """train the evaluation classifier of a preset's data

    Fit a classifier of the fine classes (normal vs sensitive follows) on the real labeled data of
    a preset, hold out a stratified 20% to report accuracy, save it (model.safetensors +
    config.json).
    """
    from pudm import api
    from pudm.config import preset

    api.check_classifier_arguments(args.out, args.arch, args.epochs, args.overwrite)
    config = None
    if args.normal is None and args.sensitive is None:  # a preset's labeled data
        extra = {"data_dir": args.data_dir} if args.data_dir is not None else {}
        config = api.customize(preset(args.preset), no_download=args.download, **extra)
    keys = ("normal", "sensitive", "arch", "epochs", "seed", "image_size", "channels", "strict", "weights")
    classifier = api.train_classifier(args.out, config, overwrite=args.overwrite, **_pick(args, *keys))
    lines = classifier.info.describe()
    lines[0] += f"; saved to {args.out}"
    print("\n".join(lines))
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    """non-sensitive rate, FID and class histogram of a trained run -> RUN/eval.json

    Sample from RUN/pipeline and judge the samples with an evaluation classifier: non-sensitive
    rate with a 95% interval, FID (classifier features) against the normal test split, optionally
    Inception FID, and the per-class histogram.
    """
    from pudm import api
    from pudm.classifier import Classifier
    from pudm.evaluation import describe

    if args.num <= 0:
        raise UsageError(f"--num must be > 0, got {args.num}")
    if args.sample_steps is not None and args.sample_steps <= 0:
        raise UsageError(f"--sample-steps must be > 0, got {args.sample_steps}")
    if not args.run.is_dir():
        raise UsageError(f"{args.run} does not exist: give a run folder")
    classifier = Classifier.load(args.classifier)
    keys = ("sampler", "seed", "inception", "inception_weights", "prompt", "reference")
    result = api.evaluate(
        args.run,
        classifier,
        args.num,
        steps=args.sample_steps,
        show_progress=not args.quiet,
        **_pick(args, *keys),
    )
    recall = None if "prompt" in result else classifier.info.heldout_sensitive_recall
    print("\n".join(describe(result, args.run, recall)))
    return 0


def command_audit(args: argparse.Namespace) -> int:
    """how many samples look sensitive, from U and S alone (no labels) -> audit.json

    Draw --num samples from a run (or a pipeline), or take a folder of generated images, and
    estimate the share that is sensitive with cross-fitted S-vs-U classifiers on noised items
    (adjusted classify-and-count), with a bootstrap 95% interval. Writes audit.json and audit.png,
    the most sensitive-looking samples first.
    """
    from pudm.audit import AUDIT, AUDIT_GRID, AuditConfig, audit, describe

    if args.sample_steps is not None and args.sample_steps <= 0:
        raise UsageError(f"--sample-steps must be > 0, got {args.sample_steps}")
    report = audit(
        args.target,
        config=AuditConfig(noise_level=args.noise_level),
        steps=args.sample_steps,
        show_progress=not args.quiet,
        **_pick(args, "unlabeled", "sensitive", "beta", "num", "sampler", "seed", "out", "channels"),
    )
    if args.json:
        print(json.dumps(report))
        return 0
    print(describe(report))
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    where = args.out or args.target
    grid = where / AUDIT_GRID
    print(f"report: {where / AUDIT}; the most sensitive-looking samples first: {grid}")
    return 0


def command_benchmark(args: argparse.Namespace) -> int:
    """methods x seeds: train, sample, evaluate; table and plots

    Train every method with every seed (and every beta of --betas for pu and filter), evaluate
    each run, write results.json, table.md and plots. Finished cells are reused: re-run the same
    command to resume. --quick: unsupervised, pu and filter, one seed, 1500 steps, 500 samples.
    """
    from pudm import api
    from pudm.benchmark import TABLE, BenchmarkOptions

    options = BenchmarkOptions(**flags.given_fields(args, _benchmark_flags())).with_defaults(args.quick)
    if options["num"] <= 0:  # the cheap checks first, in the order they always came
        raise UsageError(f"--num must be > 0, got {options['num']}")
    if options["sample_steps"] is not None and options["sample_steps"] <= 0:
        raise UsageError(f"--sample-steps must be > 0, got {options['sample_steps']}")
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    api.benchmark(**options, out=args.out, log=log, show_progress=not args.quiet)
    print()
    print((args.out / TABLE).read_text(), end="")
    print(f"results: {args.out / 'results.json'}; plots: grids.png, rate_vs_fid.png, training_curves.png")
    return 0


def _benchmark_flags() -> list[flags.Flag]:
    from pudm.benchmark import BenchmarkOptions

    return flags.flags_of({"benchmark": BenchmarkOptions}, "benchmark")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (problem and fix), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _run_groups(parser: argparse.ArgumentParser, run_options=()) -> dict:
    """The data, objective, optimisation and run folder groups; ``run_options`` in the last."""
    groups = {
        name: parser.add_argument_group(name) for name in (DATA_GROUP, "objective", OPTIM_GROUP, RUN_GROUP)
    }
    _add_options(groups[RUN_GROUP], run_options)
    return groups


def _command(sub, name: str, handler, options=(), doc: str | None = None, **defaults):
    """A subcommand whose help is the first line of ``doc`` (default: the handler's docstring)."""
    doc = inspect.cleandoc(doc or handler.__doc__)
    parser = sub.add_parser(name, help=doc.splitlines()[0], description=" ".join(doc.splitlines()[2:]))
    _add_options(parser, options)
    parser.set_defaults(handler=handler, **defaults)
    return parser


DEMO_DOC = """the digits benchmark in quick mode (unsupervised, pu, filter), offline on CPU

pudm benchmark --quick into runs/demo: even digits normal, odd sensitive; the unsupervised
baseline, PU and the filter baseline trained on the same contaminated data, judged by an
independent classifier. Offline, CPU, minutes."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pudm",
        description=(
            "Positive-unlabeled diffusion models: train a diffusion model on unlabeled data U that "
            "hides some sensitive items, plus a small labeled sensitive set S, so that it generates "
            "normal data only."
        ),
    )
    from pudm import __version__

    parser.add_argument("--version", action="version", version=f"pudm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = _command(sub, "train", command_train)
    groups = _run_groups(train)
    groups[DATA_GROUP].add_argument("--preset", help=PRESET_HELP)
    _add_options(groups[OPTIM_GROUP], TRAIN_OPTIONS)
    train_out = ("--out", Path, None, "run folder to write (required unless --print-config)")
    _add_options(groups[DATA_GROUP], CONFIG_OPTIONS)
    _add_options(groups[RUN_GROUP], [train_out])
    mode = groups[RUN_GROUP].add_mutually_exclusive_group()
    _add_options(mode, [RESUME_OPTION, ("--overwrite", FLAG, False, "replace the run in --out")])
    _add_options(groups[RUN_GROUP], [QUIET_OPTION, *RUN_END_OPTIONS])
    flags.add(train, _train_flags(), groups)

    _command(sub, "sample", command_sample, SAMPLE_OPTIONS)
    estimate = _command(sub, "estimate-prior", command_estimate_prior)
    data = estimate.add_argument_group(DATA_GROUP)
    data.add_argument("--preset", help=PRESET_HELP)
    flags.add(estimate, _data_flags(), {DATA_GROUP: data})
    _add_options(estimate, ESTIMATE_OPTIONS)
    classifier = sub.add_parser("classifier", help="the evaluation classifier").add_subparsers(
        dest="classifier_command", required=True, metavar="ACTION"
    )
    _command(classifier, "train", command_classifier_train, CLASSIFIER_OPTIONS)
    _command(sub, "evaluate", command_evaluate, EVALUATE_OPTIONS)
    _command(sub, "audit", command_audit, AUDIT_OPTIONS)
    sd = _command(sub, "sd", command_sd)
    overwrite = ("--overwrite", FLAG, False, "replace a finished or broken run in --out")
    flags.add(
        sd,
        _sd_flags(),
        _run_groups(sd, [OUT_OPTION, RESUME_OPTION, overwrite, QUIET_OPTION, *RUN_END_OPTIONS]),
    )
    for name, doc in (("benchmark", None), ("demo", DEMO_DOC)):
        out = ("--out", Path, Path(f"runs/{name}"), f"benchmark folder (default runs/{name})")
        quiet = ("--quiet", FLAG, False, "no progress bars")
        bench = _command(sub, name, command_benchmark, (), doc, quick=name == "demo", preset="digits_even")
        flags.add(bench, _benchmark_flags(), {"benchmark": bench})
        _add_options(bench, (out, quiet))
        if name == "benchmark":
            bench.add_argument("--quick", action="store_true", help="the quick mode of the demo")
    return parser


class _CommandLog(logging.Handler):
    """The library's ``pudm`` log as the command's own stderr lines: ``pudm COMMAND: message``."""

    def __init__(self, command: str):
        super().__init__(logging.INFO)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        print(f"pudm {self.command}: {record.getMessage()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logger = logging.getLogger("pudm")
    handler, level, propagate = _CommandLog(args.command), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        return _run_command(args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _run_command(args: argparse.Namespace) -> int:
    try:
        return args.handler(args)
    except UsageError as error:
        # pudm's own user errors only (RunError, SDError, ... derive from it): anything else is a
        # defect and keeps its traceback.
        print(f"pudm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pudm {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as error:
        from pudm.stops import NonFiniteLoss, TrainingInterrupted

        if isinstance(error, NonFiniteLoss):
            print(f"pudm {args.command}: error: {error}", file=sys.stderr)
            return 1
        if not isinstance(error, TrainingInterrupted):
            raise
        print(f"pudm {args.command}: {error}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
