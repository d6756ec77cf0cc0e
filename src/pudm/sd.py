"""Stable Diffusion: PU fine-tuning of a text-to-image pipeline, full UNet or LoRA.

The paper's headline experiment: Stable Diffusion 1.4 fine-tuned on U (images captioned "a photo
of a middle aged man", some of them one specific person) and S (that person, captioned with their
name), so that the prompt no longer produces them.

Training runs on VAE latents (scaled by the VAE's own factor) with the text encoder and the VAE
frozen; only the UNet learns, in full or through LoRA adapters (peft). The step, the objective,
the non-finite guard, the checkpoints and the stop handling are those of
:class:`pudm.training.Trainer`; :class:`pudm.sd_task.LatentTask` says what a batch is (latents
plus text embeddings as the UNet's conditioning) and what is saved: a complete
``StableDiffusionPipeline`` folder (``RUN/pipeline``) or a standard LoRA file
(``RUN/lora/pytorch_lora_weights.safetensors``) that ``StableDiffusionPipeline.load_lora_weights``
reads (:mod:`pudm.sd_pipeline`).

This module holds a run's settings and its data; :mod:`pudm.sd_pipeline` the pipeline's parts,
how a run's pipeline is saved, loaded and sampled; :mod:`pudm.sd_task` the task the loop trains.

Latents and text embeddings can be cached once (``cache=True``): the VAE's posterior (mean and
standard deviation) of every image and the embedding of every distinct caption are computed
before the first step, and each step draws a latent from the cached posterior with the same
seeded noise an uncached step would use, so caching changes the cost, not the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pudm import methods, runs
from pudm.config import (
    SAMPLERS,
    StoredConfig,
    TrainConfig,
    check_positive,
    data_source,
    flag,
    section_from_dict,
    validate_train,
)
from pudm.errors import UsageError
from pudm.imagefolder import read_captions
from pudm.readers import Columns, ImageSet, load_pu

SD_KIND = "sd"
# The methods offered on latents. filter, weighted and reject need an S-vs-U image classifier,
# which pudm has for small images only (the CNN of pudm.filtering), so they are not offered yet.
SD_METHODS = methods.names(lambda method: method.on_latents)
LORA_DIR = "lora"
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class SDError(UsageError):
    """Bad Stable Diffusion input; the message names the problem and the fix."""


@dataclass
class SDDataConfig:
    """The two image folders, their prompts and the training resolution."""

    unlabeled: str = flag(
        "",
        "U: an image folder, Parquet file(s), a save_to_disk folder, tar shards or a hub data set id",
        group="data",
        type=data_source,
    )
    sensitive: str | None = flag(
        None, "S, the labeled sensitive images (any form --unlabeled takes)", group="data", type=data_source
    )
    image_column: str = flag(
        "image", "the image column of tables (an extension such as jpg for tar shards)", group="data"
    )
    caption_column: str | None = flag(
        None, "the caption column of tables (default text; txt in tar shards)", group="data"
    )
    label_column: str | None = flag(
        None,
        "a column marking the labeled sensitive rows (1/true) of a table holding U and S",
        group="data",
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
    sensitive_per_batch: int | None = flag(
        None, "exactly K items of S per global batch, spread over the processes", group="data"
    )


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
            raise SDError("--unlabeled is required: a folder of images, Parquet, tar shards or a hub id")
        if methods.get(train.method).uses_sensitive and not (data.sensitive or data.label_column):
            raise SDError(
                f"method {train.method} needs --sensitive (the labeled sensitive images), or "
                "--label-column marking them in --unlabeled"
            )
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

    unlabeled: ImageSet
    sensitive: ImageSet | None
    captions: list[str]
    unlabeled_caption: torch.Tensor
    sensitive_caption: torch.Tensor

    # What a method asks of its data: the sizes of U and S, and no hidden truth (folders have none).
    unlabeled_is_sensitive = None

    @property
    def num_unlabeled(self) -> int:
        return len(self.unlabeled)

    @property
    def num_sensitive(self) -> int:
        return len(self.sensitive) if self.sensitive is not None else 0

    def skipped(self) -> list[tuple[str, str]]:
        return self.unlabeled.skipped + (self.sensitive.skipped if self.sensitive else [])


def _captioned(images: ImageSet, prompt: str | None, flag: str, captions: list[str]) -> torch.Tensor:
    if images.kind == "folder":
        given = read_captions(Path(images.where), flag)
        found = [given.get(name) for name in images.names]
        fix = 'a metadata.jsonl line {"file_name": ..., "text": ...}'
    else:  # tables and shards: each item's own caption, by position
        found = list(images.captions or [None] * len(images))
        fix = "a caption (--caption-column)"
    index = []
    for name, text in zip(images.names, found, strict=True):
        text = text or prompt
        if text is None:
            raise SDError(f"{flag}: {name} has no caption: give {flag}-prompt TEXT or {fix} for it")
        if text not in captions:
            captions.append(text)
        index.append(captions.index(text))
    return torch.tensor(index, dtype=torch.long)


def load_text_images(data: SDDataConfig, need_sensitive: bool) -> TextImageData:
    """Read U and S at the training resolution (RGB) and attach a caption to every image."""
    columns = Columns(data.image_column, data.caption_column, data.label_column)
    unlabeled, sensitive = load_pu(
        data.unlabeled, data.sensitive, data.resolution, 3, data.strict, columns, need_sensitive
    )
    if not need_sensitive:
        sensitive = None
    captions: list[str] = []
    unlabeled_caption = _captioned(unlabeled, data.unlabeled_prompt, "--unlabeled", captions)
    sensitive_caption = torch.zeros(0, dtype=torch.long)
    if sensitive is not None:
        sensitive_caption = _captioned(sensitive, data.sensitive_prompt, "--sensitive", captions)
    return TextImageData(unlabeled, sensitive, captions, unlabeled_caption, sensitive_caption)


def data_fingerprints(data: TextImageData) -> dict[str, str]:
    found = {"unlabeled": data.unlabeled.fingerprint}
    if data.sensitive is not None:
        found["sensitive"] = data.sensitive.fingerprint
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
