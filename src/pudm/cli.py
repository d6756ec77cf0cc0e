"""The ``pudm`` command line: train, sample, classifier train, evaluate, benchmark, demo.

The CLI parses arguments, overrides fields of a preset, and calls the library. User errors come
out as one line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pudm import flags, runs
from pudm.config import (
    PRESETS,
    SAMPLERS,
    DataConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    default_steps,
    preset,
)
from pudm.errors import UsageError
from pudm.models import MODEL_PRESETS, model_preset

TRAIN_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "sample": SampleConfig}
DATA_GROUP, OPTIM_GROUP, RUN_GROUP = "data", "optimisation", "run folder"


def _train_flags(command: str = "train") -> list[flags.Flag]:
    found = flags.flags_of(TRAIN_SECTIONS, command)
    for flag in found:
        if flag.name == "beta":
            flag.argparse["type"] = _beta  # a number, or auto
    return found


def _data_flags() -> list[flags.Flag]:
    """Which U, S and test split: the data options shared by train and estimate-prior."""
    return flags.flags_of({"data": DataConfig}, "estimate-prior")


def _add_preset(group) -> None:
    group.add_argument("--preset", help=f"named settings: {', '.join(PRESETS)} (default: digits_even)")


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    groups = {name: parser.add_argument_group(name) for name in (DATA_GROUP, "objective", OPTIM_GROUP)}
    _add_preset(groups[DATA_GROUP])
    optim = groups[OPTIM_GROUP]
    optim.add_argument("--model", choices=sorted(MODEL_PRESETS), help="UNet preset (default small)")
    optim.add_argument(
        "--pretrained",
        help="fine-tune this DDPM/DDIM pipeline (folder, pudm run or hub id) instead of a new UNet",
    )
    optim.add_argument(
        "--class-conditional",
        action="store_true",
        help="a UNet conditioned on the set each item came from: class 0 for every U item, 1 for every "
        "S item (never the hidden truth); sample with --class 0, U's label (the default)",
    )
    run = groups[RUN_GROUP] = parser.add_argument_group(RUN_GROUP)
    run.add_argument("--out", required=True, type=Path, help="run folder to write")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    mode.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    flags.add(parser, _train_flags(), groups)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The preset with every flag the user gave applied, validated."""
    from pudm import api

    config = api.preset(
        args.preset,
        unlabeled=getattr(args, "unlabeled", None),
        sensitive=getattr(args, "sensitive", None),
        test=getattr(args, "test", None),
    )
    if getattr(args, "model", None) is not None:
        # A model preset sets the architecture; the preset's prediction type stays unless overridden.
        prediction_type = config.model.prediction_type
        config.model = model_preset(args.model)
        config.model.prediction_type = prediction_type
    given = flags.given(args, _train_flags() if args.command == "train" else _data_flags())
    flags.apply(config, [(f, value) for f, value in given if not (f.name == "beta" and value == AUTO)])
    if getattr(args, "class_conditional", False):
        from pudm.training import SET_CLASSES

        config.model.num_classes = SET_CLASSES
    pretrained = getattr(args, "pretrained", None) or config.model.pretrained
    if pretrained:
        _use_pretrained(config, pretrained, args)
    config.validate()
    return config


def _use_pretrained(config: RunConfig, pretrained: str, args: argparse.Namespace) -> None:
    """Fine-tuning: the model section describes the pretrained UNet; DDIM 50 samples, as the paper."""
    from pudm.models import pretrained_model_config

    if Path(pretrained).exists():
        pretrained = str(Path(pretrained).resolve())
    wanted_classes = config.model.num_classes
    config.model = pretrained_model_config(pretrained)
    if wanted_classes and config.model.num_classes != wanted_classes:
        raise UsageError(
            f"--class-conditional: --pretrained {pretrained} has no class embedding for {wanted_classes} "
            "classes: fine-tune it without --class-conditional"
        )
    if getattr(args, "prediction_type", None) not in (None, config.model.prediction_type):
        raise UsageError(
            f"--prediction-type: --pretrained {pretrained} predicts {config.model.prediction_type}: "
            "drop the flag"
        )
    if getattr(args, "sampler", None) is None:
        config.sample.sampler, config.sample.steps = "ddim", args.sample_steps or 50


AUTO = "auto"


def _beta(text: str) -> float | str:
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--beta takes a number in [0, 1) or auto, got {text!r}") from None


