"""Sampling: plain functions over a UNet (or a saved pipeline) and a diffusers scheduler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline, UNet2DModel
from PIL import Image
from tqdm.auto import tqdm

from pudm.errors import UsageError
from pudm.models import sampler_scheduler

# How a sampling seed becomes each batch's generator; stored beside every evaluation, so that one
# made under another scheme (other samples for the same seed) is not reused as if current.
SEED_SCHEME = "seedsequence-v1"


def sample_seed(*keys: int) -> int:
    """A 63-bit generator seed derived from ``keys`` (numpy's SeedSequence hash): different keys
    give unrelated streams, so ``--seed 0`` and ``--seed 1`` share no batch's noise (``seed + i``
    would: batch 1 of seed 0 is batch 0 of seed 1)."""
    entropy = [int(key) % 2**64 for key in keys]
    high, low = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(high) << 31) ^ int(low)


@torch.no_grad()
def generate(
    unet: UNet2DModel,
    scheduler_config: dict,
    num: int,
    sampler: str = "dpm-sde",
    steps: int = 10,
    seed: int = 0,
    batch_size: int = 256,
    show_progress: bool = True,
    class_labels: torch.Tensor | None = None,
    stream: int = 0,
) -> np.ndarray:
    """Draw ``num`` samples as uint8 images of shape (num, H, W, C).

    The pipeline is a plain diffusers DDPMPipeline whose scheduler is swapped for ``sampler``
    (ddpm, ddim, dpm = DPM-Solver++ or dpm-sde = its SDE variant), sharing the training noise
    schedule. Batch ``i`` draws from a generator seeded with :func:`sample_seed` of
    ``(seed, stream, i)`` (the stochastic samplers draw their noise from it too), so the same call
    always returns the same images and no two seeds or streams (a rejection round) share noise.

    ``class_labels`` (shape (num,)): the class of every sample, for a class-conditional UNet.
    """
    if num <= 0:
        raise UsageError(f"--num must be > 0, got {num}")
    if steps <= 0:
        raise UsageError(f"--steps must be > 0, got {steps}")
    pipeline = DDPMPipeline(unet=unet, scheduler=sampler_scheduler(sampler, scheduler_config))
    pipeline.set_progress_bar_config(disable=True)
    batches = []
    count = range(0, num, batch_size)
    for i, start in enumerate(
        tqdm(count, desc=f"sampling ({sampler}, {steps} steps)", disable=not show_progress)
    ):
        size = min(batch_size, num - start)
        generator = torch.Generator(device="cpu").manual_seed(sample_seed(seed, stream, i))
        if class_labels is None:
            images = pipeline(
                batch_size=size, generator=generator, num_inference_steps=steps, output_type="np"
            ).images
        else:
            labels = torch.as_tensor(class_labels)[start : start + size]
            images = _conditional(unet, pipeline.scheduler, labels, generator, steps)
        batches.append(images)
    images = np.concatenate(batches)
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def _conditional(unet, scheduler, labels: torch.Tensor, generator: torch.Generator, steps: int) -> np.ndarray:
    """DDPMPipeline's loop with class labels passed to the UNet; images as floats in [0, 1]."""
    config = unet.config
    size = config.sample_size
    shape = (len(labels), config.in_channels, *((size, size) if isinstance(size, int) else size))
    sample = torch.randn(shape, generator=generator).to(unet.device, unet.dtype)
    sample = sample * scheduler.init_noise_sigma
    labels = labels.to(unet.device)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        output = unet(scheduler.scale_model_input(sample, t), t, class_labels=labels).sample
        sample = scheduler.step(output, t, sample, generator=generator).prev_sample
    return (sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) into one (H', W', C) array with white borders."""
    num, height, width, channels = images.shape
    columns = columns or int(np.ceil(np.sqrt(num)))
    rows = int(np.ceil(num / columns))
    grid = np.full(
        (rows * (height + pad) + pad, columns * (width + pad) + pad, channels), 255, dtype=np.uint8
    )
    for index in range(num):
        row, col = divmod(index, columns)
        top, left = pad + row * (height + pad), pad + col * (width + pad)
        grid[top : top + height, left : left + width] = images[index]
    return grid


def save_png(array: np.ndarray, path: Path, scale: int = 4) -> None:
    """Save one uint8 (H, W, C) array as a PNG, enlarged ``scale`` times, via a temporary file."""
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    picture.save(tmp)
    tmp.replace(path)


def save_grid(images: np.ndarray, path: Path, columns: int | None = None, scale: int = 4) -> None:
    """Save uint8 images (N, H, W, C) as one PNG grid."""
    save_png(make_grid(images, columns), path, scale)


def check_sample_files(paths: list[Path]) -> None:
    """Where :func:`save_samples` can write: ``.png`` or ``.npz`` names in folders that exist."""
    for path in map(Path, paths):
        if path.suffix not in (".png", ".npz"):
            raise UsageError(f"--out {path}: use a .png (grid) or .npz (uint8 array) file name")
        if not path.parent.exists() and str(path.parent):
            raise UsageError(f"--out {path}: folder {path.parent} does not exist: create it first")


def save_samples(images: np.ndarray, path: Path, scale: int = 4) -> None:
    """uint8 images (N, H, W, C) to ``FILE.png`` (a grid) or ``FILE.npz`` (key ``images``), atomically."""
    path = Path(path)
    if path.suffix == ".png":
        save_grid(images, path, scale=scale)
        return
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, images=images)
    tmp.replace(path)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1], (N, C, H, W) -> uint8 (N, H, W, C), as :func:`generate` returns."""
    scaled = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()
