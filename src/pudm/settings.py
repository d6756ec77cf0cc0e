"""Settings: how a run's config is made from a preset, a config file or a stored run, with
settings given by their flags' names (``pudm.preset("digits_even", method="pu", steps=3000)``).

The command line's flags land here by the same names; :mod:`pudm.api` runs what these build.
"""

from __future__ import annotations

import json
from pathlib import Path

from pudm import flags, runs
from pudm.config import AUTO, SECTIONS, RunConfig, default_steps, sampler_caution
from pudm.config import preset as _config_preset
from pudm.errors import UsageError

PathLike = str | Path


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
    folders = {"unlabeled": unlabeled, "sensitive": sensitive, "test": test}
    given = {flag: value for flag, value in folders.items() if value is not None}
    config = _config_preset(name or ("folders" if given else "digits_even"))
    pretrained = pretrained or config.model.pretrained
    return customize(
        config, model=model, pretrained=pretrained, class_conditional=class_conditional, **given, **settings
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
    sample = config.sample
    if settings.get("sampler") is None and sampler_caution(
        config.train.method, config.model.prediction_type, sample.sampler
    ):  # a preset's deterministic sampler is not this model's default (the paper presets: DDIM)
        sample.sampler = "dpm-sde"
        if settings.get("sample_steps") is None:
            sample.steps = default_steps("dpm-sde")
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
