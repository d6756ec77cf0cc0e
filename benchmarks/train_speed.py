"""Training throughput per objective and precision, through the real Trainer, side by side.

Each configuration trains ``--steps`` steps into a temporary run folder; its figure is the mean of
the log ticks after the first (the first holds compilation/allocation warm-up). The objectives are
measured in turn, ``--repeats`` rounds interleaved (so a slow phase of the machine hits all of
them), and the median per configuration is reported with the PU objective's overhead over
unsupervised training. On a GPU the peak memory of the step is reported too.

``--data-path`` adds the data-path comparison: the same training step fed by pudm's way (the
data set as one tensor on the device, a batch is an index) and by a torch DataLoader over a
folder of PNG files (decode + convert per item, as an image-folder pipeline does).

    python benchmarks/train_speed.py --repeats 5 --data-path          # digits, small UNet, CPU
    python benchmarks/train_speed.py --model paper --image-size 32 --precisions no,fp16,bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image

from pudm.config import preset
from pudm.datasets import split_from_config
from pudm.models import build_noise_scheduler, build_unet, model_preset
from pudm.objectives import objective
from pudm.sampling import to_uint8
from pudm.training import Trainer, per_sample_denoising_loss


def _config(method: str, precision: str, args: argparse.Namespace):
    config = preset("digits_even")
    prediction_type = config.model.prediction_type
    config.model = model_preset(args.model)
    config.model.prediction_type = prediction_type
    config.data.image_size = args.image_size
    config.train.method = method
    config.train.steps = args.steps
    config.train.batch_size = args.batch_size
    config.train.log_every = args.log_every
    config.train.checkpoint_every = args.steps
    config.train.mixed_precision = precision
    config.sample.grid_size, config.sample.steps = 4, 2  # the end-of-run grid is not measured
    config.validate()
    return config


def measure(method: str, precision: str, args: argparse.Namespace) -> dict:
    config = _config(method, precision, args)
    # accelerate keeps one process-wide state; reset it so each precision gets its own.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=precision)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        Trainer(
            config, split_from_config(config), run_dir, accelerator=accelerator, show_progress=False
        ).train()
        ticks = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = ticks[1:] or ticks
    steps_per_second = sum(t["steps_per_second"] for t in timed) / len(timed)
    return {
        "method": method,
        "precision": precision,
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps_per_second": round(steps_per_second, 2),
        "images_per_second": round(steps_per_second * args.batch_size, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


class PngFolder(torch.utils.data.Dataset):
    """PNG files decoded per item to [-1, 1] tensors: the usual image-folder data path."""

    def __init__(self, folder: Path):
        self.files = sorted(folder.glob("*.png"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            array = np.asarray(image.convert("L"), dtype=np.float32)
        return torch.from_numpy(array)[None] / 127.5 - 1.0


class StepHarness:
    """One model, optimizer and data pool on the device, and the training step with any objective."""

    def __init__(self, args: argparse.Namespace):
        config = _config("pu", "no", args)
        split = split_from_config(config)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        self.unet = build_unet(config.model, image_size=args.image_size, channels=1).to(self.device)
        self.scheduler = build_noise_scheduler(config.model)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-4)
        self.pool = torch.cat([split.unlabeled, split.sensitive])
        self.is_sensitive = torch.arange(len(self.pool)) >= len(split.unlabeled)
        self.batch_size = args.batch_size

    def step(self, clean: torch.Tensor, sensitive: torch.Tensor, method: str = "pu") -> None:
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, 1000, (len(clean),), device=self.device)
        loss = per_sample_denoising_loss(self.unet, self.scheduler, clean, noise, timesteps)
        objective(method, loss, sensitive).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def batches(self, count: int, seed: int = 0):
        pool, sensitive = self.pool.to(self.device), self.is_sensitive.to(self.device)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(count):
            index = torch.randint(0, len(pool), (self.batch_size,), generator=generator).to(self.device)
            yield pool[index], sensitive[index]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def objective_blocks(args: argparse.Namespace, methods: list[str]) -> dict[str, list[float]]:
    """steps/s per objective on the same model and batches, alternating in blocks of ``--block``
    steps (ABBA order), so that drift of the machine hits every objective alike."""
    harness = StepHarness(args)
    for clean, sensitive in harness.batches(10):  # warm-up
        harness.step(clean, sensitive)
    speeds: dict[str, list[float]] = {method: [] for method in methods}
    for block in range(args.blocks):
        for method in methods if block % 2 == 0 else methods[::-1]:
            harness.sync()
            start = time.perf_counter()
            for clean, sensitive in harness.batches(args.block, seed=block):
                harness.step(clean, sensitive, method)
            harness.sync()
            speeds[method].append(args.block / (time.perf_counter() - start))
    return speeds


def data_path(args: argparse.Namespace) -> list[dict]:
    """steps/s of one pu training step fed by the tensor-on-device path vs a PNG DataLoader."""
    harness = StepHarness(args)
    device, pool, is_sensitive = harness.device, harness.pool, harness.is_sensitive
    step = harness.step

    def timed(batches) -> float:
        for i, (clean, sensitive) in enumerate(batches):
            if i == 5:  # warm-up done
                start = time.perf_counter()
            step(clean, sensitive)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (args.steps - 5) / (time.perf_counter() - start)

    def on_device():
        return harness.batches(args.steps)

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        images = to_uint8(pool)[..., 0]
        for i, image in enumerate(images):
            Image.fromarray(image).save(Path(folder) / f"{i:05d}_{int(is_sensitive[i])}.png")
        dataset = PngFolder(Path(folder))
        flags = torch.tensor([f.stem.endswith("_1") for f in dataset.files])

        def from_loader(workers: int):
            loader = torch.utils.data.DataLoader(
                torch.utils.data.StackDataset(dataset, torch.utils.data.TensorDataset(flags)),
                batch_size=args.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=workers,
                persistent_workers=workers > 0,
                pin_memory=device.type == "cuda",
            )
            produced = 0
            while produced < args.steps:
                for clean, (sensitive,) in loader:
                    if produced == args.steps:
                        break
                    produced += 1
                    yield clean.to(device, non_blocking=True), sensitive.to(device, non_blocking=True)

        paths = [("tensor on device (pudm)", on_device)]
        paths += [
            (f"DataLoader over PNG files, {w} workers", lambda w=w: from_loader(w)) for w in args.workers
        ]
        results: dict[str, list[float]] = {name: [] for name, _ in paths}
        for _ in range(args.repeats):
            for name, make in paths:
                results[name].append(timed(make()))
    for name, values in results.items():
        median = statistics.median(values)
        rows.append(
            {
                "data path": name,
                "steps_per_second": round(median, 2),
                "images_per_second": round(median * args.batch_size, 1),
                "runs": [round(v, 2) for v in values],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="unsupervised,pu")
    parser.add_argument("--precisions", default="no")
    parser.add_argument("--model", default="small")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--data-path", action="store_true", help="also compare the data paths")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts for --data-path")
    parser.add_argument("--blocks", type=int, default=0, help="objective A/B blocks (0: skip)")
    parser.add_argument("--block", type=int, default=20, help="steps per objective block")
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    methods, precisions = args.methods.split(","), args.precisions.split(",")
    measured: dict[tuple[str, str], list[dict]] = {(m, p): [] for p in precisions for m in methods}
    for _ in range(args.repeats):
        for precision in precisions:
            for method in methods:
                measured[method, precision].append(measure(method, precision, args))
                print(json.dumps(measured[method, precision][-1]), flush=True)
    if args.repeats > 0:
        print()
        print(f"median of {args.repeats} interleaved runs, batch {args.batch_size}, {args.steps} steps each")
        print()
        print("| method | precision | steps/s | images/s | runs (steps/s) | peak GPU memory (GiB) |")
        print("|---|---|---|---|---|---|")
        medians = {}
        for (method, precision), rows in measured.items():
            speeds = [row["steps_per_second"] for row in rows]
            medians[method, precision] = median = statistics.median(speeds)
            print(
                f"| {method} | {precision} | {median:.2f} | {median * args.batch_size:.0f} | "
                f"{', '.join(f'{v:.2f}' for v in speeds)} | {rows[-1]['peak_memory_gib']} |"
            )
        for precision in precisions:
            if ("unsupervised", precision) in medians and ("pu", precision) in medians:
                base, pu = medians["unsupervised", precision], medians["pu", precision]
                print(f"\nPU objective overhead ({precision}): {100 * (base / pu - 1):+.1f}% time per step")
    if args.blocks:
        speeds = objective_blocks(args, methods)
        print()
        print(f"objective blocks: {args.blocks} rounds of {args.block} steps per objective, ABBA order")
        print()
        print("| objective | steps/s (median) | images/s | blocks (steps/s) min-max |")
        print("|---|---|---|---|")
        for method, values in speeds.items():
            median = statistics.median(values)
            print(
                f"| {method} | {median:.2f} | {median * args.batch_size:.0f} | "
                f"{min(values):.2f}-{max(values):.2f} |"
            )
        if "unsupervised" in speeds and "pu" in speeds:
            ratios = [u / p for u, p in zip(speeds["unsupervised"], speeds["pu"], strict=True)]
            print(
                f"\nPU objective overhead, median of per-round ratios: "
                f"{100 * (statistics.median(ratios) - 1):+.1f}% time per step"
            )
    if args.data_path:
        print()
        rows = data_path(args)
        print()
        print("| data path | steps/s | images/s | runs (steps/s) |")
        print("|---|---|---|---|")
        for row in rows:
            print(
                f"| {row['data path']} | {row['steps_per_second']} | {row['images_per_second']} | "
                f"{', '.join(str(v) for v in row['runs'])} |"
            )


if __name__ == "__main__":
    main()
