"""Command-line flags made from the config dataclasses: one place for a setting, its flag and help.

A config field declared with :func:`pudm.config.flag` becomes ``--name`` on the commands whose
sections hold it; its value lands in ``args.<name>`` (None when not given: "keep the config's
value") and :func:`apply` copies every given one into the config.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from pudm.errors import UsageError

_TYPES = {"int": int, "float": float, "str": str}
AUTO = "auto"  # --beta auto (pudm.config.AUTO)


def _number_or_auto(text: str, kind, auto, flag: str, what: str):
    """``text`` as a ``kind`` number, or ``auto`` where it says auto; a one-line error otherwise."""
    if text == AUTO:
        return auto
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} takes {what} or auto, got {text!r}") from None


def beta_value(text: str) -> float | str:
    """``--beta``: a number, or auto."""
    return _number_or_auto(text, float, AUTO, "--beta", "a number in [0, 1)")


def noise_level(text: str) -> int | None:
    """``pudm audit --noise-level``: a DDPM timestep, or auto (None)."""
    return _number_or_auto(text, int, None, "--noise-level", "a timestep in [0, 1000)")


def data_source(text: str) -> str:
    """``--unlabeled`` and the like: a folder, Parquet file(s), a save_to_disk folder, tar shards
    (a brace pattern allowed) or a hub id (:mod:`pudm.readers`); made absolute when stored."""
    return text


def csv(kind, flag: str):
    """A comma-separated list of ``kind`` values."""

    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated values, got {text!r}") from None

    return parse


@dataclasses.dataclass(frozen=True)
class Flag:
    """One field of one config section as a flag."""

    section: str
    field: str
    name: str  # the flag without dashes, with underscores: also the argparse dest
    help: str
    group: str
    argparse: dict[str, Any]

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def flags_of(sections: dict[str, type], command: str) -> list[Flag]:
    """The flags of ``command`` over ``{section name: dataclass}``, in field order."""
    found = []
    for section, kind in sections.items():
        for item in dataclasses.fields(kind):
            if "help" not in item.metadata:
                continue
            text = item.metadata["help"]
            if isinstance(text, dict):
                if command not in text:
                    continue
                text = text[command]
            found.append(
                Flag(
                    section,
                    item.name,
                    item.metadata["name"] or item.name,
                    text,
                    item.metadata["group"],
                    dict(item.metadata["argparse"]),
                )
            )
            found[-1].argparse.setdefault("type", _field_type(item))
    return found


def _field_type(item: dataclasses.Field) -> Any:
    """int, float or str from the annotation (``int | None`` is int)."""
    annotation = str(item.type).split("|")[0].strip()
    return _TYPES.get(annotation, str)


def add(parser: argparse.ArgumentParser, flags: list[Flag], groups: dict[str, Any] | None = None) -> dict:
    """Add ``flags`` to ``parser`` in argument groups named by their fields; returns the groups."""
    groups = {} if groups is None else groups
    for flag in flags:
        group = groups.get(flag.group)
        if group is None:
            group = groups[flag.group] = parser.add_argument_group(flag.group)
        options = dict(flag.argparse)
        action = options.pop("action", None)
        if action in ("store_true", "store_false"):
            options.pop("type", None)
            group.add_argument(flag.option, dest=flag.name, action=action, default=None, help=flag.help)
            continue
        if action == "optional_bool":
            options.pop("type", None)
            action = argparse.BooleanOptionalAction
        group.add_argument(
            flag.option, dest=flag.name, action=action, default=None, help=flag.help, **options
        )
    return groups


def given(args: argparse.Namespace, flags: list[Flag]) -> dict[str, Any]:
    """The flags the user gave, ``{name: value}``: the settings :func:`apply` takes."""
    return {
        flag.name: getattr(args, flag.name) for flag in flags if getattr(args, flag.name, None) is not None
    }


def given_fields(args: argparse.Namespace, flags: list[Flag]) -> dict[str, Any]:
    """The flags the user gave, ``{field: value}``."""
    return {
        flag.field: getattr(args, flag.name) for flag in flags if getattr(args, flag.name, None) is not None
    }


def _stored(flag: Flag, value: Any) -> Any:
    """A value as the config stores it: paths absolute (the run can be resumed from anywhere)."""
    if flag.argparse.get("type") is data_source and isinstance(value, (str, Path)):
        from pudm.readers import stored_spec

        return stored_spec(value)
    if isinstance(value, Path) or (flag.argparse.get("type") is Path and isinstance(value, str)):
        return str(Path(value).resolve())
    if isinstance(value, list):
        return tuple(value)
    return value


def _by_name(flags: list[Flag], settings: dict[str, Any]) -> list[tuple[Flag, Any]]:
    known = {flag.name: flag for flag in flags}
    unknown = [name for name in settings if name not in known]
    if unknown:
        raise UsageError(
            f"unknown setting {unknown[0]!r}: use one of {', '.join(sorted(known))} (the flags' names)"
        )
    return [(known[name], _stored(known[name], value)) for name, value in settings.items()]


def apply(config: Any, flags: list[Flag], settings: dict[str, Any]) -> None:
    """Set the field of every setting ``{flag name: value}`` (``steps=3000``, ``sample_steps=20``)."""
    for flag, value in _by_name(flags, settings):
        setattr(getattr(config, flag.section), flag.field, value)


def check_repeats(config: Any, flags: list[Flag], settings: dict[str, Any], out: Path) -> None:
    """Resuming: every setting given again must repeat the value stored in the run ``out``."""
    for flag, value in _by_name(flags, settings):
        stored = getattr(getattr(config, flag.section), flag.field)
        if stored != value:
            raise UsageError(
                f"--resume: {out} was trained with {flag.option} {stored}, not {value}: "
                "drop the flag to resume, or start a new run with --overwrite"
            )
