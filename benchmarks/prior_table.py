"""How close ``pudm estimate-prior`` comes to the true beta on digits.

For each true beta, U holds the preset's normal digits plus round(beta / (1 - beta) * |U normal|)
sensitive ones; each seed draws a different split (and seeds the estimator). Prints one JSON line
per estimate and a table of the mean absolute error per beta, for the main estimator (BBE on a
cross-fitted CNN) and the cross-check (BBE on PCA + logistic regression).

    python benchmarks/prior_table.py --betas 0.05,0.1,0.2,0.3 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pudm.config import preset
from pudm.datasets import split_from_config
from pudm.prior import estimate_for_config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="digits_even")
    parser.add_argument("--betas", default="0.05,0.1,0.2,0.3")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    rows = []
    for beta in [float(b) for b in args.betas.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            config = preset(args.preset)
            normal = config.data.num_unlabeled_normal
            config.data.num_unlabeled_sensitive = round(beta / (1 - beta) * normal)
            config.data.split_seed = seed
            config.validate()
            split = split_from_config(config)
            truth = float(split.unlabeled_is_sensitive.float().mean())
            start = time.perf_counter()
            estimate = estimate_for_config(config, split)
            rows.append(
                {
                    "beta": beta,
                    "seed": seed,
                    "true_beta": round(truth, 4),
                    "estimate": round(estimate.beta, 4),
                    "interval": [round(estimate.low, 4), round(estimate.high, 4)],
                    "cross_check": round(estimate.cross_check["beta"], 4),
                    "unlabeled": estimate.num_unlabeled,
                    "sensitive": estimate.num_sensitive,
                    "warnings": estimate.warnings,
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(
        "| true beta | seeds | estimate (mean) | mean abs. error | truth inside 95% interval | "
        "cross-check (mean) | cross-check mean abs. error |"
    )
    print("|---|---|---|---|---|---|---|")
    for beta in sorted({row["beta"] for row in rows}):
        group = [row for row in rows if row["beta"] == beta]
        inside = sum(row["interval"][0] <= row["true_beta"] <= row["interval"][1] for row in group)
        print(
            f"| {statistics.mean(r['true_beta'] for r in group):.3f} | {len(group)} | "
            f"{statistics.mean(r['estimate'] for r in group):.3f} | "
            f"{statistics.mean(abs(r['estimate'] - r['true_beta']) for r in group):.3f} | "
            f"{inside}/{len(group)} | {statistics.mean(r['cross_check'] for r in group):.3f} | "
            f"{statistics.mean(abs(r['cross_check'] - r['true_beta']) for r in group):.3f} |"
        )
    errors = [abs(row["estimate"] - row["true_beta"]) for row in rows]
    print(f"\nall: mean absolute error {statistics.mean(errors):.3f}, max {max(errors):.3f}")


if __name__ == "__main__":
    main()
