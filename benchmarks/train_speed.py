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
from pudm.models import build_noise_scheduler, build_unet, model_preset
from pudm.objectives import objective
from pudm.sampling import to_uint8
from pudm.training import Trainer, per_sample_denoising_loss, split_from_config


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


def data_path(args: argparse.Namespace) -> list[dict]:
    """steps/s of one pu training step fed by the tensor-on-device path vs a PNG DataLoader."""
    config = _config("pu", "no", args)
    split = split_from_config(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    unet = build_unet(config.model, image_size=args.image_size, channels=1).to(device)
    scheduler = build_noise_scheduler(config.model)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    pool = torch.cat([split.unlabeled, split.sensitive])
    is_sensitive = torch.cat(
        [
            torch.zeros(len(split.unlabeled), dtype=torch.bool),
            torch.ones(len(split.sensitive), dtype=torch.bool),
        ]
    )

    def step(clean: torch.Tensor, sensitive: torch.Tensor) -> None:
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, 1000, (len(clean),), device=device)
        out = objective("pu", per_sample_denoising_loss(unet, scheduler, clean, noise, timesteps), sensitive)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(batches) -> float:
        for i, (clean, sensitive) in enumerate(batches):
            if i == 5:  # warm-up done
                start = time.perf_counter()
            step(clean, sensitive)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (args.steps - 5) / (time.perf_counter() - start)

    def on_device():
        pool_d, sensitive_d = pool.to(device), is_sensitive.to(device)
        generator = torch.Generator().manual_seed(0)
        for _ in range(args.steps):
            index = torch.randint(0, len(pool), (args.batch_size,), generator=generator).to(device)
            yield pool_d[index], sensitive_d[index]

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
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    methods, precisions = args.methods.split(","), args.precisions.split(",")
    measured: dict[tuple[str, str], list[dict]] = {(m, p): [] for p in precisions for m in methods}
    for _ in range(args.repeats):
        for precision in precisions:
            for method in methods:
                measured[method, precision].append(measure(method, precision, args))
                print(json.dumps(measured[method, precision][-1]), flush=True)
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
