"""The documentation cannot rot: the site builds in strict mode (a broken link or a documented
function that is gone fails it), what it generates is complete, the README stays a front page, and
every example in the README and on the site runs, at a test's size, on data the test writes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import pudm
from pudm.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(?:^<!-- untested: (?P<why>.+?) -->\n)?^```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$",
    re.M | re.S,
)
RUNNABLE = ("python", "bash", "toml")

# What every command gets appended in a test: the same command at a test's size (the last flag wins).
TINY = {
    ("train",): "--steps 3 --batch-size 8 --log-every 1 --checkpoint-every 3 --sample-steps 2 --grid-size 4 "
    "--filter-epochs 1 --filter-folds 2 --quiet",
    ("sample",): "--sample-steps 2",
    ("evaluate",): "--num 16 --sample-steps 2 --quiet",
    ("classifier", "train"): "--epochs 1",
    ("estimate-prior",): "--epochs 1",
    ("benchmark",): "--steps 3 --num 8 --sample-steps 2 --quiet",
    ("audit",): "--num 24 --sample-steps 2 --quiet",
}
# The Python examples at a test's size: each replaced piece must be on the page as written.
SMALLER = {
    "README.md": {
        'method="filter", beta=0.1)': 'method="filter", beta=0.1, steps=3, batch_size=8, filter_epochs=1, '
        "filter_folds=2, sample_steps=2, grid_size=4)",
    },
    "api.md": {
        "config.train.steps = 3000": "config.train.steps = 20",
        "num=1000": "num=40",
        "epochs=30": "epochs=2",
        "epochs=20": "epochs=2",
    },
}


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# -- the site --------------------------------------------------------------------------------------


def test_the_site_builds_in_strict_mode_with_every_generated_part(tmp_path):
    done = _mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    configuration = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "--sensitive-per-batch" in configuration and "train.pu_min_timestep" in configuration
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "pudm.train" in api and "resume" in api  # the signature and docstring of pudm.train
    assert (tmp_path / "site" / "results" / "digits_even_methods" / "rate_vs_fid.png").is_file()


def _minimal_site(tmp_path: Path, page: str) -> Path:
    """The project's own mkdocs.yml over a docs folder of one page."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(page)
    config.update(
        docs_dir=str(docs), nav=[{"Home": "index.md"}], hooks=[str(ROOT / "scripts" / "docs_hooks.py")]
    )
    path = tmp_path / "mkdocs.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "page,complaint",
    [
        ("# Home\n\nSee [the guide](no-such-page.md).\n", "no-such-page.md"),
        ("# Home\n\n::: pudm.no_such_function\n", "no_such_function"),
        ("# Home\n\n<!-- pudm:results no_such_benchmark -->\n", "no_such_benchmark"),
    ],
)
def test_a_broken_link_a_renamed_function_or_missing_results_fail_the_build(tmp_path, page, complaint):
    done = _mkdocs(_minimal_site(tmp_path, page), tmp_path / "site")
    assert done.returncode != 0 and complaint in done.stdout + done.stderr


def test_the_results_tables_are_the_json_they_come_from():
    hooks = _hooks()
    results = json.loads(
        (ROOT / "benchmarks" / "results" / "digits_even_methods" / "results.json").read_text()
    )
    table = hooks.render("<!-- pudm:results digits_even_methods -->")
    for row in results["summary"]:
        rate = f"{row['non_sensitive_rate_mean']:.3f} +- {row['non_sensitive_rate_std']:.3f}"
        line = next(line for line in table.splitlines() if line.startswith(f"| {row['label']} |"))
        assert rate in line and f"{row['fid_classifier_mean']:.2f}" in line
    with pytest.raises(ValueError, match="unknown marker pudm:resultz"):
        hooks.render("<!-- pudm:resultz digits_even_methods -->")
    check = json.loads((ROOT / "benchmarks" / "results" / "audit_check" / "digits.json").read_text())
    table = hooks.render("<!-- pudm:audit-check digits -->")
    for row in check["rows"]:
        line = next(line for line in table.splitlines() if line.startswith(f"| {row['run']} |"))
        assert f"{row['judge_share']:.3f}" in line and f"{row['audit']['sensitive_share']:.3f}" in line


