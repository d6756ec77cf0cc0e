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

from pudm import flags, runs
from pudm.cards import check_hub, push
from pudm.config import AUTO, BETA_METHODS, SECTIONS, RunConfig, default_steps
from pudm.config import preset as _config_preset
from pudm.errors import UsageError

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
            from pudm.sd import load_run_pipeline

            return load_run_pipeline(self.path, device=device or _device())
        from pudm.models import load_pipeline

        return load_pipeline(pipeline_folder(self.path), device=device or _device())


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def preset(
    name: str | None = None,
    *,
    unlabeled: PathLike | None = None,
    sensitive: PathLike | None = None,
    test: PathLike | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    class_conditional: bool = False,
    **settings,
) -> RunConfig:
    """A fresh copy of a named preset (default ``digits_even``; ``folders`` when folders are given),
    with ``settings`` applied (their values are checked when the run starts, by :func:`train`).

    Args:
        unlabeled, sensitive, test: image folders (``pudm.preset("folders", unlabeled="U/",
            sensitive="S/")``), stored absolute so the run can be resumed from anywhere.
        model: a UNet preset (``small``, ...) instead of the preset's; its prediction type stays.
        pretrained: fine-tune this DDPM/DDIM pipeline (folder, pudm run or hub id): the model
            section becomes the pipeline's UNet and the end-of-run grid DDIM 50, as the paper.
            A preset that fine-tunes (``CelebA_male``) reads its pipeline's config here (from the
            hub, or its cache, for a hub id).
        class_conditional: a UNet conditioned on the set each item came from (U: 0, S: 1).
        settings: any setting by its flag's name, ``method="pu", steps=3000, beta=0.1,
            sample_steps=20`` (``pudm train --help`` lists them).
    """
    folders = {"unlabeled_dir": unlabeled, "sensitive_dir": sensitive, "test_dir": test}
    given = {field: value for field, value in folders.items() if value is not None}
    config = _config_preset(name or ("folders" if given else "digits_even"))
    if given and config.data.source != "folders":
        flag = next(iter(given)).removesuffix("_dir")
        raise UsageError(
            f"--{flag} gives image folders, and preset {config.preset} brings its own data: "
            "drop --preset (or use --preset folders)"
        )
    for field, value in given.items():
        setattr(config.data, field, str(Path(value).resolve()))
    pretrained = pretrained or config.model.pretrained
    return customize(
        config, model=model, pretrained=pretrained, class_conditional=class_conditional, **settings
    )


def customize(
    config: RunConfig,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    class_conditional: bool = False,
    **settings,
) -> RunConfig:
    """``config`` with a model preset, a pretrained pipeline, class conditioning and ``settings``
    (by flag name) applied, in the order the command line applies them; see :func:`preset`."""
    from pudm.models import model_preset
    from pudm.training import SET_CLASSES

    folders = [name for name in ("unlabeled", "sensitive", "test") if settings.get(name) is not None]
    if folders and config.data.source != "folders":
        raise UsageError(
            f"--{folders[0]} gives image folders, and preset {config.preset} brings its own data: "
            "drop --preset (or use --preset folders)"
        )
    if settings.get("beta") is not None:
        config.train.beta_estimate = None  # a beta given now is not the estimate of another run
    if model is not None:
        prediction_type = config.model.prediction_type  # the preset's, unless a setting changes it
        config.model = model_preset(model)
        config.model.prediction_type = prediction_type
    flags.apply(config, flags.flags_of(SECTIONS, "train"), settings)
    if class_conditional:
        config.model.num_classes = SET_CLASSES
    if pretrained:
        _use_pretrained(config, pretrained, settings)
    return config


def load_config(path: PathLike, **settings) -> RunConfig:
    """A run's config from a file (:func:`read_config_file`) with ``settings`` (flag names, and
    ``model``, ``pretrained``, ``class_conditional``, as :func:`preset`) applied over it, checked.
    An error about a value of the file names the file and the key."""
    config = read_config_file(path)
    if config.model.pretrained and config.model.pretrained_image_size is None:  # a preset that fine-tunes
        settings["pretrained"] = settings.get("pretrained") or config.model.pretrained
    config = customize(config, **settings)
    try:
        config.validate()
    except UsageError as error:
        raise config_file_error(path, error, settings) from None
    return config


