"""What the documentation site generates instead of repeating: a MkDocs hook.

A page asks for generated text with a marker on a line of its own; the hook replaces it when the
site is built (``mkdocs build``), so nothing below is ever written twice by hand:

- ``<!-- pudm:results NAME -->``: the table of ``benchmarks/results/NAME/results.json`` (what
  ``pudm benchmark`` wrote), its judge and its per-seed figures;
- ``<!-- pudm:folder-case NAME -->``: the table of ``benchmarks/results/folder_cases/NAME.json``;
- ``<!-- pudm:audit-check NAME -->``: the label-free audit next to the judge, from
  ``benchmarks/results/audit_check/NAME.json`` (``benchmarks/audit_vs_judge.py``);
- ``<!-- pudm:flags -->``: every flag of every command, from the command line's own parser;
- ``<!-- pudm:config -->``: every key of a config file, from the config dataclasses;
- ``<!-- pudm:presets -->``: what each preset sets, against the defaults;
- ``<!-- pudm:methods -->``: the methods of the registry and what each one uses.

A code block that the tests do not run (``tests/test_docs.py`` runs every other one) follows a
line ``<!-- untested: why -->``; the site shows the reason. The figures of ``benchmarks/results``
are published under ``results/``. An unknown marker, or a results folder that does not exist,
stops the build.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"^<!-- pudm:([a-z-]+)(?: ([^ ]+))? -->$", re.M)
UNTESTED = re.compile(r"^<!-- untested: (.+?) -->$", re.M)

if str(ROOT / "src") not in sys.path:  # the site builds from a checkout, installed or not
    sys.path.insert(0, str(ROOT / "src"))


def results_table(name: str) -> str:
    """The benchmark table of ``benchmarks/results/NAME``, as ``pudm benchmark`` prints it."""
    from pudm.benchmark import markdown_table

    path = RESULTS / name / "results.json"
    if not path.is_file():
        raise ValueError(f"no benchmark results at {path.relative_to(ROOT)}")
    results = json.loads(path.read_text())
    lines = [
        markdown_table(
            results["summary"], results["num_samples"], results["sampler"], results["sampling_steps"]
        )
    ]
    judge = results.get("classifier") or {}
    if judge:
        recall = judge.get("heldout_sensitive_recall")
        said = f"Judge: {judge.get('arch', 'classifier')} on the real labels, held-out accuracy "
        said += f"{judge['heldout_accuracy']:.3f}"
        if recall is not None:
            said += f", recall of sensitive items {recall:.3f}"
        lines.append(said + ".\n")
    per_seed = []
    for row in results["summary"]:
        if len(row["seeds"]) < 2:
            continue
        figures = zip(
            row["non_sensitive_rate_per_seed"],
            row["fid_classifier_per_seed"],
            row["fid_pixels_per_seed"],
            strict=True,
        )
        per_seed.append(f"{row['label']} " + ", ".join(_triple(*values) for values in figures))
    if per_seed:
        seeds = ", ".join(str(seed) for seed in results["seeds"])
        lines.append(f"Per seed ({seeds}; rate / classifier FID / pixels): " + "; ".join(per_seed) + ".\n")
    lines.append(f"Source: `benchmarks/results/{name}/results.json`.\n")
    return "\n".join(lines)


def _triple(rate: float | None, fid: float | None, pixels: float | None) -> str:
    return f"{_figure(rate, 3)} / {_figure(fid, 2)} / {_figure(pixels, 2)}"


def _figure(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def folder_case_table(names: str) -> str:
    """Folder cases of ``benchmarks/folder_defaults.py`` (``NAME`` or ``NAME+NAME``: one table):
    methods as columns, samplers as rows; a second file's columns are labeled with its extra flags."""
    cells = {}
    for index, name in enumerate(names.split("+")):
        path = RESULTS / "folder_cases" / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"no folder case at {path.relative_to(ROOT)}")
        case = json.loads(path.read_text())
        for row in case["rows"]:
            label = row["method"] if index == 0 else f"{row['method']} ({case['args']['extra'].strip()})"
            cells[label, row["sampler"]] = row
    methods = list(dict.fromkeys(label for label, _ in cells))
    samplers = list(dict.fromkeys(sampler for _, sampler in cells))
    lines = ["| sampler | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for sampler in samplers:
        shown = []
        for method in methods:
            row = cells.get((method, sampler))
            figures = (row["non_sensitive_rate"], row["fid_classifier"], row["fid_pixels"]) if row else None
            shown.append("-" if row is None else _triple(*figures))
        lines.append(f"| {_sampler_name(sampler)} | " + " | ".join(shown) + " |")
    lines.append("")
    lines.append(
        "Rate by an SVM on all digits (not pudm's judge) / FID on pudm's digits CNN features / pixel "
        "Frechet distance; 500 samples per cell, one seed. Source: `benchmarks/results/folder_cases/`.\n"
    )
    return "\n".join(lines)


def audit_check_table(name: str) -> str:
    """The rows of ``benchmarks/audit_vs_judge.py``: the judge's share and the audit's, per run."""
    path = RESULTS / "audit_check" / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no audit check at {path.relative_to(ROOT)}")
    check = json.loads(path.read_text())
    lines = [
        "| run | judge's share | judge, corrected | audit (no labels) | 95% interval | noise level |",
        "|---|---|---|---|---|---|",
    ]
    for row in check["rows"]:
        audit = row["audit"]
        share = "-" if audit["sensitive_share"] is None else f"{audit['sensitive_share']:.3f}"
        interval = "-" if audit["interval"] is None else "[{:.3f}, {:.3f}]".format(*audit["interval"])
        lines.append(
            f"| {row['run']} | {row['judge_share']:.3f} | {row['judge_corrected']:.3f} | {share} | "
            f"{interval} | {audit['noise_level']} |"
        )
    seconds = ", ".join(f"{row['audit']['seconds']:.0f}" for row in check["rows"])
    lines.append("")
    lines.append(
        f"{check['num']} samples per run; the judge corrected for its held-out recall and its false "
        f"positives on the test split. Audit seconds (fitting included; CPU threads: "
        f"{check.get('cpu_threads', 'default')}): {seconds}. "
        f"Command: `{check['command']}`. Source: `benchmarks/results/audit_check/{name}.json`.\n"
    )
    return "\n".join(lines)


def _sampler_name(sampler: str) -> str:
    from pudm.config import DEFAULT_SAMPLING_STEPS

    if sampler == "diffusers":
        return "plain diffusers pipeline"
    return f"{sampler} {DEFAULT_SAMPLING_STEPS[sampler]}"


def _commands(parser: argparse.ArgumentParser, prefix: str = "pudm"):
    """(``pudm train``, its parser), ... for every command and sub-command, in the parser's order."""
    for action in parser._actions:  # argparse keeps sub-commands there; it has no public accessor
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from (
                    _commands(sub, f"{prefix} {name}")
                    if _has_subcommands(sub)
                    else [(f"{prefix} {name}", sub)]
                )


def _has_subcommands(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(action, argparse._SubParsersAction) for action in parser._actions)


def flags_reference() -> str:
    """Every flag of every command, by group, as the parsers define them."""
    from pudm.cli import build_parser

    out = []
    for command, parser in _commands(build_parser()):
        out.append(f"### `{command}`\n")
        if parser.description:
            out.append(parser.description + "\n")
        for group in parser._action_groups:
            actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
            positional = [a for a in group._group_actions if not a.option_strings]
            if not actions and not positional:
                continue
            out.append(f"**{group.title}**\n")
            out.append("| flag | value | default | what it does |\n|---|---|---|---|")
            for action in positional + actions:
                out.append(_flag_row(action))
            out.append("")
    return "\n".join(out)


def _flag_row(action: argparse.Action) -> str:
    names = " ".join(f"`{name}`" for name in action.option_strings) or f"`{action.metavar or action.dest}`"
    if action.nargs == 0:
        value = "-"
    elif action.choices:
        value = " / ".join(f"`{choice}`" for choice in action.choices)
    else:
        value = getattr(action.type, "__name__", "text").replace("_value", "").replace("Path", "path")
        value = {"str": "text", "parse": "list"}.get(value, value)
    default = action.default
    if default is None or default is argparse.SUPPRESS or action.nargs == 0:
        default = "-"
    else:
        default = f"`{default}`"
    text = (action.help or "").replace("|", "\\|").replace("\n", " ")
    return f"| {names} | {value} | {default} | {text} |"


def config_reference() -> str:
    """Every key a config file may hold, with its type, default and the flag that sets it."""
    from pudm.config import SECTIONS
    from pudm.sd import SD_SECTIONS

    out = []
    for title, sections in (
        ("`pudm train` (a TOML file or a run's config.json)", SECTIONS),
        ("`pudm sd` (a run's config.json)", SD_SECTIONS),
    ):
        out.append(f"### {title}\n")
        out.append("| key | type | default | flag | what it is |\n|---|---|---|---|---|")
        for section, kind in sections.items():
            defaults = kind()
            for item in dataclasses.fields(kind):
                out.append(_key_row(section, item, getattr(defaults, item.name)))
        out.append("")
    return "\n".join(out)


def _key_row(section: str, item: dataclasses.Field, default) -> str:
    meta = item.metadata
    text = meta.get("help", "")
    if isinstance(text, dict):
        text = next(iter(text.values()))
    flag = "-" if "help" not in meta else "`--" + (meta["name"] or item.name).replace("_", "-") + "`"
    kind = str(item.type).replace("|", "or")
    text = (text or _comment(item)).replace("|", "\\|")
    return f"| `{section}.{item.name}` | {kind} | `{json.dumps(default)}` | {flag} | {text} |"


def _comment(item: dataclasses.Field) -> str:
    return "set by the preset or the file" if "help" not in item.metadata else ""


def presets_reference() -> str:
    """Each preset's values that differ from the dataclass defaults (the rest are the defaults)."""
    from pudm.config import PRESETS, RunConfig

    base = RunConfig().to_dict()
    out = ["| preset | what it sets differently from the defaults |", "|---|---|"]
    for name, build in PRESETS.items():
        changed = []
        values = build().to_dict()
        for section, fields in values.items():
            if not isinstance(fields, dict):
                continue
            for key, value in fields.items():
                if base[section].get(key) != value:
                    changed.append(f"`{section}.{key}={json.dumps(value)}`")
        out.append(f"| `{name}` | {', '.join(changed) or '-'} |")
    return "\n".join(out) + "\n"


def methods_reference() -> str:
    """The registry: each method, what it uses, whether ``pudm sd`` offers it, and its summary."""
    from pudm import methods

    out = [
        "| method | uses S | uses beta | hidden truth | `pudm sd` | what it trains |",
        "|---|---|---|---|---|---|",
    ]
    for name, method in methods.REGISTRY.items():
        flags = (method.uses_sensitive, method.uses_beta, method.reads_hidden_truth, method.on_latents)
        shown = " | ".join("yes" if flag else "no" for flag in flags)
        out.append(f"| `{name}` | {shown} | {method.summary.replace('|', chr(92) + '|')} |")
    return "\n".join(out) + "\n"


GENERATORS = {
    "results": results_table,
    "folder-case": folder_case_table,
    "audit-check": audit_check_table,
    "flags": lambda _: flags_reference(),
    "config": lambda _: config_reference(),
    "presets": lambda _: presets_reference(),
    "methods": lambda _: methods_reference(),
}


def render(markdown: str, where: str = "page") -> str:
    """``markdown`` with every marker replaced; an unknown marker is an error naming the page."""

    def replace(match: re.Match) -> str:
        kind, argument = match.group(1), match.group(2)
        if kind not in GENERATORS:
            raise ValueError(f"{where}: unknown marker pudm:{kind}; known: {', '.join(GENERATORS)}")
        return GENERATORS[kind](argument)

    markdown = UNTESTED.sub(lambda match: f"*Not run by the tests: {match.group(1)}.*\n", markdown)
    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 - MkDocs' hook signature
    return render(markdown, page.file.src_path)


def on_files(files, config):
    """Publish the benchmark figures (``benchmarks/results/**/*.png``) under ``results/``."""
    from mkdocs.structure.files import File

    for path in sorted(RESULTS.rglob("*.png")):
        uri = "results/" + path.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
