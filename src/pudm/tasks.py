"""What the loop trains: a task is the part of a run that depends on the model.

A task builds the model and its noise schedule (``build``), sets up its data before the loop
(``prepare``: the method's fitted state), says what a step draws (``batches``), and saves what the
run makes (``finish``) and a summary of its data. :class:`pudm.training.Trainer` does the rest.
:class:`PixelTask` trains the paper's pixel-space UNets; :class:`pudm.sd_task.LatentTask` Stable
Diffusion on VAE latents.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from pudm import methods, runs
from pudm.cards import write_card
from pudm.data import PUSplit
from pudm.models import build_noise_scheduler, build_unet, load_pretrained, save_pipeline
from pudm.run_model import SENSITIVE_LABEL, UNLABELED_LABEL, RunModel
from pudm.sampling import save_grid


@dataclass
class Batches:
    """What every step of a run draws from (:meth:`PixelTask.batches`).

    Attributes:
        fetch: ``fetch(index, step) -> (clean, is_sensitive, conditioning)`` on the device for the
            step's pool indices (``conditioning``: the UNet's extra inputs, or None).
        num_unlabeled, num_sensitive: the pool is U's training items, then S's (0 when the
            method's batches draw U alone).
        weights: each pool item's weight in the objective (None: the method gives none).
    """

    fetch: Callable
    num_unlabeled: int
    num_sensitive: int
    weights: torch.Tensor | None = None


def training_pool(split: PUSplit, items: methods.TrainingItems) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensor that batches index into (U's training items, then S where the method draws it)
    and its is-sensitive mask."""
    unlabeled = split.unlabeled[items.unlabeled]
    if not items.sensitive:
        return unlabeled, torch.zeros(len(unlabeled), dtype=torch.bool)
    pool = torch.cat([unlabeled, split.sensitive])
    is_sensitive = torch.arange(len(pool)) >= len(unlabeled)
    return pool, is_sensitive


class PixelTask:
    """The paper's models: a pixel-space UNet (new or pretrained) on a :class:`PUSplit`; saves the
    EMA weights as a diffusers pipeline and the sample grid."""

    ema = True  # the paper's models always keep an EMA of their weights

    def __init__(self, config, split: PUSplit):
        self.config, self.split = config, split
        self.method = methods.get(config.train.method)
        self.state = None

    def build(self, accelerator):
        """The UNet and its training noise schedule."""
        cfg = self.config
        if cfg.model.pretrained:
            # Fine-tuning: the pretrained UNet and the pipeline's own noise schedule.
            return load_pretrained(cfg.model.pretrained)
        channels, image_size = self.split.image_shape[0], self.split.image_shape[-1]
        with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
            torch.manual_seed(cfg.train.seed)
            unet = build_unet(cfg.model, image_size=image_size, channels=channels)
        return unet, build_noise_scheduler(cfg.model)

    def prepare(self, accelerator, run_dir: Path) -> None:
        """The method's fitted state (filter's mask, weighted's weights, reject's rejector): fitted
        and written by the main process, read back by every process."""
        self.state = self.method.prepare(self.config, self.split, Path(run_dir), accelerator)

    def batches(self, accelerator) -> Batches:
        """The pool the method trains on, on the device; a class-conditional UNet is conditioned
        on the set each item was drawn from (U's label or S's), never on its hidden class."""
        device = accelerator.device
        items = self.method.training_items(self.split, self.state)
        pool, is_sensitive = training_pool(self.split, items)
        pool, is_sensitive = pool.to(device), is_sensitive.to(device)
        labels = torch.where(is_sensitive, SENSITIVE_LABEL, UNLABELED_LABEL).long()
        conditional = bool(self.config.model.num_classes)

        def fetch(index: torch.Tensor, step: int):
            conditioning = {"class_labels": labels[index]} if conditional else None
            return pool[index], is_sensitive[index], conditioning

        num_sensitive = int(is_sensitive.sum())
        weights = None
        if items.weights is not None:  # S items, where drawn, weigh 1
            weights = torch.cat([items.weights, torch.ones(num_sensitive)]).to(device)
        return Batches(fetch, len(pool) - num_sensitive, num_sensitive, weights)

    def summary(self) -> dict:
        return self.split.summary()

    def finish(self, trainer) -> None:
        """The final EMA weights as a diffusers pipeline, and the sample grid."""
        cfg, ema = self.config, trainer.ema
        training_schedule = DDPMScheduler.from_config(trainer.noise_scheduler.config)
        # Saved from a CPU copy; sampled where the EMA already lives (the accelerator's device):
        # the other processes wait at a barrier meanwhile, and a large UNet sampled on the CPU
        # could outlast its timeout.
        ema.eval()

        def save(tmp: Path) -> None:
            save_pipeline(copy.deepcopy(ema).to("cpu"), training_schedule, tmp)
            write_card(tmp, cfg.to_dict(), self.summary())

        runs.atomic_write_dir(trainer.run_dir / "pipeline", save)
        model = RunModel.of_config(
            ema, training_schedule.config, cfg, guard=self.method.guard(trainer.run_dir)
        )
        # A grid is no reason to fail a finished run: a guarded run shows what was kept (or, if
        # nothing was, the unguarded draws) and says so.
        drawn = model.draw(cfg.sample.grid_size, cfg.train.seed, allow_fewer=True)
        images = drawn.images
        if len(images) < cfg.sample.grid_size:
            logging.getLogger("pudm").warning(
                "warning: the rejector kept %d of %d draws for samples.png%s",
                len(images),
                drawn.rejection["num_drawn"],
                "; the grid shows unguarded samples" if not len(images) else "",
            )
            if not len(images):
                images = model.generate(cfg.sample.grid_size, cfg.train.seed)
        save_grid(images, trainer.run_dir / "samples.png")