def _resume_config(args: argparse.Namespace) -> RunConfig:
    if not runs.holds_run(args.out):
        raise UsageError(f"--resume: {args.out} holds no run (no config.json): run without --resume")
    config = RunConfig.from_dict(runs.read_json(args.out / runs.CONFIG))
    for flag, value in flags.given(args, _train_flags()):
        stored = getattr(getattr(config, flag.section), flag.field)
        if flag.name == "beta" and value == AUTO:
            if config.train.beta_estimate is None:
                raise UsageError(
                    f"--resume: {args.out} was trained with --beta {stored}, not auto: drop --beta"
                )
            continue
        if stored != value:
            raise UsageError(
                f"--resume: {args.out} was trained with {flag.option} {stored}, not {value}: "
                "drop the flag to resume, or start a new run with --overwrite"
            )
    if args.model is not None:
        wanted = model_preset(args.model)
        if wanted.block_out_channels != config.model.block_out_channels:
            raise UsageError(f"--resume: {args.out} was not trained with --model {args.model}: drop --model")
    if args.pretrained is not None:
        stored = config.model.pretrained
        given = str(Path(args.pretrained).resolve()) if Path(args.pretrained).exists() else args.pretrained
        if given != stored:
            raise UsageError(
                f"--resume: {args.out} was fine-tuned from {stored}, not {given}: drop --pretrained"
            )
    if args.preset is not None and args.preset.lower() != config.preset.lower():
        raise UsageError(f"--resume: {args.out} is a {config.preset} run, not {args.preset}: drop --preset")
    return config


def command_train(args: argparse.Namespace) -> int:
    from pudm import api
    from pudm.training import process_state

    runs.RunFolder(args.out).check(args.resume, args.overwrite)
    config = _resume_config(args) if args.resume else resolve_config(args)
    was_complete = args.resume and runs.is_complete(args.out)
    api.train(
        config,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        auto_beta=args.beta == AUTO,
        show_progress=not args.quiet,
    )
    if was_complete:
        print(f"{args.out} is complete ({config.train.steps} steps); nothing to resume")
    elif process_state().is_main_process:
        print(f"done: pipeline in {args.out / 'pipeline'}, samples in {args.out / 'samples.png'}")
    return 0


def command_sample(args: argparse.Namespace) -> int:
    from pudm import api

    if args.num <= 0:
        raise UsageError(f"--num must be > 0, got {args.num}")
    if args.steps is not None and args.steps <= 0:
        raise UsageError(f"--steps must be > 0, got {args.steps}")
    for out in args.out:
        if out.suffix not in (".png", ".npz"):
            raise UsageError(f"--out {out}: use a .png (grid) or .npz (uint8 array) file name")
        if not out.parent.exists() and str(out.parent):
            raise UsageError(f"--out {out}: folder {out.parent} does not exist: create it first")
    images, how = api.sample_described(
        args.run,
        args.num,
        args.seed,
        sampler=args.sampler,
        steps=args.steps,
        class_label=args.class_label,
        prompt=args.prompt,
        guidance_scale=args.guidance_scale,
    )
    from pudm.sd import is_sd_run

    _write_samples(images, args.out, how, scale=1 if is_sd_run(args.run) else 4)
    return 0


def _write_samples(images, outs: list[Path], how: str, scale: int = 4) -> None:
    from pudm.sampling import save_grid

    for out in outs:
        if out.suffix == ".png":
            save_grid(images, out, scale=scale)
        else:
            tmp = out.with_name(f".{out.stem}.tmp.npz")
            import numpy as np

            np.savez_compressed(tmp, images=images)
            tmp.replace(out)
        print(f"wrote {len(images)} samples ({how}) to {out}")


def _sd_sections() -> dict[str, type]:
    from pudm.sd import SDDataConfig, SDModelConfig, SDSampleConfig

    return {"data": SDDataConfig, "model": SDModelConfig, "train": TrainConfig, "sample": SDSampleConfig}


