"""A Stable Diffusion pipeline's parts (UNet, VAE, text encoder, tokenizer, noise schedule), its
LoRA adapters and encoders, and how a ``pudm sd`` run's pipeline is saved, loaded and sampled.

Weights come from safetensors files only, and no code from a model folder runs.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pudm.config import DEFAULT_SAMPLING_STEPS
from pudm.sd import LORA_DIR, SDError, SDModelConfig, load_run_config

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _check_pretrained(pretrained: str) -> None:
    path = Path(pretrained)
    if path.exists():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise SDError(
                f"--pretrained {pretrained} is not a diffusers Stable Diffusion folder (model_index.json, "
                "unet/, vae/, text_encoder/, tokenizer/, scheduler/): check the path"
            )
        return
    if not _HUB_ID.match(pretrained):
        raise SDError(f"--pretrained {pretrained} does not exist: give a local pipeline folder or a hub id")


# What a Stable Diffusion pipeline needs from a hub repository: configs, tokenizer files and the
# safetensors weights (no pickled .bin/.ckpt files, no code).
HUB_FILES = [
    "model_index.json",
    "*/*.json",
    "*/*.txt",
    "*/diffusion_pytorch_model.safetensors",
    "*/model.safetensors",
]


def resolve_pretrained(pretrained: str) -> str:
    """A local folder for ``pretrained``: itself, or the hub snapshot (cached, else downloaded) by
    the one hub resolver, :func:`pudm.models.hub_snapshot`."""
    from pudm.models import hub_snapshot

    _check_pretrained(pretrained)
    if Path(pretrained).exists():
        return pretrained
    quiet_libraries()
    return str(hub_snapshot(pretrained, HUB_FILES))


def _loading(pretrained: str, what: str, load):
    try:
        return load()
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        local = Path(pretrained).exists()
        fix = (
            "check that the folder is a complete Stable Diffusion pipeline with safetensors weights"
            if local
            else "download it where there is internet (huggingface-cli download "
            f"{pretrained}) and pass the local folder"
        )
        raise SDError(
            f"--pretrained {pretrained}: the {what} could not be loaded ({reason}): {fix}"
        ) from None


@dataclass
class SDParts:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    noise_scheduler: Any


def require_extras() -> None:
    """transformers and peft come with ``pip install 'pudm[sd]'``; say so instead of a traceback."""
    import importlib.util

    missing = [name for name in ("transformers", "peft") if importlib.util.find_spec(name) is None]
    if missing:
        raise SDError(f"pudm sd needs {' and '.join(missing)}: pip install 'pudm[sd]'")


def quiet_libraries() -> None:
    """No download bars or informational warnings from diffusers and transformers."""
    require_extras()
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.disable_progress_bar()
        logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")


def load_parts(pretrained: str) -> SDParts:
    """The UNet, VAE, text encoder, tokenizer and DDPM training schedule of a pipeline.

    Weights come from safetensors files only, and no code from the model folder runs.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    require_extras()
    from transformers import CLIPTextModel, CLIPTokenizer

    quiet_libraries()
    pretrained = resolve_pretrained(pretrained)
    safe = {"use_safetensors": True}
    return SDParts(
        unet=_loading(
            pretrained,
            "UNet",
            lambda: UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **safe),
        ),
        vae=_loading(
            pretrained, "VAE", lambda: AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **safe)
        ),
        text_encoder=_loading(
            pretrained,
            "text encoder",
            lambda: CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **safe),
        ),
        tokenizer=_loading(
            pretrained, "tokenizer", lambda: CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
        ),
        # The pipeline's own noise schedule (betas, prediction type), stepped as DDPM in training.
        noise_scheduler=_loading(
            pretrained, "scheduler", lambda: DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
        ),
    )


