"""Methods x seeds (x betas) benchmark: train, sample, evaluate every cell; tables and plots.

Layout of a benchmark folder::

    OUT/classifier/              the evaluation classifier (trained once, or the one passed in)
    OUT/runs/<method>[-beta<b>]-seed<s>/   one run folder per cell, with its eval.json
    OUT/results.json             every cell's metrics and the per-method mean and std
    OUT/table.md                 the Markdown table (mean +- std over seeds)
    OUT/grids.png, OUT/rate_vs_fid.png, OUT/training_curves.png

A cell whose run finished and whose eval.json was made with the same evaluation settings is
reused, an interrupted run is resumed: re-running the same command picks up where it stopped.
A cell with no run folder (a fresh clone holds results.json, not the runs) is reused from
results.json when it records the same config and the same evaluation settings and judge.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pudm import methods as registry
from pudm import runs
from pudm.classifier import Classifier, train_for_config
from pudm.config import SAMPLERS, RunConfig, default_steps, flag
from pudm.errors import UsageError
from pudm.evaluation import EVAL, FID_CLASSIFIER, FID_PIXELS, check_classifier, evaluate_run
from pudm.flags import beta_value, csv
from pudm.sampling import SEED_SCHEME

_LOG = logging.getLogger("pudm")
RESULTS = "results.json"
TABLE = "table.md"


@dataclass(frozen=True)
class Cell:
    method: str
    seed: int
    # None: the preset's beta (or a method that ignores beta); "auto": estimated from U and S
    beta: float | str | None = None

    @property
    def _beta_text(self) -> str:
        return self.beta if isinstance(self.beta, str) else f"{self.beta:g}"

    @property
    def name(self) -> str:
        beta = f"-beta{self._beta_text}" if self.beta is not None else ""
        return f"{self.method}{beta}-seed{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.method} (beta {self._beta_text})" if self.beta is not None else self.method


def plan_cells(
    method_names: Sequence[str], seeds: Sequence[int], betas: Sequence[float | str] | None
) -> list[Cell]:
    for method in method_names:
        if method not in registry.REGISTRY:
            raise UsageError(
                f"unknown method {method!r} in --methods; choose from {', '.join(registry.REGISTRY)}"
            )
    if not method_names or not seeds:
        raise UsageError("--methods and --seeds need at least one value each")
    if len(set(method_names)) != len(method_names) or len(set(seeds)) != len(seeds):
        raise UsageError("--methods and --seeds must not repeat a value")
    for beta in betas or ():
        if beta == "auto":
            continue
        if isinstance(beta, str) or not 0.0 <= beta < 1.0:
            raise UsageError(f"--betas: beta must be in [0, 1), got {beta}")
    cells = []
    for method in method_names:
        for beta in betas if betas and registry.get(method).uses_beta else [None]:
            cells.extend(Cell(method, seed, beta) for seed in seeds)
    return cells


def cell_config(
    preset_name: str,
    cell: Cell,
    steps: int | None,
    pretrained: str | None = None,
    learning_rate: float | None = None,
    data_dir: str | None = None,
) -> RunConfig:
    """A cell's config: the preset with the cell's method, seed and beta and the benchmark's
    options, resolved as ``pudm train`` resolves its flags (:func:`pudm.settings.resolve`)."""
    from pudm.settings import resolve

    given = {"method": cell.method, "seed": cell.seed, "steps": steps, "lr": learning_rate}
    given["data_dir"] = data_dir
    if cell.beta is not None and cell.beta != "auto":
        given["beta"] = cell.beta
    settings = {key: value for key, value in given.items() if value is not None}
    config = resolve(preset_name, given_by="benchmark", pretrained=pretrained, **settings)
    config.validate()
    return config


def ensure_trained(config: RunConfig, run_dir: Path, show_progress: bool = True) -> None:
    """Train ``config`` into ``run_dir``: reuse a finished run with the same config, resume an
    interrupted one, start afresh otherwise (an existing run of another config is an error)."""
    from pudm.datasets import split_from_config
    from pudm.training import Trainer

    run_dir = Path(run_dir)
    folder = runs.RunFolder(run_dir)
    resume = folder.holds_run
    if resume:
        stored = RunConfig.normalize(runs.read_json(folder.path / runs.CONFIG))
        # The end-of-run grid's sampler ("sample") does not change what was trained.
        if {**stored, "sample": None} != {**config.to_dict(), "sample": None}:
            raise runs.RunError(
                f"{run_dir} holds a run with other settings: remove it or choose another --out"
            )
        if folder.complete:
            return
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise runs.RunError(f"{run_dir} exists and is not a pudm run: choose another --out")
    split = split_from_config(config)
    registry.get(config.train.method).check_data(split, config.train.filter_folds)
    Trainer(config, split, run_dir, show_progress=show_progress).train(resume=resume)


# The train fields that only a method's fitted state reads (not the weights a twin trains).
_STATE_FIELDS = ("method", "beta", "beta_estimate", "filter_folds", "filter_epochs")


def from_twin(config: RunConfig, run_dir: Path, twin: Path) -> bool:
    """A cell of a method that trains like another (``reject`` trains exactly as ``unsupervised``;
    tested) from its finished twin: same data, seed and settings train the same weights, so the
    twin's pipeline is copied and only the method's state is fitted. False (nothing written) when
    the method has no twin, or the twin does not match or is not finished; the cell then trains
    on its own."""
    from pudm.datasets import split_from_config
    from pudm.run_model import RunModel
    from pudm.sampling import save_grid

    method = registry.get(config.train.method)
    if method.trains_like is None or not runs.is_complete(twin) or Path(run_dir).exists():
        return False
    stored = RunConfig.normalize(runs.read_json(Path(twin) / runs.CONFIG))
    mine = config.to_dict()
    if stored["train"]["method"] != method.trains_like:
        return False
    if {**stored, "sample": None, "train": None} != {**mine, "sample": None, "train": None}:
        return False
    trained = [
        {k: v for k, v in values["train"].items() if k not in _STATE_FIELDS} for values in (stored, mine)
    ]
    if trained[0] != trained[1]:
        return False
    split = split_from_config(config)

    def write(tmp: Path) -> None:
        import shutil

        shutil.copytree(Path(twin) / "pipeline", tmp / "pipeline")
        shutil.copy2(Path(twin) / "metrics.jsonl", tmp / "metrics.jsonl")
        runs.atomic_write_json(tmp / runs.CONFIG, mine)
        method.prepare(config, split, tmp)
        model = RunModel.load(tmp)
        grid, seed = config.sample.grid_size, config.train.seed
        drawn = model.draw(grid, seed, allow_fewer=True)
        save_grid(drawn.images if len(drawn.images) else model.generate(grid, seed), tmp / "samples.png")
        summary = runs.read_json(Path(twin) / runs.SUMMARY)
        runs.atomic_write_json(tmp / runs.SUMMARY, {**summary, "trained_as": str(Path(twin).name)})

    runs.atomic_write_dir(Path(run_dir), write)
    return True


def _estimate_beta(config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> None:
    """An ``auto`` cell's beta: the estimate its run already holds, or a fresh one."""
    from pudm.prior import PriorEstimate, apply_estimate, describe, estimate_for_config

    stored = (
        RunConfig.normalize(runs.read_json(run_dir / runs.CONFIG))["train"]["beta_estimate"]
        if runs.holds_run(run_dir)
        else None
    )
    estimate = PriorEstimate(**stored) if stored else estimate_for_config(config)
    apply_estimate(config, estimate)
    log(f"  beta auto: {describe(estimate)}")
    for warning in estimate.warnings:
        log(f"  warning: {warning}")


