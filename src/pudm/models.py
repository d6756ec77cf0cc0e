"""Build and load denoisers: diffusers UNet2DModel presets, noise schedules, pipelines."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)

from pudm.config import PAPER_MODEL, ModelConfig, check_image_size
from pudm.errors import UsageError

MODEL_PRESETS = {
    # ~1.1 M parameters: trains on 8x8 digits in minutes on 2 CPU cores.
    "small": ModelConfig(),
    # The paper's from-scratch UNet (block channels 128,128,256,512; attention in the third down
    # and second up block).
    "paper": PAPER_MODEL,
}


def model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise UsageError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
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
        num_class_embeds=config.num_classes or None,
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
        raise UsageError(f"unknown sampler {name!r}; choose one of {', '.join(kinds)}")
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


# -- pretrained pipelines ------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A diffusers pipeline's configs and safetensors weights; pickled .bin weights only where a
# repository has no safetensors (diffusers reads those with torch.load(weights_only=True)).
PIPELINE_FILES = ["model_index.json", "*/*.json", "*/*.txt", "*/diffusion_pytorch_model.safetensors"]
PICKLED_WEIGHTS = ["*/diffusion_pytorch_model.bin"]


def quiet_hub() -> None:
    """No retry chatter or progress bars from huggingface_hub and diffusers while fetching."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")


def hub_snapshot(repo_id: str, allow_patterns: list[str], flag: str = "--pretrained") -> Path:
    """The local snapshot of a hub repository: from the cache, else downloaded."""
    from huggingface_hub import snapshot_download

    quiet_hub()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or partly): fetch it
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as error:  # noqa: BLE001 - offline, unknown or gated repository
        reason = str(error).splitlines()[0][:160] if str(error) else ""
        raise UsageError(
            f"{flag} {repo_id} could not be downloaded ({type(error).__name__}: {reason}): download it "
            f"where there is internet (huggingface-cli download {repo_id}) and pass the local folder"
        ) from None


def pretrained_pipeline_dir(pretrained: str) -> Path:
    """A local DDPM/DDIM pipeline folder for ``pretrained``: a pipeline folder, a pudm run folder
    (its ``pipeline/``), or a hub id (cached, else downloaded)."""
    path = Path(pretrained)
    if path.exists():
        for folder in (path, path / "pipeline"):
            if (folder / "unet" / "config.json").is_file() and (folder / "scheduler").is_dir():
                return folder
        raise UsageError(
            f"--pretrained {pretrained} is neither a diffusers pipeline folder (unet/, scheduler/) nor a "
            "finished pudm run: check the path"
        )
    if not _HUB_ID.match(pretrained):
        raise UsageError(
            f"--pretrained {pretrained} does not exist: give a pipeline folder, a run or a hub id"
        )
    folder = hub_snapshot(pretrained, PIPELINE_FILES)
    if not list(folder.glob("unet/*.safetensors")):
        folder = hub_snapshot(pretrained, PIPELINE_FILES + PICKLED_WEIGHTS)
    return folder


def pretrained_model_config(pretrained: str) -> ModelConfig:
    """The ModelConfig that describes a pretrained pipeline's UNet and noise schedule."""
    folder = pretrained_pipeline_dir(pretrained)
    try:
        unet = UNet2DModel.load_config(folder, subfolder="unet")
        schedule = DDPMScheduler.load_config(folder, subfolder="scheduler")
    except Exception as error:  # noqa: BLE001 - a broken folder gets one answer
        raise UsageError(
            f"--pretrained {pretrained}: its configs cannot be read ({type(error).__name__})"
        ) from None
    if unet.get("_class_name") not in (None, "UNet2DModel"):
        raise UsageError(
            f"--pretrained {pretrained} holds a {unet.get('_class_name')}, not an unconditional UNet2DModel: "
            "Stable Diffusion pipelines go to pudm sd"
        )
    return ModelConfig(
        block_out_channels=tuple(unet["block_out_channels"]),
        layers_per_block=unet["layers_per_block"],
        down_block_types=tuple(unet["down_block_types"]),
        up_block_types=tuple(unet["up_block_types"]),
        norm_num_groups=unet.get("norm_num_groups", 32),
        num_train_timesteps=schedule.get("num_train_timesteps", 1000),
        beta_schedule=schedule.get("beta_schedule", "linear"),
        prediction_type=schedule.get("prediction_type", "epsilon"),
        pretrained=pretrained,
        pretrained_image_size=_as_size(unet.get("sample_size")),
        pretrained_channels=unet.get("in_channels", 3),
        num_classes=unet.get("num_class_embeds") or 0,
    )


def _as_size(sample_size) -> int:
    return int(sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size)


def load_pretrained(pretrained: str) -> tuple[UNet2DModel, DDPMScheduler]:
    """The UNet (trainable, float32) and the DDPM training schedule of a pretrained pipeline."""
    folder = pretrained_pipeline_dir(pretrained)
    quiet_hub()
    try:
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
        schedule = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    except Exception as error:  # noqa: BLE001
        reason = str(error).splitlines()[0][:160] if str(error) else ""
        raise UsageError(
            f"--pretrained {pretrained}: the UNet could not be loaded ({type(error).__name__}: {reason}): "
            "check that the folder is a complete diffusers pipeline"
        ) from None
    return unet.float().train(), schedule