def read_config_file(path: PathLike) -> RunConfig:
    """A run's config from a file: TOML (``preset = "..."`` and any of the sections ``[data]``,
    ``[model]``, ``[train]``, ``[sample]`` with the field names of a run's config.json; what is
    not given is the preset's), or a run's own ``config.json`` ("train again like that run").

    Paths in the file (folders, ``data_dir``, a local ``pretrained``) are relative to the file's
    folder. Unknown keys and wrong types raise :class:`UsageError` naming the key; the ranges are
    checked by :func:`load_config`, once settings given beside the file are applied.
    """
    import tomllib

    path = Path(path)
    where = f"--config {path}"
    if not path.is_file():
        raise UsageError(f"{where}: no such file: give a TOML file or a run's config.json")
    try:
        if path.suffix == ".json":
            values = json.loads(path.read_text())
        else:
            values = tomllib.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise UsageError(
            f"{where}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({error})"
        ) from None
    if not isinstance(values, dict):
        raise UsageError(f"{where}: not a table of settings: give a TOML file or a run's config.json")
    if values.get("kind") is not None:
        raise UsageError(f"{where} is a {values['kind']} run's config (pudm sd): pudm train cannot use it")
    unknown = sorted(set(values) - {"preset", *SECTIONS})
    if unknown:
        raise UsageError(
            f"{where}: unknown key {unknown[0]!r}: the keys are preset and the sections {', '.join(SECTIONS)}"
        )
    try:
        stored = _config_preset(str(values.get("preset", "digits_even"))).to_dict()
    except UsageError as error:
        raise UsageError(f"{where}: {error}") from None
    for section, kind in SECTIONS.items():
        given = values.get(section, {})
        if not isinstance(given, dict):
            raise UsageError(f"{where}: {section} must be a table ([{section}]), got {given!r}")
        for key, value in given.items():
            value = _checked_value(where, section, kind, key, value)
            if isinstance(value, str) and key in _PATH_FIELDS.get(section, ()):
                relative = path.parent / value
                value = str(relative.resolve()) if key != "pretrained" or relative.exists() else value
            stored[section][key] = value
    return RunConfig.from_dict(stored)


# The fields of a config file that hold paths, resolved against the file's folder.
_PATH_FIELDS = {"data": ("data_dir", "unlabeled_dir", "sensitive_dir", "test_dir"), "model": ("pretrained",)}


def config_file_error(path: PathLike, error: UsageError, given: dict | None = None) -> UsageError:
    """A range error of a config from ``--config path``, naming the file and the key; ``given``:
    the flags given beside the file (an error about one of those is the flag's, not the file's)."""
    keys = [f for f in flags.flags_of(SECTIONS, "train") if str(error).startswith(f.option + " ")]
    if keys and given and keys[0].name in given:
        return error
    named = f" (key {keys[0].section}.{keys[0].field})" if keys else ""
    return UsageError(f"--config {path}: {error}{named}")


_TYPE_NAMES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,)}


def _checked_value(where: str, section: str, kind: type, key: str, value):
    """A config file's value, checked to have a field to go to and that field's type."""
    import dataclasses

    fields = {item.name: item for item in dataclasses.fields(kind)}
    if key not in fields:
        raise UsageError(
            f"{where}: unknown key {section}.{key}: the keys are a run's config.json's "
            "(pudm train --print-config shows them)"
        )
    allowed: tuple = ()
    for name in str(fields[key].type).replace(" ", "").split("|"):
        if name == "None":
            allowed += (type(None),)
        elif name.startswith("tuple"):
            allowed += (list, tuple)
        elif name in _TYPE_NAMES:
            allowed += _TYPE_NAMES[name]
        else:
            return value  # a type this check does not know: the dataclass decides
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        expected = " or ".join(sorted({t.__name__.replace("NoneType", "null") for t in allowed}))
        raise UsageError(f"{where}: {section}.{key} must be {expected}, got {value!r}")
    element = str(fields[key].type).replace(" ", "")
    if element.startswith("tuple[int") and any(type(item) is not int for item in value):
        raise UsageError(f"{where}: {section}.{key} must be a list of int, got {value!r}")
    if str(fields[key].type).startswith("float") and type(value) is int:
        return float(value)  # a float field given as 1 stores 1.0, as the flag does
    return value