def _reusable_eval(run_dir: Path, settings: dict) -> dict | None:
    path = run_dir / EVAL
    if not path.is_file():
        return None
    stored = runs.read_json(path)
    same = all(stored.get(key) == value for key, value in settings.items() if key != "fingerprint")
    same = same and stored.get("classifier", {}).get("fingerprint") == settings["fingerprint"]
    same = same and all(key in stored for key in METRICS)  # made before a metric existed: redo
    return stored if same else None


# What the table averages over seeds: the rate and the two quality measures that share no judge.
METRICS = ("non_sensitive_rate", "fid_classifier", "fid_pixels")


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    if any(value is None for value in values):  # e.g. an evaluation made before the metric existed
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(cells: list[Cell], evals: dict[str, dict]) -> list[dict]:
    """One row per method (and beta): mean and std over seeds of each metric."""
    rows: dict[str, dict] = {}
    for cell in cells:
        row = rows.setdefault(
            cell.label,
            {"label": cell.label, "method": cell.method, "beta": cell.beta, "seeds": [], "cells": []},
        )
        row["seeds"].append(cell.seed)
        row["cells"].append(cell.name)
    for row in rows.values():
        values = [evals[name] for name in row["cells"]]
        for key in METRICS:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([v.get(key) for v in values])
            row[f"{key}_per_seed"] = [v.get(key) for v in values]
        if any("audit" in v for v in values):
            shares = [(v.get("audit") or {}).get("sensitive_share") for v in values]
            row["audit_share_mean"], row["audit_share_std"] = _mean_std(shares)
            row["audit_share_per_seed"] = shares
    return list(rows.values())


