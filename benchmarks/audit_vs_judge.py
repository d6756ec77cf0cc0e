"""The label-free audit next to the labeled judge, on the same samples of each run.

    python benchmarks/audit_vs_judge.py --classifier runs/demo/classifier runs/demo/runs/*-seed0 \
        --out benchmarks/results/audit_check/digits.json

For every run: draws --num samples with the run's sampler (seed 0), asks the judge (a classifier
trained on the real labels) which share is sensitive, corrects that share for the judge's held-out
recall and its false-positive rate on the run's normal test split (optimistic where the judge
trained on those images, as on digits), and audits the same samples from the run's U and S alone
(:func:`pudm.audit.audit_images`, no labels). Prints one row per run and the audit's cost;
``--out`` keeps the rows as JSON (the docs' table is written from it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pudm import runs
from pudm.audit import AuditConfig, audit_images
from pudm.classifier import Classifier
from pudm.config import RunConfig
from pudm.datasets import split_from_config
from pudm.run_model import RunModel
from pudm.sampling import to_uint8


def corrected(share: float, recall: float | None, false_positive: float) -> float:
    """The judge's share with its own errors taken out: share = p recall + (1 - p) fp."""
    if recall is None or recall <= false_positive:
        return share
    return min(1.0, max(0.0, (share - false_positive) / (recall - false_positive)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--classifier", type=Path, required=True, help="the judge")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--noise-level", type=int, default=None, help="default: auto")
    parser.add_argument("--out", type=Path, default=None, help="write the rows to this JSON file")
    args = parser.parse_args()
    rows = []
    judge = Classifier.load(args.classifier)
    recall = judge.info.heldout_sensitive_recall
    print(
        "| run | judge | judge corrected | audit | 95% interval | noise level | samples-vs-U AUC | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        config = RunConfig.from_dict(runs.read_json(run / runs.CONFIG))
        split = split_from_config(config)  # U and S for the audit; the judge has its own labels
        test = to_uint8(split.test)
        false_positive = float(1.0 - judge.is_normal(judge.predict(test)).mean())
        samples = RunModel.load(run).draw(args.num, 0).images
        judged = float(1.0 - judge.is_normal(judge.predict(samples)).mean())
        start = time.perf_counter()
        report, _ = audit_images(
            samples,
            split.unlabeled,
            split.sensitive,
            config.train.beta,
            AuditConfig(noise_level=args.noise_level),
        )
        seconds = time.perf_counter() - start
        share = report["sensitive_share"]
        audit = "-" if share is None else f"{share:.3f}"
        interval = "-" if report["interval"] is None else "[{:.3f}, {:.3f}]".format(*report["interval"])
        judge_cells = f"{judged:.3f} | {corrected(judged, recall, false_positive):.3f}"
        auc = report["samples_vs_unlabeled_auc"]
        row = f"{audit} | {interval} | {report['noise_level']} | {auc:.2f} | {seconds:.0f}"
        print(f"| {run.name} | {judge_cells} | {row} |", flush=True)
        judge_said = f"held-out sensitive recall {recall}, false positives on the test split "
        judge_said += f"{false_positive:.3f}"
        print(f"  judge: {judge_said}")
        for warning in report["warnings"]:
            print(f"  warning: {warning}")
        rows.append(
            {
                "run": run.name,
                "method": config.train.method,
                "judge_share": judged,
                "judge_recall": recall,
                "judge_false_positive": false_positive,
                "judge_corrected": corrected(judged, recall, false_positive),
                "audit": {k: v for k, v in report.items() if k != "config"},
            }
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "command": " ".join(["python", "benchmarks/audit_vs_judge.py", *sys.argv[1:]]),
            "num": args.num,
        }
        record["cpu_threads"] = os.environ.get("OMP_NUM_THREADS", "default")
        args.out.write_text(json.dumps({**record, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
