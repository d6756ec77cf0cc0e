"""Stable Diffusion: PU fine-tuning of a text-to-image pipeline, full UNet or LoRA.

The paper's headline experiment: Stable Diffusion 1.4 fine-tuned on U (images captioned "a photo
of a middle aged man", some of them one specific person) and S (that person, captioned with their
name), so that the prompt no longer produces them.

Training runs on VAE latents (scaled by the VAE's own factor) with the text encoder and the VAE
frozen; only the UNet learns, in full or through LoRA adapters (peft). The step, the objective,
the non-finite guard, the checkpoints and the stop handling are those of
:class:`pudm.training.Trainer`; :class:`SDTrainer` changes what a batch is (latents plus text
embeddings as the UNet's conditioning) and what is saved: a complete ``StableDiffusionPipeline``
folder (``RUN/pipeline``) or a standard LoRA file (``RUN/lora/pytorch_lora_weights.safetensors``)
that ``StableDiffusionPipeline.load_lora_weights`` reads.

Latents and text embeddings can be cached once (``cache=True``): the VAE's posterior (mean and
standard deviation) of every image and the embedding of every distinct caption are computed
before the first step, and each step draws a latent from the cached posterior with the same
seeded noise an uncached step would use, so caching changes the cost, not the result.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pudm import methods, runs
from pudm.cards import write_card
from pudm.config import (
    DEFAULT_SAMPLING_STEPS,
    SAMPLERS,
    StoredConfig,
    TrainConfig,
    check_positive,
    flag,
    section_from_dict,
    validate_train,
)
from pudm.errors import UsageError
from pudm.imagefolder import FolderImages, fingerprint, load_folder, read_captions
from pudm.tasks import Batches
from pudm.training import Trainer

SD_KIND = "sd"
# The methods offered on latents. filter, weighted and reject need an S-vs-U image classifier,
# which pudm has for small images only (the CNN of pudm.filtering), so they are not offered yet.
SD_METHODS = methods.names(lambda method: method.on_latents)
LORA_DIR = "lora"
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SDError(UsageError):
    """Bad Stable Diffusion input; the message names the problem and the fix."""


@dataclass
class SDDataConfig:
    """The two image folders, their prompts and the training resolution."""

    unlabeled: str = flag("", "folder of unlabeled images U (recursive)", group="data", type=Path)
    sensitive: str | None = flag(
        None, "folder of labeled sensitive images S (recursive)", group="data", type=Path
    )
    # The caption of every image that metadata.jsonl does not caption.
    unlabeled_prompt: str | None = flag(
        None, "caption of U images that metadata.jsonl does not caption", group="data"
    )
    sensitive_prompt: str | None = flag(
        None, "caption of S images that metadata.jsonl does not caption", group="data"
    )
    resolution: int = flag(512, "training size in pixels, resize + centre crop (512)", group="data")
    strict: bool = flag(False, "stop at an unreadable image file", group="data", action="store_true")
    # name-and-size hashes of the folders: a resumed run refuses data that changed
    fingerprints: dict = field(default_factory=dict)
    num_unlabeled: int = 0
    num_sensitive: int = 0
    # None: batches drawn from the pooled U and S (the paper); k: exactly k S items per batch.
    sensitive_per_batch: int | None = flag(None, "exactly K items of S per batch", group="data")


@dataclass
class SDModelConfig:
    """Which pipeline, and what of its UNet trains."""

    pretrained: str = flag("", "local Stable Diffusion pipeline folder or hub id", group="data")
    # 0: full fine-tuning of the UNet; R > 0: LoRA adapters of rank R on the attention projections
    lora_rank: int = flag(0, "train LoRA adapters of this rank (default 0: full UNet)", group="optimisation")
    lora_alpha: float | None = flag(None, "LoRA alpha (default: the rank)", group="optimisation")
    lora_targets: tuple[str, ...] = LORA_TARGETS
    gradient_checkpointing: bool = flag(
        False, "recompute activations: less memory", group="optimisation", action="store_true"
    )
    # VAE posteriors and caption embeddings computed once before training
    cache: bool = flag(
        True,
        "encode every image and caption once before training (default on; same results)",
        group="optimisation",
        action="optional_bool",
    )
    ema: bool = flag(False, "save EMA weights of what trains", group="optimisation", action="store_true")
    epochs: int | None = flag(
        None, "passes over U (+ S) instead of --steps (default 1000)", group="optimisation"
    )


_SD_GRID = "run folder"


@dataclass
class SDSampleConfig:
    """The end-of-run grid and the defaults of ``pudm sample`` for this run."""

    sampler: str = flag(
        "ddim", "end-of-run samples and pudm sample (default ddim)", group=_SD_GRID, choices=SAMPLERS
    )
    steps: int = flag(50, "sampling steps (default 50 for ddim)", group=_SD_GRID, name="sample_steps")
    guidance_scale: float = flag(7.5, "classifier-free guidance (default 7.5)", group=_SD_GRID)
    prompts: tuple[str, ...] = flag(
        (),
        "prompt of the end-of-run grid; repeatable (default: U's)",
        group=_SD_GRID,
        name="sample_prompt",
        action="append",
    )
    grid_size: int = flag(4, "images per prompt in samples.png (default 4; 0: none)", group=_SD_GRID)


def sd_train_defaults() -> TrainConfig:
    """The paper's Stable Diffusion settings (batch 16, constant lr, beta 0.2)."""
    return TrainConfig(
        method="pu",
        beta=0.2,
        steps=1000,
        batch_size=16,
        learning_rate=1e-5,
        warmup_steps=0,
        lr_schedule="constant",
        weight_decay=1e-2,
        ema_decay=0.9999,
        log_every=10,
        checkpoint_every=500,
    )