def _before_row(result: dict) -> dict:
    """The pretrained model's row: one evaluation, no seeds to average."""
    row = {"label": "pretrained (before fine-tuning)", "method": "pretrained", "beta": None, "seeds": [0]}
    row["cells"] = []
    for key in METRICS:
        row[f"{key}_mean"], row[f"{key}_std"] = result.get(key), 0.0
        row[f"{key}_per_seed"] = [result.get(key)]
    return row


def markdown_table(rows: list[dict], num: int, sampler: str, steps: int) -> str:
    audited = any("audit_share_mean" in row for row in rows)
    lines = [
        f"| method | seeds | non-sensitive rate | {FID_CLASSIFIER} | {FID_PIXELS} |"
        + (" sensitive share, audited without labels |" if audited else ""),
        "|---|---|---|---|---|" + ("---|" if audited else ""),
    ]

    def cell(row: dict, key: str, digits: int) -> str:
        if row.get(f"{key}_mean") is None:
            return "-"
        return f"{row[f'{key}_mean']:.{digits}f} +- {row[f'{key}_std']:.{digits}f}"

    for row in rows:
        lines.append(
            f"| {row['label']} | {len(row['seeds'])} | {cell(row, 'non_sensitive_rate', 3)} | "
            f"{cell(row, 'fid_classifier', 2)} | {cell(row, 'fid_pixels', 2)} |"
            + (f" {cell(row, 'audit_share', 3)} |" if audited else "")
        )
    lines.append("")
    lines.append(
        f"{num} samples per cell ({sampler}, {steps} steps); mean +- std over seeds; "
        "non-sensitive rate: 1 = never sensitive; FID and Frechet distance: lower is better."
        + (
            " Audited: the share of sensitive samples estimated from U and S alone (`pudm audit`), no judge."
            if audited
            else ""
        )
    )
    return "\n".join(lines) + "\n"