def _sd_config(args: argparse.Namespace):
    """The Stable Diffusion run's settings: the paper's defaults with every given flag applied."""
    from pudm.sd import SDRunConfig, default_learning_rate

    if args.steps is not None and args.epochs is not None:
        raise UsageError("give --steps or --epochs, not both")
    config = SDRunConfig()
    flags.apply(config, flags.given(args, flags.flags_of(_sd_sections(), "sd")))
    if args.lr is None:
        config.train.learning_rate = default_learning_rate(config.train.method)
    if args.sampler is not None and args.sample_steps is None:
        config.sample.steps = default_steps(args.sampler)
    if args.steps is None and args.epochs is None:
        config.model.epochs = 1000  # the paper's 1000 epochs
    for flag in ("unlabeled", "sensitive"):
        if getattr(config.data, flag):
            setattr(config.data, flag, str(Path(getattr(config.data, flag)).resolve()))
    if config.model.pretrained and Path(config.model.pretrained).exists():
        config.model.pretrained = str(Path(config.model.pretrained).resolve())
    if config.train.method == "unsupervised":
        config.data.sensitive, config.data.sensitive_prompt = None, None
    config.validate()
    return config


def _sd_resume_config(args: argparse.Namespace):
    """The stored settings of the run in --out; a flag given again must repeat its stored value."""
    from pudm.sd import is_sd_run, load_run_config

    if not is_sd_run(args.out):
        raise UsageError(f"--resume: {args.out} holds no pudm sd run (no config.json of one): drop --resume")
    config = load_run_config(args.out)
    for flag, value in flags.given(args, flags.flags_of(_sd_sections(), "sd")):
        if flag.name == "pretrained" and Path(value).exists():
            value = str(Path(value).resolve())
        stored = getattr(getattr(config, flag.section), flag.field)
        if stored != value:
            raise UsageError(
                f"--resume: {args.out} was trained with {flag.option} {stored}, not {value}: "
                "drop the flag to resume, or start a new run with --overwrite"
            )
    return config


def command_sd(args: argparse.Namespace) -> int:
    from pudm import api
    from pudm.training import process_state

    runs.RunFolder(args.out).check(args.resume, args.overwrite)
    config = _sd_resume_config(args) if args.resume else _sd_config(args)
    was_complete = args.resume and runs.is_complete(args.out)
    api.train_sd(config, args.out, resume=args.resume, overwrite=args.overwrite, show_progress=not args.quiet)
    if was_complete:
        print(f"{args.out} is complete ({config.train.steps} steps); nothing to resume")
    elif process_state().is_main_process:
        saved = "lora/pytorch_lora_weights.safetensors" if config.lora else "pipeline/"
        print(f"done: {args.out / saved}" + (", samples in samples.png" if config.sample.grid_size else ""))
    return 0


def _csv(kind: type, flag: str):
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated values, got {text!r}") from None
        return values

    return parse


def command_estimate_prior(args: argparse.Namespace) -> int:
    from pudm import api
    from pudm.prior import describe

    if args.epochs <= 0:
        raise UsageError(f"--epochs must be > 0, got {args.epochs}")
    config = resolve_config(args)  # the data options it has; everything else stays the preset's
    estimate = api.estimate_beta(config, epochs=args.epochs, cross_check=not args.no_cross_check)
    if args.json:
        keys = ("beta", "low", "high", "method", "cross_check", "warnings")
        print(json.dumps({key: getattr(estimate, key) for key in keys}))
    else:
        print(f"{describe(estimate)}; U {estimate.num_unlabeled}, S {estimate.num_sensitive}")
        from pudm.training import split_from_config

        true_beta = split_from_config(config).summary()["true_beta"]
        if true_beta is not None:
            print(f"(the hidden truth of this labeled split: {true_beta:.3f})")
    return 0


def command_classifier_train(args: argparse.Namespace) -> int:
    from pudm import api

    api.check_classifier_arguments(args.out, args.arch, args.epochs, args.overwrite)
    config = None
    if args.normal is None and args.sensitive is None:
        config = preset(args.preset)
        if args.data_dir is not None:
            config.data.data_dir = str(args.data_dir.resolve())
        config.data.download = args.download
    classifier = api.train_classifier(
        args.out,
        config,
        normal=args.normal,
        sensitive=args.sensitive,
        arch=args.arch,
        epochs=args.epochs,
        seed=args.seed,
        image_size=args.image_size,
        channels=args.channels,
        strict=args.strict,
        weights=args.weights,
        overwrite=args.overwrite,
    )
    info = classifier.info
    recall = (
        f", sensitive recall {info.heldout_sensitive_recall:.3f}"
        if info.heldout_sensitive_recall is not None
        else ""
    )
    print(
        f"classifier {info.arch} for {info.preset}: held-out accuracy {info.heldout_accuracy:.3f} "
        f"(normal vs sensitive {info.heldout_normal_accuracy:.3f}{recall}) on {info.num_heldout} images; "
        f"saved to {args.out}"
    )
    if info.heldout_class_recall:
        print(
            "per-class recall: " + ", ".join(f"{c}: {r:.3f}" for c, r in enumerate(info.heldout_class_recall))
        )
    return 0


