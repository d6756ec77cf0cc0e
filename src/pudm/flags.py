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

_TYPES = {"int": int, "float": float, "str": str}


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


def given(args: argparse.Namespace, flags: list[Flag]) -> list[tuple[Flag, Any]]:
    """The flags the user gave, with their values as the config stores them."""
    out = []
    for flag in flags:
        value = getattr(args, flag.name, None)
        if value is None:
            continue
        if isinstance(value, Path):
            value = str(value.resolve())  # the run can be resumed from anywhere
        elif isinstance(value, list):
            value = tuple(value)
        out.append((flag, value))
    return out


def apply(config: Any, values: list[tuple[Flag, Any]]) -> None:
    """Set every given flag's field."""
    for flag, value in values:
        setattr(getattr(config, flag.section), flag.field, value)
