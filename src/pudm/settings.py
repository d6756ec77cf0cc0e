"""Settings: how a run's config is resolved, in layers, and where each value came from.

    preset  ->  config file  ->  settings (flags, or keyword arguments)  ->  derived defaults

A later layer overrides an earlier one. Derived defaults (the steps of a sampler, the fine-tuning
sampler, the sampler caution of a pu epsilon model, Stable Diffusion's learning rate and epochs)
fill in what follows from the layers above, and yield to a value that a config file or a setting
gave: they replace only what a preset or the dataclass defaults said. One function does this for
the command line, the Python API, the benchmark and ``pudm sd``, so the same file and settings
resolve to the same config everywhere. The resolved config carries its :class:`Sources`
(``--print-config`` prints them); they are not stored in ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pudm import flags, methods, runs
from pudm.config import AUTO, SECTIONS, RunConfig, default_steps
from pudm.config import preset as _config_preset
from pudm.errors import UsageError
from pudm.readers import stored_spec

PathLike = str | Path


@dataclass
class Sources:
    """Where each value of a resolved config came from.

    Attributes:
        base: what every value not named below comes from ("preset digits_even").
        given: ``{"section.field": "file run.toml" | "flag --steps" | "argument steps"}``.
        derived: ``{"section.field": why}`` for the values a derived default set.
    """

    base: str
    given: dict[str, str] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)
    # A config built by hand: every value of the base counts as given.
    base_is_given: bool = False

    def explicit(self, key: str) -> bool:
        """Whether a file or a setting gave ``key`` ("sample.sampler"): a derived default yields."""
        return self.base_is_given or key in self.given

    def derive(self, config, key: str, value: Any, why: str) -> None:
        """Set ``key`` to ``value`` as a derived default (never over a given value)."""
        if self.explicit(key):
            return
        section, name = key.split(".")
        if getattr(getattr(config, section), name) != value:
            setattr(getattr(config, section), name, value)
            self.derived[key] = why

    def lines(self, config) -> list[str]:
        """One line per value that does not come from the base: key, value and source."""
        rows = [(key, source) for key, source in self.given.items()]
        rows += [(key, f"derived: {why}") for key, why in self.derived.items()]
        out = []
        for key, source in sorted(rows):
            section, name = key.split(".")
            value = json.dumps(getattr(getattr(config, section), name), default=str)
            out.append(f"  {key} = {value}  ({source})")
        return [f"where the values came from (every other value: {self.base}):", *out]


def sources_of(config) -> Sources:
    """The sources a resolved config carries; a config built by hand gave every value itself."""
    return getattr(config, "sources", None) or Sources("the config as given", base_is_given=True)


# -- the pixel-space runs (pudm train) --------------------------------------------------------


def resolve(
    name: str | None = None,
    *,
    file: PathLike | None = None,
    base: RunConfig | None = None,
    given_by: str = "argument",
    model: str | None = None,
    pretrained: str | None = None,
    class_conditional: bool = False,
    **settings,
) -> RunConfig:
    """A run's config from its layers: a preset (``name``, default ``digits_even``; ``folders``
    when folders are given), a config ``file`` or a ``base`` config, then ``settings`` (by their
    flags' names, as ``given_by``: "flag" or "argument"), then the derived defaults.

    ``model``: a UNet preset instead of the preset's (its prediction type stays); ``pretrained``:
    fine-tune this DDPM/DDIM pipeline; ``class_conditional``: a UNet conditioned on the set each
    item came from (U: 0, S: 1). The values are checked when the run starts (or by the caller).
    """
    from pudm.models import model_preset
    from pudm.run_model import SET_CLASSES

    if file is not None:
        config, sources = _read_config_file(Path(file))
    elif base is not None:
        config, sources = base, sources_of(base)
    else:
        folders = any(settings.get(key) is not None for key in ("unlabeled", "sensitive", "test"))
        chosen = name or ("folders" if folders else "digits_even")
        config = _config_preset(chosen)
        sources = Sources(f"preset {config.preset}")
    folders = [key for key in ("unlabeled", "sensitive", "test") if settings.get(key) is not None]
    if folders and config.data.source != "folders":
        raise UsageError(
            f"--{folders[0]} gives your own data, and preset {config.preset} brings its own data: "
            "drop --preset (or use --preset folders)"
        )
    if settings.get("beta") is not None:
        config.train.beta_estimate = None  # a beta given now is not the estimate of another run
    if model is not None:
        prediction_type = config.model.prediction_type  # the preset's, unless a setting changes it
        config.model = model_preset(model)
        config.model.prediction_type = prediction_type
        sources.given["model.block_out_channels"] = _origin(given_by, "model")
    known = flags.flags_of(SECTIONS, "train")
    flags.apply(config, known, settings)
    for flag in known:
        if flag.name in settings:
            sources.given[f"{flag.section}.{flag.field}"] = _origin(given_by, flag.name)
    if class_conditional:
        config.model.num_classes = SET_CLASSES
        sources.given["model.num_classes"] = _origin(given_by, "class_conditional")
    pretrained = pretrained or (
        config.model.pretrained if config.model.pretrained_image_size is None else None
    )
    for rule in RULES:
        rule(config, sources, pretrained=pretrained, settings=settings)
    config.sources = sources
    return config


def _origin(given_by: str, name: str) -> str:
    return f"flag --{name.replace('_', '-')}" if given_by == "flag" else f"{given_by} {name}"


def _fine_tuning(config: RunConfig, sources: Sources, *, pretrained: str | None, settings: dict) -> None:
    """Fine-tuning: the model section describes the pretrained UNet; DDIM 50 samples, as the paper."""
    if not pretrained:
        return
    from pudm.models import pretrained_model_config

    if Path(pretrained).exists():
        pretrained = str(Path(pretrained).resolve())
    wanted_classes = config.model.num_classes
    config.model = pretrained_model_config(pretrained)
    for name in (f.name for f in dataclasses.fields(config.model)):
        sources.derived[f"model.{name}"] = f"--pretrained {pretrained}"
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
    sources.derive(
        config, "sample.sampler", "ddim", "a fine-tuned pipeline samples with DDIM 50, as the paper"
    )


def _steps_of_the_sampler(config: RunConfig, sources: Sources, **_) -> None:
    """A sampler that was chosen samples with its own default steps unless steps were given too."""
    if sources.explicit("sample.sampler") or "sample.sampler" in sources.derived:
        why = f"the default steps of {config.sample.sampler}"
        sources.derive(config, "sample.steps", default_steps(config.sample.sampler), why)


def _sampler_caution(config: RunConfig, sources: Sources, **_) -> None:
    """A sampler the method warns against is never a default (a preset's DDIM for a pu epsilon
    model): dpm-sde instead. A sampler a file or a setting chose stays, with a warning at train."""
    method = methods.get(config.train.method) if config.train.method in methods.REGISTRY else None
    if method is None or sources.explicit("sample.sampler"):
        return
    if not method.sampler_caution(config.model.prediction_type, config.sample.sampler):
        return
    why = f"{method.name} with the {config.model.prediction_type} loss: never a deterministic default sampler"
    sources.derive(config, "sample.sampler", "dpm-sde", why)
    sources.derive(config, "sample.steps", default_steps("dpm-sde"), why)


# The derived defaults of a pixel-space run, in the order they apply.
RULES: tuple[Callable[..., None], ...] = (_fine_tuning, _steps_of_the_sampler, _sampler_caution)


def preset(
    name: str | None = None,
    *,
    unlabeled: str | Path | None = None,
    sensitive: str | Path | None = None,
    test: str | Path | None = None,
    **settings: Any,
) -> RunConfig:
    """A fresh copy of a named preset (default ``digits_even``; ``folders`` when folders are given),
    with ``settings`` applied by their flags' names (``pudm.preset("digits_even", method="pu",
    steps=3000)``; ``pudm train --help`` lists them) and the defaults that follow from them.

    Args:
        name: the preset's name (``pudm train --help`` lists them).
        unlabeled: the image folder of U (``pudm.preset("folders", unlabeled="U/",
            sensitive="S/")``), stored absolute so the run can be resumed from anywhere.
        sensitive: the image folder of S, likewise.
        test: a folder of normal test images (the FID reference), likewise.
        **settings: flags by name; among them ``model`` (a UNet preset, ``small``, ...; its
            prediction type stays), ``pretrained`` (fine-tune this DDPM/DDIM pipeline: a folder,
            a pudm run or a hub id; the model section becomes its UNet and the end-of-run grid
            DDIM 50, as the paper; a preset that fine-tunes, ``CelebA_male``, reads its
            pipeline's config here) and ``class_conditional`` (a UNet conditioned on the set each
            item came from, U: 0, S: 1).
    """
    folders = {"unlabeled": unlabeled, "sensitive": sensitive, "test": test}
    given = {key: value for key, value in folders.items() if value is not None}
    return resolve(name, **given, **settings)


def customize(config: RunConfig, **settings) -> RunConfig:
    """``config`` with ``settings`` (as :func:`preset`) applied over it, and the derived defaults;
    a value ``config`` was resolved with (its :class:`Sources`) counts as given."""
    return resolve(base=config, **settings)


def load_config(path: PathLike, *, given_by: str = "argument", **settings) -> RunConfig:
    """A run's config from a file (:func:`read_config_file`) with ``settings`` (flag names, and
    ``model``, ``pretrained``, ``class_conditional``, as :func:`preset`) applied over it, checked.
    An error about a value of the file names the file and the key."""
    config = resolve(file=path, given_by=given_by, **settings)
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
    checked by :func:`load_config`, once settings given beside the file are applied; the derived
    defaults apply here as there, so a file resolves to one config.
    """
    return resolve(file=path)