def run_benchmark(
    preset_name: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    betas: Sequence[float | str] | None = None,
    steps: int | None = None,
    num: int = 1000,
    classifier_path: Path | None = None,
    sampler: str | None = None,
    sample_steps: int | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = _LOG.info,
    pretrained: str | None = None,
    learning_rate: float | None = None,
    data_dir: str | None = None,
    audit: bool = False,
) -> dict:
    """Train and evaluate every cell. With ``pretrained``, every cell fine-tunes that pipeline, and
    when it is a finished pudm run it is evaluated too, as the row before fine-tuning. With
    ``audit``, every cell is also audited without labels (:func:`pudm.audit.audit`, on the same
    samples), its share a column of the table."""
    out = Path(out)
    if num <= 0:
        raise UsageError(f"--num must be > 0, got {num}")
    cells = plan_cells(methods, seeds, betas)
    if pretrained and Path(pretrained).exists():
        pretrained = str(Path(pretrained).resolve())
    configs = {
        cell.name: cell_config(preset_name, cell, steps, pretrained, learning_rate, data_dir)
        for cell in cells
    }
    first = configs[cells[0].name]
    sampler = sampler or first.sample.sampler
    sample_steps = sample_steps or (
        first.sample.steps if sampler == first.sample.sampler else default_steps(sampler)
    )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: choose a folder")
    classifier = _judge(out, classifier_path, first, log)
    settings = {
        "num_samples": num,
        "sampler": sampler,
        "sampling_steps": sample_steps,
        "sampling_seed": 0,
        "sampling_seeds": SEED_SCHEME,
        "fingerprint": classifier.fingerprint(),
    }
    for cell in cells:
        caution = registry.get(cell.method).sampler_caution(configs[cell.name].model.prediction_type, sampler)
        if caution:
            log(f"warning: {cell.name}: {caution}")

    def evaluate(run_dir: Path) -> dict:
        """The stored evaluation when it was made with these settings, a new one otherwise; with
        ``audit``, the run's audit of the same samples as well."""
        result = _reusable_eval(run_dir, settings) or evaluate_run(
            run_dir,
            classifier,
            num=num,
            sampler=sampler,
            steps=sample_steps,
            seed=0,
            show_progress=show_progress,
        )
        if audit:
            result = {**result, "audit": audit_cell(run_dir, num, sampler, sample_steps)}
        return result

    before = None
    if pretrained and runs.is_complete(Path(pretrained)):
        log(f"[before] {pretrained}")
        before = evaluate(Path(pretrained))
        _log_cell(log, before)
    recorded = recorded_cells(out, settings)
    evals = _train_and_evaluate(cells, configs, out, evaluate, show_progress, log, recorded)
    rows = summarise(cells, evals)
    if before is not None:
        rows.insert(0, _before_row(before))
    results = {
        "preset": preset_name,
        "methods": list(methods),
        "seeds": list(seeds),
        "betas": list(betas) if betas else None,
        "training_steps": first.train.steps,
        "pretrained": pretrained,
        **{k: v for k, v in settings.items() if k != "fingerprint"},
        "classifier": _judge_record(classifier),
        "summary": rows,
        "cells": {
            cell.name: {
                "method": cell.method,
                "seed": cell.seed,
                "beta": cell.beta,
                "config": configs[cell.name].to_dict(),
                **evals[cell.name],
            }
            for cell in cells
        },
    }
    _write_results(out, results, classifier, cells, evals)
    return results


def recorded_cells(out: Path, settings: dict) -> dict[str, dict]:
    """The cells of ``OUT/results.json`` evaluated with ``settings`` (samples, sampler, steps,
    seeds and the judge's fingerprint) and recorded with their config; ``{}`` when there is none."""
    path = Path(out) / RESULTS
    if not path.is_file():
        return {}
    stored = runs.read_json(path)
    same = all(stored.get(key) == value for key, value in settings.items() if key != "fingerprint")
    if not same or stored.get("classifier", {}).get("fingerprint") != settings["fingerprint"]:
        return {}
    return {
        name: cell
        for name, cell in stored.get("cells", {}).items()
        if "config" in cell and all(key in cell for key in METRICS)
    }


def _same_training(recorded: dict, config: RunConfig, auto_beta: bool) -> bool:
    """Whether a recorded cell's config trains what ``config`` trains (the end-of-run grid's
    sampler aside; an ``auto`` cell's beta is the estimator's, made from the same data)."""
    ignore = ("beta", "beta_estimate") if auto_beta else ()
    mine, theirs = config.to_dict(), RunConfig.normalize(recorded)
    for values in (mine, theirs):
        values["sample"] = None
        values["train"] = {k: v for k, v in values["train"].items() if k not in ignore}
    return mine == theirs


# What a cell keeps of its audit.json.
AUDIT_KEYS = ("sensitive_share", "interval", "noise_level", "beta", "warnings")


