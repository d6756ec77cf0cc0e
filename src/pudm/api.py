"""The Python API: everything the command line does, callable from a notebook or another script.

    import pudm
    config = pudm.preset("digits_even")
    config.train.method, config.train.steps = "pu", 3000
    run = pudm.train(config, "runs/pu")
    images = pudm.sample(run, num=64, seed=0)         # uint8 (N, H, W, C)
    report = pudm.evaluate(run, classifier="runs/clf", num=1000)
    estimate = pudm.estimate_beta(config)

The ``pudm`` command parses its flags into the same configs and calls these functions. They raise
:class:`pudm.UsageError` (or a subclass) for what the user must fix, never read ``sys.argv``, and
report through the ``pudm`` logger (silent unless the caller configures logging) and progress bars
that ``show_progress=False`` turns off.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pudm import methods, runs
from pudm.cards import check_hub, push
from pudm.config import RunConfig, default_steps
from pudm.config import preset as _config_preset
from pudm.errors import UsageError
from pudm.run_model import pipeline_folder  # noqa: F401  (part of the API)
from pudm.settings import (  # noqa: F401  (the API's config builders live in pudm.settings)
    _stored_config,
    config_file_error,
    customize,
    load_config,
    preset,
    read_config_file,
    resume_config,
    sd_config,
    sd_resume_config,
)

log = logging.getLogger("pudm")
log.addHandler(logging.NullHandler())  # silent unless the application configures logging

PathLike = str | Path


class Run:
    """A run folder (``pudm train`` or ``pudm sd``): its config, metrics, pipeline and state."""

    def __init__(self, path: PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        state = "complete" if self.complete else ("started" if self.exists else "empty")
        return f"Run({str(self.path)!r}, {state})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def exists(self) -> bool:
        return runs.holds_run(self.path)

    @property
    def complete(self) -> bool:
        return runs.is_complete(self.path)

    @property
    def is_sd(self) -> bool:
        from pudm.sd import is_sd_run

        return is_sd_run(self.path)

    @property
    def config(self):
        """The run's :class:`RunConfig` (an ``SDRunConfig`` for a ``pudm sd`` run)."""
        if not self.exists:
            raise runs.RunError(f"{self.path} is not a pudm run folder (no config.json): give a run folder")
        if self.is_sd:
            from pudm.sd import load_run_config

            return load_run_config(self.path)
        return RunConfig.from_dict(runs.read_json(self.path / runs.CONFIG))

    @property
    def metrics(self) -> list[dict]:
        """Every line of ``metrics.jsonl`` (one per log tick)."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def eval(self) -> dict | None:
        """The latest ``eval.json``, if the run was evaluated."""
        from pudm.evaluation import EVAL

        path = self.path / EVAL
        return runs.read_json(path) if path.is_file() else None

    @property
    def pipeline_dir(self) -> Path:
        return self.path / "pipeline"

    def pipeline(self, device: str | None = None):
        """The trained model as a diffusers pipeline (LoRA adapters loaded for a LoRA sd run)."""
        if self.is_sd:
            from pudm.sd_pipeline import load_run_pipeline

            return load_run_pipeline(self.path, device=device or _device())
        from pudm.models import load_pipeline

        return load_pipeline(pipeline_folder(self.path), device=device or _device())


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_trackers(report_to: str) -> None:
    from pudm.processes import check_trackers

    check_trackers(report_to)


def train(
    config: RunConfig | None,
    out: PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    auto_beta: bool = False,
    show_progress: bool = True,
    push_to_hub: str | None = None,
    report_to: str = "none",
) -> Run:
    """Train ``config`` into the run folder ``out`` and return the :class:`Run`.

    Args:
        config: what to train (:func:`preset`, then change fields). With ``resume=True`` it may be
            None (the run's own config); a config that differs from the stored one is an error.
        resume: continue the run in ``out`` from its last checkpoint (a complete run is returned
            as it is).
        overwrite: replace the run in ``out``.
        auto_beta: estimate beta from U and S first (:func:`estimate_beta`) and train with it; the
            whole estimate is kept in the run's config.
        show_progress: the training progress bar.
        push_to_hub: upload the saved pipeline (with its model card) to this Hub repository when
            the run ends; the Hub and a token are checked before anything is trained.
        report_to: ``"tensorboard"``, ``"wandb"``, ``"all"`` or ``"none"``: experiment trackers
            (through accelerate) that mirror metrics.jsonl and get the sample grid; RUN/logs/.

    Under ``accelerate launch`` every process calls this; the main process alone writes.
    """
    from pudm.datasets import split_from_config
    from pudm.training import Trainer

    out = Path(out)
    folder = _run_folder(out, resume, overwrite, report_to, push_to_hub)
    if resume:
        config = _resumed(out, config, _stored_config(out), RunConfig.normalize)
    if config is None:
        raise UsageError("train needs a config (pudm.preset(...)) unless it resumes a run")
    config.validate()
    method = methods.get(config.train.method)
    caution = method.sampler_caution(config.model.prediction_type, config.sample.sampler)
    if caution:
        log.warning("warning: %s", caution)
    split = split_from_config(config, report=log.warning)
    method.check_data(split, config.train.filter_folds)
    if auto_beta and not resume:
        _estimate_beta_first(config, split)
    if resume and folder.complete:
        _push(out, push_to_hub)
        return Run(out)
    summary = split.summary()
    hidden = summary["unlabeled_sensitive"]
    _start_writing(
        folder,
        overwrite,
        f"{config.preset}, method {config.train.method}, beta {config.train.beta}, U {summary['unlabeled']}"
        + (f" (hidden sensitive {hidden})" if hidden is not None else "")
        + f", S {summary['sensitive']}, {config.train.steps} steps",
    )
    Trainer(config, split, out, show_progress=show_progress, report_to=report_to).train(resume=resume)
    _push(out, push_to_hub)
    return Run(out)


def _run_folder(out: Path, resume: bool, overwrite: bool, report_to: str, push_to_hub: str | None):
    """The run folder, checked with everything a run needs before it starts (nothing written)."""
    folder = runs.RunFolder(out)
    folder.check(resume, overwrite)
    _check_trackers(report_to)
    if push_to_hub:
        check_hub(push_to_hub)
    return folder


def _resumed(out: Path, config, stored, normalize=lambda values: values):
    """A resumed run's config: the stored one; a config given must be the same."""
    if config is not None and normalize(config.to_dict()) != stored.to_dict():
        raise runs.RunError(
            f"--resume: {out} was trained with other settings than the config given: resume with "
            "config=None (the run's own), or start a new run with overwrite=True"
        )
    return stored


def _estimate_beta_first(config: RunConfig, split) -> None:
    """``--beta auto``: beta estimated from U and S (the whole estimate kept in the config)."""
    from pudm.prior import apply_estimate, describe, estimate_for_config

    if not methods.get(config.train.method).uses_beta:
        raise UsageError(f"--beta auto: method {config.train.method} does not use beta: drop --beta")
    estimate = estimate_for_config(config, split)
    apply_estimate(config, estimate)
    log.info("--beta auto: %s", describe(estimate))
    for warning in estimate.warnings:
        log.warning("warning: %s", warning)


def _start_writing(folder, overwrite: bool, what: str) -> None:
    """Under ``accelerate launch`` every process gets here, all of them having validated; the
    main process alone prepares the folder and says what it trains, while the others wait."""
    from pudm.processes import process_state

    state = process_state()
    if state.is_main_process:
        folder.make_writable()
        if overwrite:
            folder.clear()
        processes = f", {state.num_processes} processes" if state.num_processes > 1 else ""
        log.info("%s%s -> %s", what, processes, folder.path)
    state.wait_for_everyone()


def _push(out: Path, repo_id: str | None) -> None:
    from pudm.processes import process_state

    if repo_id and process_state().is_main_process:
        log.info("uploaded to %s", push(out, repo_id))


def train_sd(
    config,
    out: PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    push_to_hub: str | None = None,
    report_to: str = "none",
) -> Run:
    """Fine-tune a Stable Diffusion pipeline (``pudm.sd.SDRunConfig``) into ``out``.

    With ``resume=True``, ``config`` may be None (the run's own); the images in the folders must
    be the ones the run started with.
    """
    from pudm.processes import process_state
    from pudm.sd import data_fingerprints, is_sd_run, load_run_config, load_text_images, resolve_steps
    from pudm.sd_pipeline import load_parts
    from pudm.sd_task import SDTrainer

    out = Path(out)
    folder = _run_folder(out, resume, overwrite, report_to, push_to_hub)
    if resume:
        if not is_sd_run(out):
            raise UsageError(f"--resume: {out} holds no pudm sd run (no config.json of one): drop --resume")
        config = _resumed(out, config, load_run_config(out))
    if config is None:
        raise UsageError("train_sd needs a config (pudm.sd.SDRunConfig) unless it resumes a run")
    config.validate()
    data = load_text_images(config.data, need_sensitive=methods.get(config.train.method).uses_sensitive)
    found = data_fingerprints(data)
    if resume:
        if found != config.data.fingerprints:
            raise UsageError(
                f"--resume: the images in --unlabeled/--sensitive changed since {out} started: "
                "put them back, or start a new run with --overwrite"
            )
        if folder.complete:
            _push(out, push_to_hub)
            return Run(out)
    else:
        config.data.fingerprints = found
        config.data.num_unlabeled, config.data.num_sensitive = data.num_unlabeled, data.num_sensitive
        resolve_steps(config, data, process_state().num_processes)
        config.validate()
        if config.train.warm_start_steps >= config.train.steps:
            raise UsageError(
                f"--warm-start-steps must be in [0, --steps {config.train.steps}), got "
                f"{config.train.warm_start_steps}"
            )
    # Load the pipeline before anything is written: a bad pretrained model leaves no half-made run.
    parts = load_parts(config.model.pretrained)
    skipped = data.skipped()
    if skipped and process_state().is_main_process:
        log.warning(
            "skipped %d unreadable image(s), e.g. %s (%s); --strict makes this an error",
            len(skipped),
            *skipped[0],
        )
    mode = f"LoRA rank {config.model.lora_rank}" if config.lora else "full UNet"
    _start_writing(
        folder,
        overwrite,
        f"{config.model.pretrained}, {mode}, method {config.train.method}, beta {config.train.beta}, "
        f"U {config.data.num_unlabeled}, S {config.data.num_sensitive}, {len(data.captions)} caption(s), "
        f"{config.data.resolution} px, {config.train.steps} steps",
    )
    SDTrainer(config, data, out, show_progress=show_progress, parts=parts, report_to=report_to).train(
        resume=resume
    )
    _push(out, push_to_hub)
    return Run(out)


def sample(
    run: Run | PathLike,
    num: int = 64,
    seed: int = 0,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    class_label: int | None = None,
    prompt: str | None = None,
    guidance_scale: float | None = None,
    show_progress: bool = True,
) -> np.ndarray:
    """``num`` samples of a run (or a diffusers pipeline folder) as uint8 (N, H, W, C).

    The sampler and its steps default to the run's. A class-conditional model draws U's label
    unless ``class_label`` says otherwise; a ``pudm sd`` run takes ``prompt`` and
    ``guidance_scale``; a ``reject`` run's samples pass its rejector (its pipeline folder alone,
    given directly, does not reject).
    """
    return sample_described(
        run,
        num,
        seed,
        sampler=sampler,
        steps=steps,
        class_label=class_label,
        prompt=prompt,
        guidance_scale=guidance_scale,
        show_progress=show_progress,
    )[0]


def sample_described(
    run: Run | PathLike,
    num: int = 64,
    seed: int = 0,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    class_label: int | None = None,
    prompt: str | None = None,
    guidance_scale: float | None = None,
    show_progress: bool = True,
) -> tuple[np.ndarray, str]:
    """:func:`sample`, and one line that says how the samples were made."""
    path = Path(run)
    if num <= 0:
        raise UsageError(f"--num must be > 0, got {num}")
    if steps is not None and steps <= 0:
        raise UsageError(f"--steps must be > 0, got {steps}")
    from pudm.sd import is_sd_run

    if is_sd_run(path):
        return _sample_sd(path, num, seed, sampler, steps, prompt, guidance_scale)
    if prompt is not None or guidance_scale is not None:
        raise UsageError(f"--prompt and --guidance-scale are for pudm sd runs; {path} is not one: drop them")
    from pudm.run_model import RunModel

    model = RunModel.load(path, sampler=sampler, steps=steps, class_label=class_label)
    if model.caution:
        log.warning("warning: %s", model.caution)
    drawn = model.draw(num, seed, show_progress=show_progress)
    return drawn.images, drawn.description


def _sample_sd(path, num, seed, sampler, steps, prompt, guidance_scale) -> tuple[np.ndarray, str]:
    from pudm.sd import load_run_config
    from pudm.sd_pipeline import generate_sd, load_run_pipeline

    config = load_run_config(path)
    prompt = prompt or (config.sample.prompts[0] if config.sample.prompts else config.data.unlabeled_prompt)
    if not prompt:
        raise UsageError("--prompt TEXT is required: this run has no default prompt")
    sampler = sampler or config.sample.sampler
    steps = steps or (config.sample.steps if sampler == config.sample.sampler else default_steps(sampler))
    pipeline = load_run_pipeline(path, device=_device())
    guidance = config.sample.guidance_scale if guidance_scale is None else guidance_scale
    images = generate_sd(
        pipeline,
        prompt,
        num=num,
        sampler=sampler,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        resolution=config.data.resolution,
    )
    return images, f"{prompt!r}, {sampler}, {steps} steps, guidance {guidance}"


def evaluate(
    run: Run | PathLike,
    classifier,
    num: int = 1000,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    inception: bool = False,
    inception_weights: PathLike | None = None,
    prompt: str | None = None,
    reference: PathLike | None = None,
    show_progress: bool = True,
) -> dict:
    """Judge ``num`` samples of a run with an evaluation classifier (a folder from
    :func:`train_classifier` or a loaded ``pudm.classifier.Classifier``); writes and returns what
    ``RUN/eval.json`` holds."""
    from pudm.classifier import Classifier
    from pudm.evaluation import evaluate_run, evaluate_sd_run
    from pudm.sd import is_sd_run

    path = Path(run)
    if num <= 0:
        raise UsageError(f"--num must be > 0, got {num}")
    if steps is not None and steps <= 0:
        raise UsageError(f"--sample-steps must be > 0, got {steps}")
    if not path.is_dir():
        raise UsageError(f"{path} does not exist: give a run folder")
    if not isinstance(classifier, Classifier):
        classifier = Classifier.load(Path(classifier))
    if is_sd_run(path):
        if inception:
            raise UsageError("--inception is not available for pudm sd runs yet: drop it (see --reference)")
        return evaluate_sd_run(
            path,
            classifier,
            prompt=prompt,
            num=num,
            sampler=sampler,
            steps=steps,
            seed=seed,
            reference=None if reference is None else Path(reference),
        )
    if prompt is not None or reference is not None:
        raise UsageError(f"--prompt and --reference are for pudm sd runs; {path} is not one: drop them")
    return evaluate_run(
        path,
        classifier,
        num=num,
        sampler=sampler,
        steps=steps,
        seed=seed,
        with_inception=inception,
        inception_weights=None if inception_weights is None else Path(inception_weights),
        show_progress=show_progress,
    )


def estimate_beta(config: RunConfig, *, epochs: int | None = None, cross_check: bool = True):
    """beta, the share of sensitive items in U, estimated from U and S (``pudm estimate-prior``):
    a ``pudm.prior.PriorEstimate`` with its 95% interval, method, cross-check and warnings
    (``.to_dict()`` is what ``--json`` prints)."""
    from pudm.datasets import split_from_config
    from pudm.prior import estimate_for_config

    if epochs is not None:
        if epochs <= 0:
            raise UsageError(f"--epochs must be > 0, got {epochs}")
        config.train.filter_epochs = epochs
    config.validate()
    split = split_from_config(config)
    estimate = estimate_for_config(config, split, cross_check=cross_check)
    for warning in estimate.warnings:
        log.warning("warning: %s", warning)
    return estimate


def train_classifier(
    out: PathLike,
    config: RunConfig | None = None,
    *,
    normal: PathLike | None = None,
    sensitive: PathLike | None = None,
    arch: str = "cnn",
    epochs: int = 30,
    seed: int = 0,
    image_size: int | None = None,
    channels: int = 3,
    strict: bool = False,
    weights: PathLike | None = None,
    overwrite: bool = False,
):
    """Train and save an evaluation classifier: of a preset's real labels (``config``), or normal
    vs sensitive from two image folders (``normal``, ``sensitive``). Returns the
    ``pudm.classifier.Classifier``; its ``info`` has the held-out accuracy and recalls."""
    from pudm.classifier import FitConfig, train_for_config

    out = Path(out)
    check_classifier_arguments(out, arch, epochs, overwrite)
    fit_config = FitConfig(epochs=epochs, seed=seed)
    weights = None if weights is None else Path(weights)
    if normal is not None or sensitive is not None:
        classifier = _folder_classifier(
            normal, sensitive, image_size, channels, strict, arch, fit_config, weights
        )
    else:
        config = config or _config_preset("digits_even")
        if image_size is not None:
            config.data.image_size = image_size
        config.validate()
        classifier = train_for_config(config, arch=arch, fit_config=fit_config, weights=weights)
    classifier.save(out)
    return classifier


def check_classifier_arguments(out: Path, arch: str, epochs: int, overwrite: bool) -> None:
    """What :func:`train_classifier` checks before it reads any data."""
    from pudm.classifier import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise UsageError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if epochs <= 0:
        raise UsageError(f"--epochs must be > 0, got {epochs}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "config.json").is_file():
            raise UsageError(f"--out {out} exists and is not a classifier folder: choose a new folder")
        if not overwrite:
            raise UsageError(f"--out {out} already holds a classifier: pass --overwrite to replace it")


def _folder_classifier(normal, sensitive, image_size, channels, strict, arch, fit_config, weights):
    """Normal (class 0) vs sensitive (class 1) from two image folders."""
    import torch

    from pudm.classifier import train_classifier as fit_classifier
    from pudm.readers import load_images

    if normal is None or sensitive is None:
        raise UsageError("a folder classifier needs both --normal DIR and --sensitive DIR")
    size = image_size or 64
    normal = load_images(str(normal), size, channels, strict, "--normal")
    sensitive = load_images(str(sensitive), size, channels, strict, "--sensitive")
    for found in (normal, sensitive):
        if len(found) < 5:
            raise UsageError(f"{found.where} holds {len(found)} readable images: a classifier needs >= 5")
    images = torch.cat([normal.as_float(), sensitive.as_float()])
    labels = torch.cat([torch.zeros(len(normal)), torch.ones(len(sensitive))]).long()
    return fit_classifier(
        images,
        labels,
        arch=arch,
        source="folders",
        normal_classes=(0,),
        preset="folders",
        fit_config=fit_config,
        weights=weights,
    )


def benchmark(
    preset_name: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: PathLike,
    **options,
) -> dict:
    """Methods x seeds (x betas): train, sample and evaluate every cell; write results.json,
    table.md and plots into ``out``; return the results. ``options`` are those of
    :func:`pudm.benchmark.run_benchmark` (betas, steps, num, classifier_path, sampler,
    sample_steps, pretrained, learning_rate, data_dir, show_progress, log)."""
    from pudm.benchmark import run_benchmark

    sample_steps = options.get("sample_steps")
    if sample_steps is not None and sample_steps <= 0:
        raise UsageError(f"--sample-steps must be > 0, got {sample_steps}")
    steps = options.get("steps")
    if steps is not None and steps <= 0:
        raise UsageError(f"--steps must be > 0, got {steps}")
    _config_preset(preset_name)  # an unknown preset is an error before anything runs
    options.setdefault("log", log.info)
    return run_benchmark(preset_name, methods, seeds, Path(out), **options)
