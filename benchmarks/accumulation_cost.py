"""What exact gradient accumulation costs: K micro-batches of B against one batch of K*B.

pudm's accumulation runs a forward pass over every micro-batch first (to learn the whole batch's
sums), then forward + backward per micro-batch: about one extra forward pass per item. This
script measures images per second of the real training loop for the same global batch split into
K = 1, 2, 4 micro-batches, beside plain training with one micro-batch per step (what the same
memory allows without accumulation), ``--repeats`` rounds interleaved; the median per setting.

    python benchmarks/accumulation_cost.py --batch 32 --steps 30 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import pudm


def _images_per_second(method: str, micro: int, accumulate: int, steps: int, log_every: int) -> float:
    config = pudm.preset(
        "digits_even",
        method=method,
        steps=steps,
        batch_size=micro,
        gradient_accumulation_steps=accumulate,
        log_every=log_every,
        checkpoint_every=steps,
        sample_steps=1,
        grid_size=1,
    )
    with tempfile.TemporaryDirectory() as folder:
        run = pudm.train(config, Path(folder) / "run", show_progress=False)
        ticks = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(tick["images_per_second"] for tick in ticks[1:])  # the first warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="the global batch K * B (default 32)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="unsupervised,pu")
    args = parser.parse_args()
    splits = [k for k in (1, 2, 4) if args.batch % k == 0]
    figures: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for method in args.methods.split(","):
            for k in splits:
                log_every = max(1, args.steps // 3)
                accumulated = _images_per_second(method, args.batch // k, k, args.steps, log_every)
                figures.setdefault((method, k, "accumulated"), []).append(accumulated)
                plain = _images_per_second(method, args.batch // k, 1, args.steps, log_every)
                figures.setdefault((method, k, "plain"), []).append(plain)
    print(f"global batch {args.batch}, {args.steps} steps, median of {args.repeats} rounds (images/s)")
    print("| method | K | micro-batch B | K x B, accumulated | B alone, no accumulation | ratio |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for k in splits:
            accumulated = statistics.median(figures[(method, k, "accumulated")])
            plain = statistics.median(figures[(method, k, "plain")])
            ratio = accumulated / plain
            print(f"| {method} | {k} | {args.batch // k} | {accumulated:.0f} | {plain:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