def audit_cell(run_dir: Path, num: int, sampler: str, steps: int) -> dict:
    """The label-free audit of a cell's samples (those the judge saw: same sampler, steps, seed
    0): the run's audit.json when it was made so, a new one otherwise."""
    from pudm.audit import AUDIT, audit

    path = Path(run_dir) / AUDIT
    stored = runs.read_json(path) if path.is_file() else {}
    made = (
        stored.get("num_samples"),
        stored.get("sampler"),
        stored.get("sampling_steps"),
        stored.get("sampling_seed"),
    )
    if made != (num, sampler, steps, 0):
        stored = audit(run_dir, num=num, sampler=sampler, steps=steps, seed=0)
    return {key: stored.get(key) for key in AUDIT_KEYS}


def _train_and_evaluate(
    cells, configs, out: Path, evaluate, show_progress: bool, log, recorded: dict[str, dict]
) -> dict[str, dict]:
    """Every cell trained (a twin's model reused where the method trains like another), resumed or
    reused, then evaluated: ``{cell name: eval.json}``. A cell with no run folder that
    ``recorded`` holds with the same training config is taken from there."""
    evals: dict[str, dict] = {}
    for index, cell in enumerate(cells, 1):
        run_dir = out / "runs" / cell.name
        log(f"[{index}/{len(cells)}] {cell.name}")
        record = recorded.get(cell.name)
        auto = cell.beta == "auto"
        if not run_dir.exists() and record and _same_training(record["config"], configs[cell.name], auto):
            evals[cell.name] = {key: value for key, value in record.items() if key != "config"}
            log(f"    reused from {RESULTS} (no run folder)")
            _log_cell(log, evals[cell.name])
            continue
        if cell.beta == "auto":
            _estimate_beta(configs[cell.name], run_dir, log)
        twin_method = registry.get(cell.method).trains_like
        twin = out / "runs" / Cell(twin_method or cell.method, cell.seed).name
        if not from_twin(configs[cell.name], run_dir, twin):
            ensure_trained(configs[cell.name], run_dir, show_progress=show_progress)
        # a filter run's eval.json holds its filter report; the training time is its log's
        evals[cell.name] = {**evaluate(run_dir), "training": training_time(run_dir)}
        _log_cell(log, evals[cell.name])
    return evals


def training_time(run_dir: Path) -> dict | None:
    """Seconds spent in training steps, from the log ticks of ``metrics.jsonl`` (steps over
    steps/s, summed; checkpoint writes, start-up and sampling not counted), or None without ticks."""
    ticks = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("steps_per_second"):
                ticks[int(row["step"])] = float(row["steps_per_second"])  # a resumed tick replaces
    if not ticks:
        return None
    seconds, last = 0.0, 0
    for step in sorted(ticks):
        seconds += (step - last) / ticks[step]
        last = step
    return {"steps": last, "seconds": round(seconds, 1), "steps_per_second": round(last / seconds, 2)}


def _judge(
    out: Path, classifier_path: Path | None, first: RunConfig, log: Callable[[str], None]
) -> Classifier:
    """The evaluation classifier: the one given (checked before anything is written), the one the
    benchmark folder holds, or one trained on the preset's real labels and kept there."""
    if classifier_path is not None:
        classifier = Classifier.load(classifier_path)
        check_classifier(classifier, first)
    elif (out / "classifier" / "config.json").is_file():
        classifier = Classifier.load(out / "classifier")
    else:
        out.mkdir(parents=True, exist_ok=True)
        log(f"training the evaluation classifier -> {out / 'classifier'}")
        classifier = train_for_config(first)
        classifier.save(out / "classifier")
    out.mkdir(parents=True, exist_ok=True)
    check_classifier(classifier, first)
    info = classifier.info
    accuracy = f"held-out accuracy {info.heldout_accuracy:.3f} ({info.num_heldout} images)"
    log(f"evaluation classifier: {info.arch}, {accuracy}")
    return classifier


def _judge_record(classifier: Classifier) -> dict:
    info = classifier.info
    return {
        "path": str(classifier.path),
        "arch": info.arch,
        "heldout_accuracy": info.heldout_accuracy,
        "heldout_sensitive_recall": info.heldout_sensitive_recall,
        "heldout_class_recall": list(info.heldout_class_recall),
        "fingerprint": classifier.fingerprint(),
    }