def default_learning_rate(method: str) -> float:
    """The paper: 1e-5 for pu (and pu-bounded, its variant), 1e-4 for the other methods."""
    return 1e-5 if method in ("pu", "pu-bounded") else 1e-4


@dataclass
class SDRunConfig(StoredConfig):
    kind: str = SD_KIND
    data: SDDataConfig = field(default_factory=SDDataConfig)
    model: SDModelConfig = field(default_factory=SDModelConfig)
    train: TrainConfig = field(default_factory=sd_train_defaults)
    sample: SDSampleConfig = field(default_factory=SDSampleConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SDRunConfig:
        if values.get("kind") != SD_KIND:
            raise SDError("config.json is not a Stable Diffusion run's (pudm sd): check the folder")

        build = section_from_dict
        return cls(
            data=build(SDDataConfig, values.get("data", {})),
            model=build(SDModelConfig, values.get("model", {})),
            train=build(TrainConfig, values.get("train", {})),
            sample=build(SDSampleConfig, values.get("sample", {})),
        )

    @property
    def lora(self) -> bool:
        return self.model.lora_rank > 0

    def validate(self) -> None:
        """Check what a user can set; raise SDError naming the flag and the fix."""
        data, model, train, sample = self.data, self.model, self.train, self.sample
        validate_train(train, SD_METHODS, 1000, SDError, steps_known=model.epochs is None)
        if not model.pretrained:
            raise SDError("--pretrained is required: a local Stable Diffusion folder or a hub id")
        if not data.unlabeled:
            raise SDError("--unlabeled is required: a folder of images")
        if methods.get(train.method).uses_sensitive and not data.sensitive:
            raise SDError(f"method {train.method} needs --sensitive DIR (the labeled sensitive images)")
        positive = {"--resolution": data.resolution, "--sample-steps": sample.steps}
        check_positive(positive, SDError)
        if data.resolution % 8:
            raise SDError(f"--resolution must be a multiple of 8 (the VAE's factor), got {data.resolution}")
        if model.lora_rank < 0:
            raise SDError(f"--lora-rank must be >= 0 (0: full fine-tuning), got {model.lora_rank}")
        if model.epochs is not None and model.epochs <= 0:
            raise SDError(f"--epochs must be > 0, got {model.epochs}")
        if sample.sampler not in SAMPLERS:
            raise SDError(f"unknown sampler {sample.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if sample.grid_size < 0:
            raise SDError(f"--grid-size must be >= 0, got {sample.grid_size}")


# The sections of a Stable Diffusion run's config, by the name its JSON and the flags give them.
SD_SECTIONS = {"data": SDDataConfig, "model": SDModelConfig, "train": TrainConfig, "sample": SDSampleConfig}


def is_sd_run(run_dir: Path) -> bool:
    path = Path(run_dir) / runs.CONFIG
    if not path.is_file():
        return False
    try:
        return runs.read_json(path).get("kind") == SD_KIND
    except (OSError, ValueError, AttributeError):
        return False


def load_run_config(run_dir: Path) -> SDRunConfig:
    return SDRunConfig.from_dict(runs.read_json(Path(run_dir) / runs.CONFIG))


# -- data --------------------------------------------------------------------------------------


@dataclass
class TextImageData:
    """U and S as uint8 pixels with a caption each (an index into ``captions``)."""

    unlabeled: FolderImages
    sensitive: FolderImages | None
    captions: list[str]
    unlabeled_caption: torch.Tensor
    sensitive_caption: torch.Tensor

    # What a method asks of its data: the sizes of U and S, and no hidden truth (folders have none).
    unlabeled_is_sensitive = None

    @property
    def num_unlabeled(self) -> int:
        return len(self.unlabeled.files)

    @property
    def num_sensitive(self) -> int:
        return len(self.sensitive.files) if self.sensitive is not None else 0

    def skipped(self) -> list[tuple[Path, str]]:
        return self.unlabeled.skipped + (self.sensitive.skipped if self.sensitive else [])


def _captioned(images: FolderImages, prompt: str | None, flag: str, captions: list[str]) -> torch.Tensor:
    given = read_captions(images.root, flag)
    index = []
    for name in images.relative_names():
        text = given.get(name, prompt)
        if text is None:
            raise SDError(
                f"{flag}: {name} has no caption: give {flag}-prompt TEXT or a metadata.jsonl line "
                '{"file_name": ..., "text": ...} for it'
            )
        if text not in captions:
            captions.append(text)
        index.append(captions.index(text))
    return torch.tensor(index, dtype=torch.long)


def load_text_images(data: SDDataConfig, need_sensitive: bool) -> TextImageData:
    """Read both folders at the training resolution (RGB) and attach a caption to every image."""
    unlabeled = load_folder(Path(data.unlabeled), data.resolution, 3, data.strict, "--unlabeled")
    sensitive = None
    if need_sensitive:
        sensitive = load_folder(Path(data.sensitive), data.resolution, 3, data.strict, "--sensitive")
    captions: list[str] = []
    unlabeled_caption = _captioned(unlabeled, data.unlabeled_prompt, "--unlabeled", captions)
    sensitive_caption = torch.zeros(0, dtype=torch.long)
    if sensitive is not None:
        sensitive_caption = _captioned(sensitive, data.sensitive_prompt, "--sensitive", captions)
    return TextImageData(unlabeled, sensitive, captions, unlabeled_caption, sensitive_caption)


def data_fingerprints(data: TextImageData) -> dict[str, str]:
    found = {"unlabeled": fingerprint(data.unlabeled.files, data.unlabeled.root)}
    if data.sensitive is not None:
        found["sensitive"] = fingerprint(data.sensitive.files, data.sensitive.root)
    return found


def resolve_steps(config: SDRunConfig, data: TextImageData, num_processes: int = 1) -> None:
    """``--epochs E``: E passes over the training pool (U, plus S for methods that use it)."""
    if config.model.epochs is None:
        return
    pool = data.num_unlabeled
    if methods.get(config.train.method).draws_sensitive:
        pool += data.num_sensitive
    per_step = config.train.batch_size * config.train.gradient_accumulation_steps * num_processes
    config.train.steps = config.model.epochs * math.ceil(pool / per_step)


# -- the pipeline's parts ----------------------------------------------------------------------


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


# -- training ----------------------------------------------------------------------------------


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
            "unlabeled": len(self.data.unlabeled.files),
            "sensitive": len(self.data.sensitive.files) if self.data.sensitive else 0,
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