def _read_config_file(path: Path) -> tuple[RunConfig, Sources]:
    import tomllib

    where = f"--config {path}"
    if not path.is_file():
        raise UsageError(f"{where}: no such file: give a TOML file or a run's config.json")
    try:
        values = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
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
    sources = Sources(f"preset {stored['preset']}")
    for section, kind in SECTIONS.items():
        given = values.get(section, {})
        if not isinstance(given, dict):
            raise UsageError(f"{where}: {section} must be a table ([{section}]), got {given!r}")
        for key, value in given.items():
            value = _checked_value(where, section, kind, key, value)
            if isinstance(value, str) and key in _SOURCE_FIELDS.get(section, ()):
                value = stored_spec(value, path.parent)
            elif isinstance(value, str) and key in _PATH_FIELDS.get(section, ()):
                relative = path.parent / value
                value = str(relative.resolve()) if key != "pretrained" or relative.exists() else value
            stored[section][key] = value
            sources.given[f"{section}.{key}"] = f"file {path.name}"
    return RunConfig.from_dict(stored), sources


# The fields of a config file that hold paths, resolved against the file's folder.
_PATH_FIELDS = {"data": ("data_dir",), "model": ("pretrained",)}
# Data sources (a folder, Parquet, tar shards, or a hub id that stays as it is).
_SOURCE_FIELDS = {"data": ("unlabeled_dir", "sensitive_dir", "test_dir")}


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