def _log_cell(log: Callable[[str], None], result: dict) -> None:
    rate, fid = result["non_sensitive_rate"], result["fid_classifier"]
    trained = result.get("training")
    took = ""
    if trained:
        minutes, seconds = divmod(round(trained["seconds"]), 60)
        took = f"; {trained['steps']} training steps in {minutes} min {seconds} s"
    audited = (result.get("audit") or {}).get("sensitive_share")
    audit = "" if audited is None else f"; audited sensitive share {audited:.3f}"
    log(f"    non-sensitive rate {rate:.3f}, {FID_CLASSIFIER} {fid:.2f}{audit}{took}")


def _write_results(out: Path, results: dict, classifier: Classifier, cells: list[Cell], evals: dict) -> None:
    """results.json, table.md (with the judge's held-out recall) and the plots."""
    from pudm.plots import plot_benchmark

    table = markdown_table(
        results["summary"], results["num_samples"], results["sampler"], results["sampling_steps"]
    )
    info = classifier.info
    recall = info.heldout_sensitive_recall
    judge = f"Judge: {info.arch} on the real labels, held-out accuracy {info.heldout_accuracy:.3f}"
    if recall is not None:
        judge += f", recall of sensitive items {recall:.3f}"
        if recall < 0.99:
            judge += " (the rate cannot show sensitive samples the judge misses)"
    runs.atomic_write_json(out / RESULTS, results)
    runs.atomic_write_bytes(out / TABLE, (table + judge + ".\n").encode())
    plot_benchmark(out, cells, evals)


# Defaults of `pudm benchmark` and of its quick mode (`pudm demo`).
FULL = {
    "methods": ["unsupervised", "supervised", "pu", "filter", "oracle"],
    "seeds": [0, 1, 2],
    "num": 1000,
}
QUICK = {"methods": ["unsupervised", "pu", "filter"], "seeds": [0], "steps": 1500, "num": 500}
_GROUP = "benchmark"


@dataclass
class BenchmarkOptions:
    """The options of ``pudm benchmark`` and ``pudm demo``; None: the mode's default (FULL, QUICK)
    or the preset's. The keywords of :func:`run_benchmark`."""

    preset_name: str = flag(
        "digits_even", "named settings (default digits_even)", group=_GROUP, name="preset"
    )
    methods: list | None = flag(None, "comma-separated methods", group=_GROUP, type=csv(str, "--methods"))
    seeds: list | None = flag(None, "comma-separated training seeds", group=_GROUP, type=csv(int, "--seeds"))
    betas: list | None = flag(
        None,
        "beta sweep for pu/filter, e.g. 0.05,0.1,0.2,0.3; auto: estimated from U and S",
        group=_GROUP,
        type=csv(beta_value, "--betas"),
    )
    steps: int | None = flag(None, "training steps per cell (default: the preset's)", group=_GROUP)
    learning_rate: float | None = flag(
        None, "learning rate of every cell (default: the preset's)", group=_GROUP, name="lr"
    )
    data_dir: str | None = flag(None, "where the paper data sets' files are", group=_GROUP, type=Path)
    pretrained: str | None = flag(
        None,
        "every cell fine-tunes this pipeline (folder, pudm run or hub id); a pudm run is also "
        "evaluated, as the row before fine-tuning",
        group=_GROUP,
    )
    num: int | None = flag(None, "samples per cell to evaluate", group=_GROUP)
    classifier_path: str | None = flag(
        None, "evaluation classifier folder (default: train one)", group=_GROUP, name="classifier", type=Path
    )
    sampler: str | None = flag(
        None, "sampler for evaluation (default: the preset's)", group=_GROUP, choices=SAMPLERS
    )
    sample_steps: int | None = flag(None, "sampling steps for evaluation", group=_GROUP)
    audit: bool = flag(
        False,
        "also audit every cell without labels (pudm audit), a column next to the judge's rate",
        group=_GROUP,
        action="store_true",
    )

    def with_defaults(self, quick: bool) -> dict:
        """The keywords of :func:`run_benchmark`, each None filled from FULL or QUICK."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name, value in (QUICK if quick else FULL).items():
            if values[name] is None:
                values[name] = value
        return values