def test_the_reference_holds_every_flag_of_every_command_and_every_config_key():
    hooks = _hooks()
    reference = hooks.flags_reference()
    for command, parser in hooks._commands(build_parser()):
        assert f"### `{command}`" in reference
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}`" in reference, f"{command} {option} is missing from the reference"
    keys = hooks.config_reference()
    for section, kind in pudm.config.SECTIONS.items():
        for name in kind.__dataclass_fields__:
            assert f"`{section}.{name}`" in keys


# -- the README ------------------------------------------------------------------------------------


def test_the_readme_is_a_front_page_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 250
    assert any("--unlabeled" in line for line in lines[:100]), (
        "the folder command must be on the first screen"
    )
    first = _blocks(ROOT / "README.md")[0][1].splitlines()
    assert "pudm demo" in first[0] and "pytest" in first[1], "the README starts with the two commands"
    assert text.index(first[0]) < 500
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)", text):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


# -- every example runs --------------------------------------------------------------------------


def _blocks(page: Path) -> list[tuple[str, str, str | None]]:
    return [(m["lang"], m["code"], m["why"]) for m in BLOCK.finditer(page.read_text())]


def _write_folders(root: Path) -> None:
    """U (34 textures + 6 discs), S (12 discs), T (normal), and a judge's two labeled folders."""
    rng = np.random.default_rng(0)
    size = 24

    def texture() -> np.ndarray:
        return (rng.random((size, size, 3)) * 120 + 60).astype(np.uint8)

    def disc() -> np.ndarray:
        yy, xx = np.mgrid[:size, :size]
        inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
        image = np.zeros((size, size, 3), np.uint8)
        image[inside] = rng.integers(200, 256, 3)
        return image

    for folder, makers in {
        "U": [texture] * 34 + [disc] * 6,
        "S": [disc] * 12,
        "T": [texture] * 10,
        "judge/normal": [texture] * 12,
        "judge/sensitive": [disc] * 12,
    }.items():
        (root / folder).mkdir(parents=True)
        for index, make in enumerate(makers):
            Image.fromarray(make()).save(root / folder / f"{index:03d}.png")


def _run_bash(code: str, page: str) -> None:
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assert words[0] == "pudm", (
            f"{page}: `{line}` is not a pudm command: mark its block untested, saying why"
        )
        tiny = next(
            (extra for command, extra in TINY.items() if tuple(words[1 : 1 + len(command)]) == command), ""
        )
        assert main(words[1:] + tiny.split()) == 0, f"{page}: `{line}` failed"


def _runnable(page: Path) -> list[tuple[str, str]]:
    return [(lang, code) for lang, code, why in _blocks(page) if lang in RUNNABLE and not why]


def test_every_code_block_runs_in_the_tests_or_says_why_not():
    for page in PAGES:
        for lang, _code, why in _blocks(page):
            assert why or lang in RUNNABLE or lang in ("text", ""), (
                f"{page.name}: a ```{lang} block with no reason"
            )


@pytest.mark.parametrize("page", [page for page in PAGES if _runnable(page)], ids=lambda page: page.name)
def test_every_example_on_the_page_runs(page, tmp_path, monkeypatch):
    runnable = _runnable(page)
    monkeypatch.chdir(tmp_path)
    _write_folders(tmp_path)
    namespace: dict = {}
    for lang, code in runnable:
        if lang == "toml":  # a config file the next commands read: its first line names it
            name = code.splitlines()[0].lstrip("# ").strip()
            Path(name).write_text(code)
        elif lang == "bash":
            _run_bash(code, page.name)
        else:
            for old, new in SMALLER.get(page.name, {}).items():
                assert old in code, f"{page.name}: the example no longer contains {old!r}"
                code = code.replace(old, new)
            exec(compile(code, str(page), "exec"), namespace)  # noqa: S102 - our own documentation
    _check_what_the_examples_made(page.name, namespace)


def _check_what_the_examples_made(page: str, namespace: dict) -> None:
    """Beyond 'it ran': what the page's comments say the examples give."""
    if page == "README.md":
        assert namespace["images"].shape == (16, 32, 32, 3) and namespace["images"].dtype == np.uint8
        assert namespace["run"].complete and namespace["run"].config.train.method == "filter"
    elif page == "api.md":
        run, images, report, estimate = (namespace[k] for k in ("run", "images", "report", "estimate"))
        assert isinstance(run, pudm.Run) and run.complete and run.config.train.method == "pu"
        assert images.dtype == np.uint8 and images.shape == (64, 8, 8, 1)
        assert report == run.eval and 0.0 <= report["non_sensitive_rate"] <= 1.0
        assert 0.0 <= estimate.beta < 1.0 and estimate.low <= estimate.beta <= estimate.high
        assert [m["step"] for m in run.metrics][-1] == 20
    elif page == "run-folder.md":
        assert len(namespace["images"]) == 16