def _use_pretrained(config: RunConfig, pretrained: str, settings: dict) -> None:
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
    if settings.get("prediction_type") not in (None, config.model.prediction_type):
        raise UsageError(
            f"--prediction-type: --pretrained {pretrained} predicts {config.model.prediction_type}: "
            "drop the flag"
        )
    if settings.get("sampler") is None:
        config.sample.sampler, config.sample.steps = "ddim", settings.get("sample_steps") or 50


def _check_trackers(report_to: str) -> None:
    from pudm.training import check_trackers

    check_trackers(report_to)


def _stored_config(out: Path) -> RunConfig:
    if not runs.holds_run(out):
        raise UsageError(f"--resume: {out} holds no run (no config.json): run without --resume")
    return RunConfig.from_dict(runs.read_json(out / runs.CONFIG))


def resume_config(
    out: PathLike,
    *,
    preset: str | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    **settings,
) -> RunConfig:
    """The config stored in the run ``out``; every setting given must repeat its stored value
    (``beta="auto"`` only for a run that estimated its beta)."""
    from pudm.models import model_preset

    out = Path(out)
    config = _stored_config(out)
    for flag in flags.flags_of(SECTIONS, "train"):  # in flag order, as the command line checks
        if flag.name not in settings:
            continue
        value = settings.pop(flag.name)
        if flag.name == "beta" and value == AUTO:
            if config.train.beta_estimate is None:
                raise UsageError(
                    f"--resume: {out} was trained with --beta {config.train.beta}, not auto: drop --beta"
                )
            continue
        flags.check_repeats(config, [flag], {flag.name: value}, out)
    flags.check_repeats(config, [], settings, out)  # what is left is unknown
    if model is not None and model_preset(model).block_out_channels != config.model.block_out_channels:
        raise UsageError(f"--resume: {out} was not trained with --model {model}: drop --model")
    if pretrained is not None:
        given = str(Path(pretrained).resolve()) if Path(pretrained).exists() else pretrained
        if given != config.model.pretrained:
            raise UsageError(
                f"--resume: {out} was fine-tuned from {config.model.pretrained}, not {given}: "
                "drop --pretrained"
            )
    if preset is not None and preset.lower() != config.preset.lower():
        raise UsageError(f"--resume: {out} is a {config.preset} run, not {preset}: drop --preset")
    return config


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
    from pudm.training import Trainer, check_method_fits_data, process_state, split_from_config

    out = Path(out)
    folder = runs.RunFolder(out)
    folder.check(resume, overwrite)
    _check_trackers(report_to)
    if push_to_hub:
        check_hub(push_to_hub)
    if resume:
        stored = _stored_config(out)
        if config is not None and RunConfig.normalize(config.to_dict()) != stored.to_dict():
            raise runs.RunError(
                f"--resume: {out} was trained with other settings than the config given: resume with "
                "config=None (the run's own), or start a new run with overwrite=True"
            )
        config = stored
    if config is None:
        raise UsageError("train needs a config (pudm.preset(...)) unless it resumes a run")
    config.validate()
    split = split_from_config(config, report=log.warning)
    check_method_fits_data(config.train.method, split, config.train.filter_folds)
    if auto_beta and not resume:
        if config.train.method not in BETA_METHODS:
            raise UsageError(f"--beta auto: method {config.train.method} does not use beta: drop --beta")
        from pudm.prior import apply_estimate, describe, estimate_for_config

        estimate = estimate_for_config(config, split)
        apply_estimate(config, estimate)
        log.info("--beta auto: %s", describe(estimate))
        for warning in estimate.warnings:
            log.warning("warning: %s", warning)
    if resume and folder.complete:
        _push(out, push_to_hub)
        return Run(out)
    # Under `accelerate launch` every process runs this: all of them validate, then the main
    # process alone touches the folder while the others wait.
    state = process_state()
    if state.is_main_process:
        folder.make_writable()
        if overwrite:
            folder.clear()
        summary = split.summary()
        processes = f", {state.num_processes} processes" if state.num_processes > 1 else ""
        hidden = (
            f" (hidden sensitive {summary['unlabeled_sensitive']})"
            if summary["unlabeled_sensitive"] is not None
            else ""
        )
        log.info(
            "%s, method %s, beta %s, U %s%s, S %s, %s steps%s -> %s",
            config.preset,
            config.train.method,
            config.train.beta,
            summary["unlabeled"],
            hidden,
            summary["sensitive"],
            config.train.steps,
            processes,
            out,
        )
    state.wait_for_everyone()
    Trainer(config, split, out, show_progress=show_progress, report_to=report_to).train(resume=resume)
    _push(out, push_to_hub)
    return Run(out)