# -- resuming ---------------------------------------------------------------------------------


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
    config.sources = Sources(f"{out / runs.CONFIG} (a resumed run keeps its config)", base_is_given=True)
    return config


# -- Stable Diffusion runs (pudm sd) -----------------------------------------------------------


def sd_config(*, given_by: str = "argument", **settings):
    """The paper's Stable Diffusion settings (``pudm.sd.SDRunConfig``) with ``settings`` applied
    by their flags' names (``unlabeled="U/", sensitive="S/", lora_rank=4, steps=100``), and the
    defaults that follow from them: lr 1e-5 for pu and 1e-4 otherwise, the sampler's own step
    count, 1000 epochs unless ``steps`` or ``epochs`` is given."""
    from pudm.sd import SD_SECTIONS, SDRunConfig, default_learning_rate

    if settings.get("steps") is not None and settings.get("epochs") is not None:
        raise UsageError("give --steps or --epochs, not both")
    config = SDRunConfig()
    sources = Sources("the paper's Stable Diffusion settings")
    known = flags.flags_of(SD_SECTIONS, "sd")
    flags.apply(config, known, settings)
    for flag in known:
        if flag.name in settings:
            sources.given[f"{flag.section}.{flag.field}"] = _origin(given_by, flag.name)
    method = config.train.method
    sources.derive(
        config, "train.learning_rate", default_learning_rate(method), f"the paper's rate for {method}"
    )
    _steps_of_the_sampler(config, sources)
    if not (sources.explicit("train.steps") or sources.explicit("model.epochs")):
        sources.derive(config, "model.epochs", 1000, "the paper's 1000 epochs")
    if config.model.pretrained and Path(config.model.pretrained).exists():
        config.model.pretrained = str(Path(config.model.pretrained).resolve())
    if method in methods.REGISTRY and not methods.get(method).uses_sensitive:
        config.data.sensitive, config.data.sensitive_prompt = None, None
    config.validate()
    config.sources = sources
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
