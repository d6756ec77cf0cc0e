"""The Stable Diffusion task of the training loop: the pipeline's UNet (full or LoRA adapters)
trained on VAE latents of U and S with their caption embeddings."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pudm import methods, runs
from pudm.cards import write_card
from pudm.sd import LORA_DIR, WEIGHT_DTYPES, SDRunConfig, TextImageData
from pudm.sd_pipeline import (
    SDParts,
    add_lora,
    encode_posterior,
    encode_prompts,
    generate_sd,
    latents_from_posterior,
    load_parts,
    load_run_pipeline,
    save_full_pipeline,
    save_lora,
)
from pudm.tasks import Batches
from pudm.training import Trainer


class LatentTask:
    """What the loop trains for Stable Diffusion: the pipeline's UNet (full or LoRA adapters) on
    VAE latents of U and S with their caption embeddings; the text encoder and VAE stay frozen.
    Saves a pipeline folder or a LoRA file, and a grid per prompt (:class:`pudm.training.Trainer`
    does the rest)."""

    def __init__(self, config: SDRunConfig, data: TextImageData, parts: SDParts | None = None):
        self.config, self.data, self.parts = config, data, parts
        self.ema = config.model.ema
        self.method = methods.get(config.train.method)
        self.state = None

    def summary(self) -> dict[str, Any]:
        return {
            "unlabeled": len(self.data.unlabeled),
            "sensitive": len(self.data.sensitive) if self.data.sensitive else 0,
            "captions": self.data.captions,
            "skipped_files": [str(path) for path, _ in self.data.skipped()],
        }

    def build(self, accelerator):
        """The UNet (with LoRA adapters when asked) and the pipeline's noise schedule; the frozen
        VAE and text encoder move to the device in the autocast dtype."""
        cfg = self.config
        parts = self.parts or load_parts(cfg.model.pretrained)
        self.parts = None  # the trainer owns the modules from here on
        device = accelerator.device
        weight_dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]
        self.vae = parts.vae.requires_grad_(False).eval().to(device, dtype=weight_dtype)
        self.text_encoder = parts.text_encoder.requires_grad_(False).eval().to(device, dtype=weight_dtype)
        self.tokenizer = parts.tokenizer
        unet = parts.unet
        if cfg.lora:
            # The frozen base in the autocast dtype, the adapters in float32 (as diffusers' LoRA
            # scripts): half the base's memory, full-precision updates.
            unet.to(device, dtype=weight_dtype)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed)
                add_lora(unet, cfg.model)
            for parameter in unet.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
        else:
            unet.to(device).requires_grad_(True)
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return unet, parts.noise_scheduler

    def prepare(self, accelerator, run_dir: Path) -> None:
        """The method's fitted state, where it has one; the latents are drawn (or cached) in
        :meth:`batches`."""
        self.state = self.method.prepare(self.config, self.data, Path(run_dir), accelerator)

    def batches(self, accelerator) -> Batches:
        cfg, data = self.config, self.data
        device = accelerator.device
        rank, world_size = accelerator.process_index, accelerator.num_processes
        items = self.method.training_items(data, self.state)
        if items.weights is not None:
            raise NotImplementedError(f"method {self.method.name} weighs items: not offered on latents")
        pixels = data.unlabeled.images[items.unlabeled]
        caption = data.unlabeled_caption[items.unlabeled]
        num_unlabeled, num_sensitive = len(pixels), 0
        if items.sensitive:
            pixels = torch.cat([pixels, data.sensitive.images])
            caption = torch.cat([caption, data.sensitive_caption])
            num_sensitive = len(data.sensitive.images)
        is_sensitive = torch.arange(len(pixels)) >= num_unlabeled
        is_sensitive, caption = is_sensitive.to(device), caption.to(device)
        latent_shape = None
        if cfg.model.cache:
            mean, std = encode_posterior(self.vae, pixels)
            embeddings = encode_prompts(self.tokenizer, self.text_encoder, data.captions)
            latent_shape = mean.shape[1:]
        else:
            tokens = self.tokenizer(
                data.captions,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            with torch.no_grad():
                probe = self.vae.encode(pixels[:1].to(device, self.vae.dtype) / 127.5 - 1.0).latent_dist
            latent_shape = probe.mean.shape[1:]

        def fetch(index: torch.Tensor, step: int):
            # The latent's own draw from the posterior: seeded by (seed, step), the global batch's
            # noise cut to this process's block, so cached and uncached runs draw the same.
            generator = torch.Generator(device=device).manual_seed(
                (cfg.train.seed * 1_000_003 + step) * 64 + 1
            )
            draw = torch.randn((world_size * len(index), *latent_shape), generator=generator, device=device)
            draw = draw[rank * len(index) : (rank + 1) * len(index)]
            if cfg.model.cache:
                item_mean, item_std = mean[index.to(mean.device)], std[index.to(std.device)]
                conditioning = embeddings[caption[index]]
            else:
                item_mean, item_std = encode_posterior(
                    self.vae, pixels[index.cpu()], batch_size=cfg.train.batch_size
                )
                with torch.no_grad():
                    conditioning = self.text_encoder(tokens[caption[index]])[0].float()
            latents = latents_from_posterior(self.vae, item_mean, item_std, draw)
            return latents, is_sensitive[index], {"encoder_hidden_states": conditioning}

        return Batches(fetch, num_unlabeled, num_sensitive)

    def finish(self, trainer: Trainer) -> None:
        """The final (EMA) weights as a pipeline folder or a LoRA file, and a sample grid."""
        cfg, run_dir = self.config, trainer.run_dir
        unet = copy.deepcopy(
            trainer.ema if trainer.ema is not None else trainer.accelerator.unwrap_model(trainer.unet)
        )
        unet = unet.to("cpu")
        if cfg.model.gradient_checkpointing:
            unet.disable_gradient_checkpointing()

        def save(tmp: Path) -> None:
            if cfg.lora:
                save_lora(unet, tmp)
            else:
                save_full_pipeline(cfg.model.pretrained, unet, tmp)
            write_card(tmp, cfg.to_dict(), self.summary())

        runs.atomic_write_dir(run_dir / (LORA_DIR if cfg.lora else "pipeline"), save)
        if cfg.sample.grid_size:
            from pudm.sampling import save_grid

            pipeline = load_run_pipeline(run_dir, device=trainer.accelerator.device)
            prompts = list(cfg.sample.prompts) or [self.data.captions[int(self.data.unlabeled_caption[0])]]
            images = np.concatenate(
                [
                    generate_sd(
                        pipeline,
                        prompt,
                        num=cfg.sample.grid_size,
                        sampler=cfg.sample.sampler,
                        steps=cfg.sample.steps,
                        guidance_scale=cfg.sample.guidance_scale,
                        seed=cfg.train.seed,
                        resolution=cfg.data.resolution,
                    )
                    for prompt in prompts
                ]
            )
            save_grid(images, run_dir / "samples.png", columns=cfg.sample.grid_size, scale=1)


class SDTrainer(Trainer):
    """The loop with a :class:`LatentTask`: ``SDTrainer(config, data, run_dir)`` is
    ``Trainer(config, None, run_dir, task=LatentTask(config, data))``."""

    def __init__(
        self,
        config: SDRunConfig,
        data: TextImageData,
        run_dir: Path,
        accelerator=None,
        show_progress: bool = True,
        parts: SDParts | None = None,
        report_to: str = "none",
    ):
        task = LatentTask(config, data, parts)
        super().__init__(config, None, run_dir, accelerator, show_progress, task=task, report_to=report_to)

    @property
    def vae(self):
        return self.task.vae