def add_lora(unet: torch.nn.Module, model: SDModelConfig) -> None:
    """Freeze the UNet and add trainable LoRA adapters (peft) to its attention projections."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=model.lora_rank,
            lora_alpha=model.lora_alpha or model.lora_rank,
            init_lora_weights="gaussian",
            target_modules=list(model.lora_targets),
        )
    )


def latents_from_posterior(vae, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A draw from the VAE posterior, shifted and scaled by the VAE's own factors."""
    latents = mean + std * noise
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor


@torch.no_grad()
def encode_posterior(vae, pixels: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and standard deviation (float32) of uint8 (N, 3, H, W) pixels."""
    means, stds = [], []
    dtype, device = vae.dtype, vae.device
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size].to(device).float() / 127.5 - 1.0
        posterior = vae.encode(chunk.to(dtype)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Text embeddings (last hidden state) of ``prompts``, float32, shape (P, tokens, dim)."""
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(tokens)[0].float()


def save_lora(unet: torch.nn.Module, folder: Path) -> None:
    """The UNet's LoRA adapters as diffusers' standard LoRA file (``load_lora_weights`` reads it)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers={k: v.float().contiguous() for k, v in layers.items()},
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )


def save_full_pipeline(pretrained: str, unet: torch.nn.Module, folder: Path) -> None:
    """The pretrained pipeline with the fine-tuned UNet, as a complete diffusers folder."""
    from diffusers import StableDiffusionPipeline

    pretrained = resolve_pretrained(pretrained)
    pipeline = _loading(
        pretrained,
        "pipeline",
        lambda: StableDiffusionPipeline.from_pretrained(pretrained, unet=unet.float(), use_safetensors=True),
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


def load_run_pipeline(run_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """The pipeline a ``pudm sd`` run produced: its full folder, or the base with its LoRA loaded."""
    from diffusers import StableDiffusionPipeline

    quiet_libraries()
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    options = {"use_safetensors": True}
    if dtype is not None:
        options["torch_dtype"] = dtype
    if config.lora:
        if not (run_dir / LORA_DIR).is_dir():
            raise SDError(
                f"{run_dir} has no {LORA_DIR}/ yet (the run did not finish): pudm sd --resume --out {run_dir}"
            )
        base = resolve_pretrained(config.model.pretrained)
        pipeline = _loading(
            config.model.pretrained,
            "pipeline",
            lambda: StableDiffusionPipeline.from_pretrained(base, **options),
        )
        pipeline.load_lora_weights(run_dir / LORA_DIR)
    else:
        if not (run_dir / "pipeline" / "model_index.json").is_file():
            raise SDError(
                f"{run_dir} has no pipeline/ yet (the run did not finish): pudm sd --resume --out {run_dir}"
            )
        pipeline = StableDiffusionPipeline.from_pretrained(run_dir / "pipeline", **options)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


@torch.no_grad()
def generate_sd(
    pipeline,
    prompt: str,
    num: int,
    sampler: str = "ddim",
    steps: int | None = None,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 8,
    resolution: int | None = None,
) -> np.ndarray:
    """``num`` images of ``prompt`` as uint8 (N, H, W, 3); batch ``i`` draws from a generator seeded
    with :func:`pudm.sampling.sample_seed` of ``(seed, 0, i)`` (no two seeds share a batch's noise)."""
    from pudm.models import sampler_scheduler
    from pudm.sampling import sample_seed

    if num <= 0:
        raise SDError(f"--num must be > 0, got {num}")
    steps = steps or DEFAULT_SAMPLING_STEPS[sampler]
    pipeline.scheduler = sampler_scheduler(sampler, pipeline.scheduler.config)
    batches = []
    for i, start in enumerate(range(0, num, batch_size)):
        generator = torch.Generator(device="cpu").manual_seed(sample_seed(seed, 0, i))
        output = pipeline(
            [prompt] * min(batch_size, num - start),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            height=resolution,
            width=resolution,
            output_type="np",
        )
        batches.append(output.images)
    images = np.concatenate(batches)
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