def _push(out: Path, repo_id: str | None) -> None:
    from pudm.training import process_state

    if repo_id and process_state().is_main_process:
        log.info("uploaded to %s", push(out, repo_id))


def sd_config(**settings):
    """The paper's Stable Diffusion settings (``pudm.sd.SDRunConfig``) with ``settings`` applied
    by their flags' names (``unlabeled="U/", sensitive="S/", lora_rank=4, steps=100``), and the
    defaults that follow from them: lr 1e-5 for pu and 1e-4 otherwise, the sampler's own step
    count, 1000 epochs unless ``steps`` or ``epochs`` is given."""
    from pudm.sd import SD_SECTIONS, SDRunConfig, default_learning_rate

    if settings.get("steps") is not None and settings.get("epochs") is not None:
        raise UsageError("give --steps or --epochs, not both")
    config = SDRunConfig()
    flags.apply(config, flags.flags_of(SD_SECTIONS, "sd"), settings)
    if settings.get("lr") is None:
        config.train.learning_rate = default_learning_rate(config.train.method)
    if settings.get("sampler") is not None and settings.get("sample_steps") is None:
        config.sample.steps = default_steps(settings["sampler"])
    if settings.get("steps") is None and settings.get("epochs") is None:
        config.model.epochs = 1000  # the paper's 1000 epochs
    if config.model.pretrained and Path(config.model.pretrained).exists():
        config.model.pretrained = str(Path(config.model.pretrained).resolve())
    if config.train.method == "unsupervised":
        config.data.sensitive, config.data.sensitive_prompt = None, None
    config.validate()
    return config


def sd_resume_config(out: PathLike, **settings):
    """The settings stored in the Stable Diffusion run ``out``; a setting given must repeat them."""
    from pudm.sd import SD_SECTIONS, is_sd_run, load_run_config

    out = Path(out)
    if not is_sd_run(out):
        raise UsageError(f"--resume: {out} holds no pudm sd run (no config.json of one): drop --resume")
    config = load_run_config(out)
    if settings.get("pretrained") is not None and Path(settings["pretrained"]).exists():
        settings["pretrained"] = str(Path(settings["pretrained"]).resolve())
    flags.check_repeats(config, flags.flags_of(SD_SECTIONS, "sd"), settings, out)
    return config


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
    from pudm.sd import (
        SDTrainer,
        data_fingerprints,
        is_sd_run,
        load_parts,
        load_run_config,
        load_text_images,
        resolve_steps,
    )
    from pudm.training import process_state

    out = Path(out)
    folder = runs.RunFolder(out)
    folder.check(resume, overwrite)
    _check_trackers(report_to)
    if push_to_hub:
        check_hub(push_to_hub)
    if resume:
        if not is_sd_run(out):
            raise UsageError(f"--resume: {out} holds no pudm sd run (no config.json of one): drop --resume")
        stored = load_run_config(out)
        if config is not None and config.to_dict() != stored.to_dict():
            raise runs.RunError(
                f"--resume: {out} was trained with other settings than the config given: resume with "
                "config=None (the run's own), or start a new run with overwrite=True"
            )
        config = stored
    if config is None:
        raise UsageError("train_sd needs a config (pudm.sd.SDRunConfig) unless it resumes a run")
    config.validate()
    data = load_text_images(config.data, need_sensitive=config.train.method != "unsupervised")
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
    state = process_state()
    if not resume:
        config.data.fingerprints = found
        config.data.num_unlabeled = len(data.unlabeled.files)
        config.data.num_sensitive = len(data.sensitive.files) if data.sensitive else 0
        resolve_steps(config, data, state.num_processes)
        config.validate()
        if config.train.warm_start_steps >= config.train.steps:
            raise UsageError(
                f"--warm-start-steps must be in [0, --steps {config.train.steps}), got "
                f"{config.train.warm_start_steps}"
            )
    # Load the pipeline before anything is written: a bad pretrained model leaves no half-made run.
    parts = load_parts(config.model.pretrained)
    if state.is_main_process:
        folder.make_writable()
        if overwrite:
            folder.clear()
        skipped = data.skipped()
        if skipped:
            log.warning(
                "skipped %d unreadable image file(s), e.g. %s (%s); --strict makes this an error",
                len(skipped),
                skipped[0][0],
                skipped[0][1],
            )
        mode = f"LoRA rank {config.model.lora_rank}" if config.lora else "full UNet"
        log.info(
            "%s, %s, method %s, beta %s, U %d, S %d, %d caption(s), %d px, %d steps%s -> %s",
            config.model.pretrained,
            mode,
            config.train.method,
            config.train.beta,
            config.data.num_unlabeled,
            config.data.num_sensitive,
            len(data.captions),
            config.data.resolution,
            config.train.steps,
            f", {state.num_processes} processes" if state.num_processes > 1 else "",
            out,
        )
    state.wait_for_everyone()
    SDTrainer(config, data, out, show_progress=show_progress, parts=parts, report_to=report_to).train(
        resume=resume
    )
    _push(out, push_to_hub)
    return Run(out)