def _check_sampling_flags(args: argparse.Namespace) -> None:
    if args.num <= 0:
        raise UsageError(f"--num must be > 0, got {args.num}")
    if getattr(args, "sample_steps", None) is not None and args.sample_steps <= 0:
        raise UsageError(f"--sample-steps must be > 0, got {args.sample_steps}")


def command_evaluate(args: argparse.Namespace) -> int:
    from pudm import api
    from pudm.classifier import Classifier
    from pudm.evaluation import FID_CLASSIFIER, FID_PIXELS

    _check_sampling_flags(args)
    if not args.run.is_dir():
        raise UsageError(f"{args.run} does not exist: give a run folder")
    classifier = Classifier.load(args.classifier)
    result = api.evaluate(
        args.run,
        classifier,
        args.num,
        sampler=args.sampler,
        steps=args.sample_steps,
        seed=args.seed,
        inception=args.inception,
        inception_weights=args.inception_weights,
        prompt=args.prompt,
        reference=args.reference,
        show_progress=not args.quiet,
    )
    low, high = result["non_sensitive_rate_95ci"]
    if "prompt" in result:  # a pudm sd run
        fid = f", classifier FID {result['fid_classifier']:.2f}" if "fid_classifier" in result else ""
        print(
            f"{args.run}: {result['prompt']!r}: non-sensitive rate {result['non_sensitive_rate']:.3f} "
            f"(95% CI {low:.3f}-{high:.3f}){fid}; {result['num_samples']} samples ({result['sampler']}, "
            f"{result['sampling_steps']} steps); details in {args.run / 'eval.json'}"
        )
        return 0
    print(
        f"{args.run}: non-sensitive rate {result['non_sensitive_rate']:.3f} (95% CI {low:.3f}-{high:.3f}), "
        + (
            f"{FID_CLASSIFIER} {result['fid_classifier']:.2f}"
            if result["fid_classifier"] is not None
            else "no FID (no normal test images)"
        )
        + (f", {FID_PIXELS} {result['fid_pixels']:.2f}" if result.get("fid_pixels") is not None else "")
        + (f", Inception FID {result['fid_inception']:.2f}" if "fid_inception" in result else "")
        + f"; {result['num_samples']} samples ({result['sampler']}, {result['sampling_steps']} steps)"
    )
    if "rejection" in result:
        print(f"the rejector dropped {result['rejection']['rejected_share']:.1%} of the samples drawn")
    recall = classifier.info.heldout_sensitive_recall
    if recall is not None:
        print(
            f"the judge's held-out sensitive recall is {recall:.3f}: of truly sensitive samples it "
            f"would miss about {1 - recall:.0%}, so the rate cannot show more than that"
        )
    print(f"per-class counts: {result['class_histogram']}; details in {args.run / 'eval.json'}")
    return 0


def command_benchmark(args: argparse.Namespace) -> int:
    from pudm.benchmark import FULL, QUICK, TABLE

    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    _check_sampling_flags(args)
    from pudm import api

    api.benchmark(
        args.preset,
        args.methods,
        args.seeds,
        args.out,
        log=lambda line: print(line, file=sys.stderr),
        betas=args.betas,
        steps=args.steps,
        num=args.num,
        classifier_path=args.classifier,
        sampler=args.sampler,
        sample_steps=args.sample_steps,
        show_progress=not args.quiet,
        pretrained=args.pretrained,
        learning_rate=args.lr,
        data_dir=args.data_dir,
    )
    print()
    print((args.out / TABLE).read_text(), end="")
    print(f"results: {args.out / 'results.json'}; plots: grids.png, rate_vs_fid.png, training_curves.png")
    return 0


