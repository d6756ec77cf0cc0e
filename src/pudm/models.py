"""Build and load denoisers: diffusers UNet2DModel presets, noise schedules, pipelines."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)

from pudm.config import ModelConfig, check_image_size

MODEL_PRESETS = {
    # ~1.1 M parameters: trains on 8x8 digits in minutes on 2 CPU cores.
    "small": ModelConfig(),
    # The paper's from-scratch UNet (block channels 128,128,256,512; attention in the third down
    # and second up block).
    "paper": ModelConfig(
        block_out_channels=(128, 128, 256, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
}


def model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[name])


def build_unet(config: ModelConfig, image_size: int, channels: int) -> UNet2DModel:
    """A randomly initialised UNet2DModel for square ``image_size`` images with ``channels``."""
    check_image_size(config, image_size)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=config.down_block_types,
        up_block_types=config.up_block_types,
        norm_num_groups=config.norm_num_groups,
    )


def build_noise_scheduler(config: ModelConfig) -> DDPMScheduler:
    """The DDPM training schedule (the paper: 1000 steps, linear betas)."""
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
    )


def sampler_scheduler(name: str, training_scheduler_config: dict):
    """A diffusers scheduler for sampling, sharing the training noise schedule."""
    kinds = {
        "ddpm": (DDPMScheduler, {}),
        "ddim": (DDIMScheduler, {}),
        "dpm": (DPMSolverMultistepScheduler, {}),  # DPM-Solver++ (2M), an ODE solver
        # DPM-Solver++ (2M) SDE: stochastic like DDPM, and within 10% of DDPM 1000 from 10 steps
        # on the digits models (benchmarks/README.md, "Samplers"), where the ODE solvers are not.
        "dpm-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    }
    if name not in kinds:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(kinds)}")
    kind, options = kinds[name]
    return kind.from_config(training_scheduler_config, **options)


def save_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, path: Path) -> None:
    """Save a standard diffusers DDPMPipeline folder (safetensors weights)."""
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=True)


def load_pipeline(path: Path, device: torch.device | str = "cpu") -> DDPMPipeline:
    """Load a pipeline folder written by :func:`save_pipeline` (or any local DDPM pipeline)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bar on every load
    try:
        pipeline = DDPMPipeline.from_pretrained(path, use_safetensors=True)
    finally:
        diffusers_logging.enable_progress_bar()
    return pipeline.to(device)