def pipeline_folder(path: PathLike) -> Path:
    """The diffusers pipeline folder of a run folder, or ``path`` itself if it is one."""
    path = Path(path)
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
    import torch

    from pudm.models import load_pipeline
    from pudm.sampling import generate
    from pudm.training import UNLABELED_LABEL, load_rejector

    pipeline_dir = pipeline_folder(path)
    defaults = RunConfig().sample
    if pipeline_dir != path and runs.holds_run(path):
        defaults = RunConfig.from_dict(runs.read_json(path / runs.CONFIG)).sample
    sampler = sampler or defaults.sampler
    steps = steps or (defaults.steps if sampler == defaults.sampler else default_steps(sampler))
    pipeline = load_pipeline(pipeline_dir)
    classes = pipeline.unet.config.num_class_embeds
    if class_label is not None:
        if not classes:
            raise UsageError(f"{path} is not class-conditional: drop --class")
        if not 0 <= class_label < classes:
            raise UsageError(f"--class must be in 0..{classes - 1}, got {class_label}")
    label = class_label if class_label is not None else (UNLABELED_LABEL if classes else None)

    def draw(count: int, draw_seed: int) -> np.ndarray:
        return generate(
            pipeline.unet,
            pipeline.scheduler.config,
            num=count,
            sampler=sampler,
            steps=steps,
            seed=draw_seed,
            class_labels=None if label is None else torch.full((count,), label, dtype=torch.long),
            show_progress=show_progress,
        )

    # A reject run's samples pass its rejector here; its pipeline folder alone samples without it.
    rejector = load_rejector(path) if pipeline_dir != path else None
    if rejector is None:
        return draw(num, seed), f"{sampler}, {steps} steps"
    from pudm.filtering import sample_with_rejection

    images, rejection = sample_with_rejection(draw, rejector, num, seed)
    return (
        images,
        f"{sampler}, {steps} steps; the rejector dropped {rejection['rejected_share']:.1%} of draws",
    )


def _sample_sd(path, num, seed, sampler, steps, prompt, guidance_scale) -> tuple[np.ndarray, str]:
    from pudm.sd import generate_sd, load_run_config, load_run_pipeline

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
    from pudm.prior import estimate_for_config
    from pudm.training import split_from_config

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
    from pudm.imagefolder import load_folder

    if normal is None or sensitive is None:
        raise UsageError("a folder classifier needs both --normal DIR and --sensitive DIR")
    size = image_size or 64
    normal = load_folder(Path(normal), size, channels, strict, "--normal")
    sensitive = load_folder(Path(sensitive), size, channels, strict, "--sensitive")
    for folder in (normal, sensitive):
        if len(folder.files) < 5:
            raise UsageError(
                f"{folder.root} holds {len(folder.files)} readable images: a classifier needs >= 5"
            )
    images = torch.cat([normal.as_float(), sensitive.as_float()])
    labels = torch.cat([torch.zeros(len(normal.files)), torch.ones(len(sensitive.files))]).long()
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