def _add_benchmark_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    parser.add_argument("--preset", default="digits_even", help="named settings (default digits_even)")
    parser.add_argument("--methods", type=_csv(str, "--methods"), help="comma-separated methods")
    parser.add_argument("--seeds", type=_csv(int, "--seeds"), help="comma-separated training seeds")
    parser.add_argument(
        "--betas",
        type=_csv(_beta, "--betas"),
        help="beta sweep for pu/filter, e.g. 0.05,0.1,0.2,0.3; auto: estimated from U and S",
    )
    parser.add_argument("--steps", type=int, help="training steps per cell (default: the preset's)")
    parser.add_argument("--lr", type=float, help="learning rate of every cell (default: the preset's)")
    parser.add_argument("--data-dir", type=Path, help="where the paper data sets' files are")
    parser.add_argument(
        "--pretrained",
        help="every cell fine-tunes this pipeline (folder, pudm run or hub id); a pudm run is also "
        "evaluated, as the row before fine-tuning",
    )
    parser.add_argument("--num", type=int, help="samples per cell to evaluate")
    parser.add_argument("--classifier", type=Path, help="evaluation classifier folder (default: train one)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="sampler for evaluation (default: the preset's)")
    parser.add_argument("--sample-steps", type=int, help="sampling steps for evaluation")
    parser.add_argument("--out", type=Path, default=out, help=f"benchmark folder (default {out})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_sd_arguments(parser: argparse.ArgumentParser) -> None:
    groups = {name: parser.add_argument_group(name) for name in (DATA_GROUP, "objective", OPTIM_GROUP)}
    run = groups[RUN_GROUP] = parser.add_argument_group(RUN_GROUP)
    run.add_argument("--out", required=True, type=Path, help="run folder to write")
    run.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    run.add_argument("--overwrite", action="store_true", help="replace a finished or broken run in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    flags.add(parser, flags.flags_of(_sd_sections(), "sd"), groups)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (problem and fix), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        help="train a diffusion model (unsupervised, supervised, pu, filter or oracle)",
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
        "--sampler", choices=SAMPLERS, help="ddpm, ddim, dpm or dpm-sde; default from the run"
    )
    sample.add_argument("--steps", type=int, help="sampling steps (default: the run's, 1000 for ddpm)")
    sample.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    sample.add_argument(
        "--class",
        dest="class_label",
        type=int,
        help="class-conditional runs: draw every sample of class K (0: U's label, the default; 1: S's)",
    )
    sample.add_argument("--prompt", help="pudm sd runs: the text prompt (default: the run's)")
    sample.add_argument("--guidance-scale", type=float, help="pudm sd runs: classifier-free guidance")
    sample.add_argument(
        "--out", type=Path, action="append", required=True, help="FILE.png and/or FILE.npz; repeatable"
    )
    sample.set_defaults(handler=command_sample)

    estimate = sub.add_parser(
        "estimate-prior",
        help="estimate beta, the share of sensitive items in U, from U and S",
        description="Best Bin Estimation (Garg et al. 2021) on a cross-fitted S-vs-U CNN, with a "
        "bootstrap 95% interval and a cross-check by BBE on PCA + logistic regression. Prints the "
        "estimate; --json prints {beta, low, high, method, cross_check, warnings}.",
    )
    data = estimate.add_argument_group(DATA_GROUP)
    _add_preset(data)
    flags.add(estimate, _data_flags(), {DATA_GROUP: data})
    estimate.add_argument("--epochs", type=int, default=20, help="classifier epochs per fold (default 20)")
    estimate.add_argument("--no-cross-check", action="store_true", help="skip the second estimator")
    estimate.add_argument("--json", action="store_true", help="print one JSON object")
    estimate.set_defaults(handler=command_estimate_prior)

    classifier = sub.add_parser("classifier", help="the evaluation classifier").add_subparsers(
        dest="classifier_command", required=True, metavar="ACTION"
    )
    classifier_train = classifier.add_parser(
        "train",
        help="train the evaluation classifier of a preset's data",
        description="Fit a classifier of the fine classes (normal vs sensitive follows) on the real "
        "labeled data of a preset, hold out a stratified 20% to report accuracy, save it "
        "(model.safetensors + config.json).",
    )
    classifier_train.add_argument(
        "--preset", default="digits_even", help="named settings (default digits_even)"
    )
    classifier_train.add_argument("--arch", default="cnn", help="cnn (small images), resnet18 or resnet34")
    classifier_train.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    classifier_train.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    classifier_train.add_argument(
        "--image-size", type=int, help="the runs' image size (default: the preset's)"
    )
    classifier_train.add_argument(
        "--weights", type=Path, help="ResNet: start from these ImageNet weights (a local state dict file)"
    )
    classifier_train.add_argument(
        "--normal",
        type=Path,
        help="folder of normal images (with --sensitive: a two-class folder classifier)",
    )
    classifier_train.add_argument("--sensitive", type=Path, help="folder of sensitive images")
    classifier_train.add_argument(
        "--channels", type=int, choices=(1, 3), default=3, help="folders: grey (1) or RGB (3, default)"
    )
    classifier_train.add_argument("--strict", action="store_true", help="folders: stop at an unreadable file")
    classifier_train.add_argument(
        "--data-dir", type=Path, help="paper presets: where the data set's files are"
    )
    classifier_train.add_argument(
        "--no-download", dest="download", action="store_false", help="paper presets: never download"
    )
    classifier_train.add_argument("--out", type=Path, required=True, help="classifier folder to write")
    classifier_train.add_argument("--overwrite", action="store_true", help="replace the classifier in --out")
    classifier_train.set_defaults(handler=command_classifier_train)

    evaluate = sub.add_parser(
        "evaluate",
        help="non-sensitive rate, FID and class histogram of a trained run -> RUN/eval.json",
        description="Sample from RUN/pipeline and judge the samples with an evaluation classifier: "
        "non-sensitive rate with a 95% interval, FID (classifier features) against the normal test "
        "split, optionally Inception FID, and the per-class histogram.",
    )
    evaluate.add_argument("run", type=Path, help="run folder")
    evaluate.add_argument("--classifier", type=Path, required=True, help="folder from pudm classifier train")
    evaluate.add_argument("--num", type=int, default=1000, help="samples to draw (default 1000)")
    evaluate.add_argument("--sampler", choices=SAMPLERS, help="default: the run's")
    evaluate.add_argument(
        "--sample-steps",
        type=int,
        help="default: the run's (1000 for ddpm, 50 for ddim, 20 for dpm, 10 for dpm-sde)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    evaluate.add_argument(
        "--inception", action="store_true", help="also Inception FID (needs torch-fidelity)"
    )
    evaluate.add_argument("--inception-weights", type=Path, help="local Inception-v3 weights file (offline)")
    evaluate.add_argument("--prompt", help="pudm sd runs: the prompt to judge (default: the run's)")
    evaluate.add_argument(
        "--reference", type=Path, help="pudm sd runs: folder of normal images for the classifier FID"
    )
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(handler=command_evaluate)

    sd = sub.add_parser(
        "sd",
        help="PU fine-tuning of a Stable Diffusion pipeline (full UNet or LoRA) on two image folders",
        description="Fine-tune the UNet of a Stable Diffusion pipeline on VAE latents of U (--unlabeled) "
        "and S (--sensitive) with the text encoder and VAE frozen. Captions: metadata.jsonl lines "
        "{file_name, text} in a folder, else the folder's --*-prompt. Saves RUN/pipeline (full) or "
        "RUN/lora/pytorch_lora_weights.safetensors (--lora-rank R), metrics.jsonl, checkpoints/ and "
        "samples.png. Defaults are the paper's: pu, beta 0.2, batch 16, lr 1e-5 (pu) / 1e-4, 512 px, "
        "1000 epochs.",
    )
    _add_sd_arguments(sd)
    sd.set_defaults(handler=command_sd)

    benchmark = sub.add_parser(
        "benchmark",
        help="methods x seeds: train, sample, evaluate; table and plots",
        description="Train every method with every seed (and every beta of --betas for pu and "
        "filter), evaluate each run, write results.json, table.md and plots. Finished cells are "
        "reused: re-run the same command to resume. --quick: unsupervised, pu and filter, one seed, "
        "1500 steps, 500 samples.",
    )
    _add_benchmark_arguments(benchmark, Path("runs/benchmark"))
    benchmark.add_argument("--quick", action="store_true", help="the quick mode of the demo")
    benchmark.set_defaults(handler=command_benchmark, quick=False)

    demo = sub.add_parser(
        "demo",
        help="the digits benchmark in quick mode (unsupervised, pu, filter), offline on CPU",
        description="pudm benchmark --quick into runs/demo: even digits normal, odd sensitive; the "
        "unsupervised baseline, PU and the filter baseline trained on the same contaminated data, "
        "judged by an independent classifier. Offline, CPU, minutes.",
    )
    _add_benchmark_arguments(demo, Path("runs/demo"))
    demo.set_defaults(handler=command_benchmark, quick=True)
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
        from pudm.training import NonFiniteLoss, TrainingInterrupted

        if isinstance(error, NonFiniteLoss):
            print(f"pudm {args.command}: error: {error}", file=sys.stderr)
            return 1
        if not isinstance(error, TrainingInterrupted):
            raise
        print(f"pudm {args.command}: {error}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
