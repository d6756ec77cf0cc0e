"""One sampler per run: how a run (or a pipeline folder) draws its samples.

The end-of-run grid, ``pudm sample``, ``pudm evaluate`` and the benchmark all draw through
:meth:`RunModel.draw`: the run's denoiser and noise schedule, the class a user asks for (U's, on
a class-conditional model), the run's sampler and steps unless told otherwise, and the sampling-
time guard of the run's method (``reject``'s rejector). The seeds of :func:`pudm.sampling.generate`
make every draw repeatable and the draws of two seeds (and of two rejection rounds) independent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pudm import runs
from pudm.errors import UsageError

# A class-conditional UNet is conditioned on what a user knows of each item: the set it came from
# (the twin of the paper's Stable Diffusion captions, where all of U reads "a photo of a middle aged
# man" and S "a photo of Brad Pitt"). Which items of U are sensitive is never known in the PU
# setting, so no class may reveal it.
UNLABELED_LABEL, SENSITIVE_LABEL = 0, 1
SET_CLASSES = 2


@dataclass
class Drawn:
    """Samples and how they were made."""

    images: np.ndarray  # uint8 (N, H, W, C)
    description: str  # "dpm-sde, 10 steps; the rejector dropped 8.1% of draws"
    rejection: dict | None = None  # num_drawn, rejected_share, threshold (a guarded run only)


class RunModel:
    """A denoiser and everything that says how to sample it.

    Args:
        unet: the UNet2DModel (a run's EMA weights, or a loaded pipeline's UNet).
        scheduler_config: the training noise schedule the sampler is built from.
        sampler, steps: the diffusers sampler (ddpm, ddim, dpm, dpm-sde) and its step count.
        class_label: the class every sample is drawn with (None: an unconditional UNet).
        guard: a rejector whose flagged samples are dropped (None: every draw is kept).
        caution: why this sampler is unsafe for this model (None when it is not).
    """

    def __init__(
        self,
        unet,
        scheduler_config: dict,
        *,
        sampler: str,
        steps: int,
        class_label: int | None = None,
        guard=None,
        caution: str | None = None,
    ):
        if steps <= 0:
            raise UsageError(f"--steps must be > 0, got {steps}")
        self.unet, self.scheduler_config = unet, scheduler_config
        self.sampler, self.steps = sampler, steps
        self.class_label, self.guard, self.caution = class_label, guard, caution

    @classmethod
    def of_config(cls, unet, scheduler_config: dict, config, guard=None) -> RunModel:
        """A model being trained with ``config``: its grid's sampler, steps and class."""
        label = UNLABELED_LABEL if config.model.num_classes else None
        return cls(
            unet,
            scheduler_config,
            sampler=config.sample.sampler,
            steps=config.sample.steps,
            class_label=label,
            guard=guard,
        )

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        class_label: int | None = None,
        device: torch.device | str = "cpu",
    ) -> RunModel:
        """A run folder (its pipeline, sampler and guard) or a bare diffusers pipeline folder
        (pudm's default sampler, no guard: a ``reject`` run's pipeline alone does not reject)."""
        from pudm import methods
        from pudm.config import RunConfig, default_steps
        from pudm.models import load_pipeline

        path = Path(path)
        pipeline_dir = pipeline_folder(path)
        # A folder holding pipeline/ but no config.json (a copied pipeline) is read as a bare one.
        is_run = pipeline_dir != path and runs.holds_run(path)
        stored = RunConfig.from_dict(runs.read_json(path / runs.CONFIG)) if is_run else None
        defaults = stored.sample if stored else RunConfig().sample
        sampler = sampler or defaults.sampler
        steps = steps or (defaults.steps if sampler == defaults.sampler else default_steps(sampler))
        pipeline = load_pipeline(pipeline_dir, device=device)
        classes = pipeline.unet.config.num_class_embeds
        if class_label is not None:
            if not classes:
                raise UsageError(f"{path} is not class-conditional: drop --class")
            if not 0 <= class_label < classes:
                raise UsageError(f"--class must be in 0..{classes - 1}, got {class_label}")
        label = class_label if class_label is not None else (UNLABELED_LABEL if classes else None)
        method = methods.get(stored.train.method) if stored else None
        return cls(
            pipeline.unet,
            pipeline.scheduler.config,
            sampler=sampler,
            steps=steps,
            class_label=label,
            guard=method.guard(path) if method else None,
            caution=method.sampler_caution(stored.model.prediction_type, sampler) if method else None,
        )

    def generate(self, count: int, seed: int, stream: int = 0, show_progress: bool = False) -> np.ndarray:
        """``count`` unguarded samples of noise stream ``stream`` of ``seed``."""
        from pudm.sampling import generate

        labels = None
        if self.class_label is not None:
            labels = torch.full((count,), self.class_label, dtype=torch.long)
        return generate(
            self.unet,
            self.scheduler_config,
            num=count,
            sampler=self.sampler,
            steps=self.steps,
            seed=seed,
            stream=stream,
            class_labels=labels,
            show_progress=show_progress,
        )

    def draw(self, num: int, seed: int, *, show_progress: bool = False, allow_fewer: bool = False) -> Drawn:
        """``num`` samples as the run gives them: a guarded run's pass its guard (``allow_fewer``:
        return what was kept when the guard rejects almost everything, rather than fail)."""
        if num <= 0:
            raise UsageError(f"--num must be > 0, got {num}")
        how = f"{self.sampler}, {self.steps} steps"
        if self.guard is None:
            return Drawn(self.generate(num, seed, 0, show_progress), how)
        from pudm.filtering import sample_with_rejection

        images, rejection = sample_with_rejection(
            lambda count, round_index: self.generate(count, seed, round_index, show_progress),
            self.guard,
            num,
            allow_fewer=allow_fewer,
        )
        return Drawn(
            images, f"{how}; the rejector dropped {rejection['rejected_share']:.1%} of draws", rejection
        )


def pipeline_folder(path: Path) -> Path:
    """The diffusers pipeline folder of a run folder, or ``path`` itself if it is one."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    if (path / "pipeline" / "model_index.json").is_file():
        return path / "pipeline"
    if runs.holds_run(path):
        raise UsageError(
            f"{path} has no pipeline/ yet (the run did not finish): finish it with "
            f"pudm train --resume --out {path}"
        )
    raise UsageError(f"{path} is neither a pudm run folder nor a diffusers pipeline folder: check the path")
