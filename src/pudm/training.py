"""The training loop: PU diffusion training on accelerate.

One loop for every method. A step draws a mixed U/S batch (indices into one tensor on the device),
computes the per-sample denoising error and lets :func:`pudm.objectives.objective` reduce it.
Logging, checkpoints and the sample grid happen per tick, outside the step.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from tqdm.auto import tqdm

from pudm import runs
from pudm.cards import write_card
from pudm.config import S_OBJECTIVE_METHODS, RunConfig
from pudm.data import PUBatches, PUSplit, build_pu_split
from pudm.datasets import load_source
from pudm.errors import UsageError
from pudm.models import build_noise_scheduler, build_unet, load_pretrained, save_pipeline
from pudm.objectives import CrossProcessSum, KnownSums, SumRecorder, objective
from pudm.sampling import generate, save_grid

FILTER = "filter.json"
WEIGHTS = "weights.json"


def launched_on_cpus() -> bool:
    """True for a multi-process launch (``accelerate launch``, torchrun) on a machine without GPUs.

    accelerate makes such a launch data-parallel over gloo only when asked for the CPU; otherwise
    every process would silently train alone on its own copy.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def process_state() -> PartialState:
    """accelerate's process state (rank, world size), set up for CPU-only launches too."""
    return PartialState(cpu=launched_on_cpus())


TRACKERS = ("tensorboard", "wandb")
LOGS = "logs"  # RUN/logs/: what the trackers write (TensorBoard: RUN/logs/pudm, wandb: RUN/logs/wandb)


def check_trackers(report_to: str) -> list[str]:
    """``--report-to``: none, tensorboard, wandb or all; a tracker that is not installed is a
    one-line error naming the extra that brings it."""
    import importlib.util

    if report_to not in ("none", "all", *TRACKERS):
        raise UsageError(f"--report-to must be none, tensorboard, wandb or all, got {report_to!r}")
    wanted = [] if report_to == "none" else list(TRACKERS) if report_to == "all" else [report_to]
    for name in wanted:
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"--report-to {name}: {name} is not installed: pip install 'pudm[{name}]'")
    return wanted


def tracker_config(config) -> dict:
    """The run's config flattened for a tracker's hyperparameters (scalars and strings only)."""
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items() if isinstance(values, dict) else [("", values)]:
            name = f"{section}.{key}" if key else section
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def make_accelerator(
    mixed_precision: str, trackers: list[str] | None = None, run_dir: Path | None = None
) -> Accelerator:
    """An Accelerator with this run's autocast dtype (and its trackers, logging into RUN/logs).

    accelerate keeps one process-wide state and refuses a second precision; a process that trains
    several runs (a benchmark, a notebook) gets each run's own. The process group is kept.
    """
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=launched_on_cpus(),
        log_with=trackers or None,
        project_dir=run_dir / LOGS if trackers else None,
    )


def per_sample_denoising_loss(
    unet: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    conditioning: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """l(x) = ||eps_theta(x_t, t [, condition]) - eps||^2 summed over all dimensions, one value per sample.

    ``clean`` is an image or a latent; ``conditioning`` holds the UNet's extra inputs (the text
    embeddings of a Stable Diffusion UNet: ``{"encoder_hidden_states": ...}``), the only difference
    between the unconditional and the text-conditioned objective.
    For a v-prediction schedule the target is v = sqrt(abar_t) eps - sqrt(1 - abar_t) x instead.
    Returned in float32 whatever the autocast dtype, so the objective is reduced in full precision.
    """
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    prediction = unet(noisy, timesteps, **(conditioning or {})).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(clean, noise, timesteps)
    else:
        target = noise
    return (prediction.float() - target.float()).pow(2).flatten(1).sum(1)


def split_from_config(config: RunConfig, report=None) -> PUSplit:
    """The PU split that ``config.data`` describes (deterministic in ``split_seed``)."""
    data = config.data
    if data.source == "folders":
        return folder_split(config, report)
    source = load_source(data.source, data.image_size, data.channels, data.data_dir, data.download)
    return build_pu_split(
        source,
        data.normal_classes,
        data.num_unlabeled_normal,
        data.num_unlabeled_sensitive,
        data.num_sensitive,
        data.num_test,
        data.split_seed,
    )


def folder_split(config: RunConfig, report=None) -> PUSplit:
    """U, S and the optional normal test images from the user's folders (no hidden labels).

    ``report(message)`` hears how many unreadable files were skipped.
    """
    from pudm.imagefolder import load_folder

    data = config.data
    parts = {}
    for name, folder in (
        ("unlabeled", data.unlabeled_dir),
        ("sensitive", data.sensitive_dir),
        ("test", data.test_dir),
    ):
        if folder is None:
            continue
        loaded = load_folder(Path(folder), data.image_size, data.channels, data.strict, f"--{name}")
        if loaded.skipped and report is not None:
            first, reason = loaded.skipped[0]
            report(
                f"--{name}: skipped {len(loaded.skipped)} unreadable image file(s), e.g. {first} ({reason}); "
                "--strict makes this an error"
            )
        parts[name] = loaded.as_float()
    empty = torch.zeros((0, data.channels, data.image_size, data.image_size))
    return PUSplit(unlabeled=parts["unlabeled"], sensitive=parts["sensitive"], test=parts.get("test", empty))


def check_method_fits_data(method: str, split: PUSplit, folds: int | None = None) -> None:
    """``oracle`` needs the hidden truth of U, which only labeled sources have; the methods with a
    cross-fitted S-vs-U classifier need S and enough items for ``folds`` folds. Checked before
    anything is written."""
    if method == "oracle" and split.unlabeled_is_sensitive is None:
        raise UsageError(
            "method oracle needs the hidden labels of U, and this data has none: "
            "use unsupervised, supervised or pu"
        )
    if method in ("filter", "weighted", "reject") and folds is not None:
        if len(split.sensitive) == 0:
            raise UsageError(f"method {method} needs labeled sensitive images (S is empty): add S")
        # weighted folds S too; filter and reject fold U only
        largest = (
            min(len(split.unlabeled), len(split.sensitive)) if method == "weighted" else len(split.unlabeled)
        )
        if not 2 <= folds <= largest:
            raise UsageError(f"--filter-folds must be in [2, {largest}] for method {method}, got {folds}")


def _method_items(
    split: PUSplit, method: str, keep: torch.Tensor | None, of_unlabeled, of_sensitive
) -> tuple[object, object | None]:
    """What ``method`` trains on, of U and of S (None: S is not drawn), for any per-item attribute."""
    if method == "oracle":
        of_unlabeled = of_unlabeled[~split.unlabeled_is_sensitive]
    if method == "filter":
        if keep is None:
            raise ValueError("method filter needs the keep mask of its S-vs-U classifier")
        of_unlabeled = of_unlabeled[keep]
    if method not in S_OBJECTIVE_METHODS:
        return of_unlabeled, None
    return of_unlabeled, of_sensitive


def training_pool(
    split: PUSplit, method: str, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The tensor that batches index into, its is-sensitive mask, and the |U|, |S| it holds.

    Methods whose objective ignores S (unsupervised, oracle, filter, weighted, reject) draw from U
    alone, so their batches are all training signal. ``oracle`` keeps only the hidden-normal part
    of U, ``filter`` the part its S-vs-U classifier kept (``keep``).
    """
    check_method_fits_data(method, split)
    unlabeled, sensitive = _method_items(split, method, keep, split.unlabeled, split.sensitive)
    if sensitive is None:
        return unlabeled, torch.zeros(len(unlabeled), dtype=torch.bool), len(unlabeled), 0
    pool = torch.cat([unlabeled, sensitive])
    is_sensitive = torch.cat(
        [torch.zeros(len(unlabeled), dtype=torch.bool), torch.ones(len(sensitive), dtype=torch.bool)]
    )
    return pool, is_sensitive, len(unlabeled), len(sensitive)


# A class-conditional UNet is conditioned on what a user knows of each item: the set it came from
# (the twin of the paper's Stable Diffusion captions, where all of U reads "a photo of a middle aged
# man" and S "a photo of Brad Pitt"). Which items of U are sensitive is never known in the PU
# setting, so no class may reveal it.
UNLABELED_LABEL, SENSITIVE_LABEL = 0, 1
SET_CLASSES = 2


def grid_labels(config: RunConfig, num: int) -> torch.Tensor | None:
    """The end-of-run grid of a class-conditional model: U's label, what a user samples; None
    for an unconditional model."""
    if not config.model.num_classes:
        return None
    return torch.full((num,), UNLABELED_LABEL, dtype=torch.long)


def filter_keep(config: RunConfig, split: PUSplit, run_dir: Path, write: bool = True) -> torch.Tensor:
    """The ``filter`` method's keep mask over U: read from ``RUN/filter.json`` when a resumed run
    has it (so a resume trains on exactly the same items), computed and written otherwise."""
    from pudm.classifier import FitConfig
    from pudm.filtering import filter_report, keep_mask, sensitive_scores

    path = Path(run_dir) / FILTER
    if path.is_file():
        stored = runs.read_json(path)
        kept = torch.tensor(stored.get("kept_indices", []), dtype=torch.long)
        if stored.get("num_unlabeled") != len(split.unlabeled) or not (
            len(kept) and 0 <= int(kept.min()) and int(kept.max()) < len(split.unlabeled)
        ):
            raise runs.RunError(
                f"{path} does not belong to this run's data: delete it to recompute the filter"
            )
        keep = torch.zeros(len(split.unlabeled), dtype=torch.bool)
        keep[kept] = True
        return keep
    train = config.train
    scores = sensitive_scores(
        split.unlabeled,
        split.sensitive,
        folds=train.filter_folds,
        fit_config=FitConfig(epochs=train.filter_epochs, seed=train.seed),
    )
    keep = keep_mask(scores, train.beta)
    if write:
        # Counts only: how many of the dropped items were truly sensitive is the evaluator's to
        # say (eval.json), since training never reads the hidden truth.
        report = filter_report(keep, None)
        runs.atomic_write_json(
            path,
            {
                **report,
                "beta": train.beta,
                "folds": train.filter_folds,
                "kept_indices": torch.nonzero(keep).flatten().tolist(),
                "scores": scores.tolist(),
            },
        )
    return keep


def weighted_weights(config: RunConfig, split: PUSplit, run_dir: Path, write: bool = True) -> torch.Tensor:
    """The ``weighted`` method's weight of every U item: read from ``RUN/weights.json`` when a
    resumed run has it, computed (:func:`pudm.filtering.soft_weights`) and written otherwise."""
    from pudm.classifier import FitConfig
    from pudm.filtering import soft_weights

    path = Path(run_dir) / WEIGHTS
    if path.is_file():
        stored = runs.read_json(path)
        weights = torch.tensor(stored.get("weights", []), dtype=torch.float32)
        if len(weights) != len(split.unlabeled):
            raise runs.RunError(
                f"{path} does not belong to this run's data: delete it to recompute the weights"
            )
        return weights
    train = config.train
    soft = soft_weights(
        split.unlabeled,
        split.sensitive,
        train.beta,
        folds=train.filter_folds,
        fit_config=FitConfig(epochs=train.filter_epochs, seed=train.seed),
    )
    if write:
        # No hidden truth here: how the weights of truly sensitive items compare is eval.json's.
        runs.atomic_write_json(
            path,
            {
                "beta": train.beta,
                "folds": train.filter_folds,
                **soft.summary(),
                "weights": soft.weights.tolist(),
                "ratios": soft.ratios.tolist(),
                "scores": soft.scores.tolist(),
            },
        )
    return soft.weights


def run_rejector(config: RunConfig, split: PUSplit, run_dir: Path, write: bool = True):
    """The ``reject`` method's :class:`pudm.filtering.Rejector`: loaded from ``RUN/rejector`` when
    a resumed run has it, fitted (the filter's cross-fitted classifiers) and saved otherwise."""
    from pudm.classifier import FitConfig
    from pudm.filtering import REJECTOR, Rejector

    path = Path(run_dir) / REJECTOR
    if (path / "config.json").is_file():
        return Rejector.load(path)
    train = config.train
    rejector = Rejector.fit(
        split.unlabeled,
        split.sensitive,
        train.beta,
        folds=train.filter_folds,
        fit_config=FitConfig(epochs=train.filter_epochs, seed=train.seed),
    )
    if write:
        rejector.save(path)
    return rejector


def load_rejector(run_dir: Path):
    """A ``reject`` run's rejector, None for every other run (or a bare pipeline folder)."""
    from pudm.filtering import REJECTOR, Rejector

    path = Path(run_dir) / REJECTOR
    return Rejector.load(path) if (path / "config.json").is_file() else None


def build_optimizer(parameters, train):
    """AdamW and its learning-rate schedule (linear warm-up, then cosine or constant): the one
    optimiser set-up of every trainer."""
    optimizer = torch.optim.AdamW(parameters, lr=train.learning_rate, weight_decay=train.weight_decay)
    if train.lr_schedule == "cosine":
        return optimizer, get_cosine_schedule_with_warmup(optimizer, train.warmup_steps, train.steps)
    return optimizer, get_constant_schedule_with_warmup(optimizer, train.warmup_steps)


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """The EMA of ``model``: a frozen copy in which only the trainable parameters are copied; the
    frozen ones (a LoRA model's base) are shared with the model, not held twice."""
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, memo=shared).requires_grad_(False)


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def update_ema(
    ema: torch.nn.Module, model: torch.nn.Module, decay: float, names: list[str] | None = None
) -> None:
    """ema <- decay * ema + (1 - decay) * model, over ``names`` (default: every parameter)."""
    ema_params, model_params = dict(ema.named_parameters()), dict(model.named_parameters())
    names = list(model_params) if names is None else names
    torch._foreach_lerp_(
        [ema_params[n] for n in names], [model_params[n].detach() for n in names], 1.0 - decay
    )


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up of the EMA decay, (1 + step) / (10 + step) capped at ``decay``: early weights fade."""
    return min(decay, (1.0 + step) / (10.0 + step))


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint of the last complete step was saved."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(
            f"interrupted at step {step}; checkpoint saved: continue with pudm train --resume --out {run_dir}"
        )
        self.step = step


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class NonFiniteLoss(RuntimeError):
    """The loss stayed non-finite for too many steps in a row; the last good state was saved."""

    def __init__(self, step: int, count: int, run_dir: Path):
        super().__init__(
            f"stopped at step {step}: the loss was not finite for {count} steps in a row (those updates "
            f"were skipped; the last good weights are in the step {step} checkpoint): lower --lr, or use "
            f"--mixed-precision no, and start again with --overwrite --out {run_dir}"
        )
        self.step = step


# What a step did: updated the weights, was skipped by the fp16 grad scaler (overflow), or was
# skipped by pudm's non-finite guard.
_APPLIED, _OVERFLOW, _SKIPPED = "applied", "overflow", "skipped"


@dataclass
class _StepInputs:
    """What every step of one run draws on (built once per run by :meth:`Trainer._loop`)."""

    fetch: Callable
    method: str
    pool_weights: torch.Tensor | None
    trainable: list
    batches: PUBatches
    reduce: CrossProcessSum | None


@dataclass
class _Tick:
    """What one log tick gathers between two metrics lines."""

    start: float = field(default_factory=time.perf_counter)
    rows: list = field(default_factory=list)
    steps: int = 0
    skipped: int = 0
    overflow: int = 0


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_metrics: dict[str, float]


class PixelTask:
    """What the loop trains for the paper's models: a pixel-space UNet (new or pretrained) on a
    :class:`PUSplit`, its batches, and what is saved at the end (pipeline, grid, summary).

    A task is the part of a run that depends on the model: ``build`` (the model and its noise
    schedule), ``prepare`` (data set-up before the loop), ``batches`` (what a step draws),
    ``finish`` (what is saved) and ``summary``. :class:`Trainer` does everything else;
    :class:`pudm.sd.LatentTask` is the Stable Diffusion task.
    """

    ema = True  # the paper's models always keep an EMA of their weights

    def __init__(self, config: RunConfig, split: PUSplit):
        self.config, self.split = config, split
        self.keep = self.unlabeled_weights = self.rejector = self.pool_weights = None

    def build(self, accelerator: Accelerator):
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

    def prepare(self, accelerator: Accelerator, run_dir: Path) -> None:
        """filter's mask, weighted's weights, reject's rejector: every process computes the same
        seeded result; the main process writes it into the run folder."""
        cfg, split, write = self.config, self.split, accelerator.is_main_process
        if cfg.train.method == "filter":
            self.keep = filter_keep(cfg, split, run_dir, write=write)
        elif cfg.train.method == "weighted":
            self.unlabeled_weights = weighted_weights(cfg, split, run_dir, write=write)
        elif cfg.train.method == "reject":
            self.rejector = run_rejector(cfg, split, run_dir, write=write)

    def batches(self, accelerator: Accelerator):
        """What the loop draws from: ``(fetch, num_unlabeled, num_sensitive, objective method)``.

        ``fetch(index, step)`` turns the step's pool indices into ``(clean, is_sensitive,
        conditioning)`` on the device; ``conditioning`` is None for an unconditional UNet.
        ``self.pool_weights``: ``weighted``'s per-item weights over the pool (None otherwise).
        """
        train, device = self.config.train, accelerator.device
        pool, pool_is_sensitive, num_unlabeled, num_sensitive = training_pool(
            self.split, train.method, self.keep
        )
        pool, pool_is_sensitive = pool.to(device), pool_is_sensitive.to(device)
        if self.unlabeled_weights is not None:
            self.pool_weights = self.unlabeled_weights.to(device)  # the pool is U, in order
        if self.config.model.num_classes:
            # Class-conditional UNet: each item is conditioned on the set it was drawn from (U's
            # label or S's), never on its hidden class.
            labels = torch.where(pool_is_sensitive, SENSITIVE_LABEL, UNLABELED_LABEL).long()

            def fetch(index: torch.Tensor, step: int):
                return pool[index], pool_is_sensitive[index], {"class_labels": labels[index]}

        else:

            def fetch(index: torch.Tensor, step: int):
                return pool[index], pool_is_sensitive[index], None

        method = "unsupervised" if train.method in ("oracle", "filter", "reject") else train.method
        return fetch, num_unlabeled, num_sensitive, method

    def summary(self) -> dict:
        return self.split.summary()

    def finish(self, trainer: Trainer) -> None:
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

        def draw(count: int, seed: int):
            return generate(
                ema,
                training_schedule.config,
                class_labels=grid_labels(cfg, count),
                num=count,
                sampler=cfg.sample.sampler,
                steps=cfg.sample.steps,
                seed=seed,
                show_progress=False,
            )

        images = None
        if self.rejector is not None:  # reject: the grid shows what pudm's sampler returns
            from pudm.filtering import sample_with_rejection

            # A grid is no reason to fail a finished run: show what was kept (or, if nothing was,
            # the unfiltered draws) and say so.
            images, rejection = sample_with_rejection(
                draw, self.rejector, cfg.sample.grid_size, cfg.train.seed, allow_fewer=True
            )
            if len(images) < cfg.sample.grid_size:
                logging.getLogger("pudm").warning(
                    "warning: the rejector kept %d of %d draws for samples.png%s",
                    len(images),
                    rejection["num_drawn"],
                    "; the grid shows unfiltered samples" if not len(images) else "",
                )
                images = images if len(images) else None
        if images is None:
            images = draw(cfg.sample.grid_size, cfg.train.seed)
        save_grid(images, trainer.run_dir / "samples.png")


class Trainer:
    """Trains one run into ``run_dir``: the loop, for any model a task describes.

    ``train()`` builds the task's model, its EMA, AdamW and the learning-rate schedule, optionally
    restores them from the last checkpoint, runs the loop, and lets the task save what it makes.
    SIGINT/SIGTERM stop the loop between two steps with a checkpoint of the last complete step.
    The task (default :class:`PixelTask` over ``split``; :class:`pudm.sd.LatentTask` for Stable
    Diffusion) says what a batch is, what trains and what is saved; the step itself (objective,
    non-finite guard, logging, checkpoints, stops) is here, in :meth:`_step`.
    """

    def __init__(
        self,
        config: RunConfig,
        split: PUSplit | None,
        run_dir: Path,
        accelerator: Accelerator | None = None,
        show_progress: bool = True,
        task=None,
        report_to: str = "none",
    ):
        config.validate()
        self.config = config
        self.task = task or PixelTask(config, split)
        self.run_dir = Path(run_dir)
        self.trackers = check_trackers(report_to)
        self.accelerator = accelerator or make_accelerator(
            config.train.mixed_precision, self.trackers, self.run_dir
        )
        self.show_progress = show_progress
        self.last_metrics: dict[str, float] = {}

    def _build(self) -> None:
        self.unet, self.noise_scheduler = self.task.build(self.accelerator)
        self.trainable = trainable_names(self.unet)
        self.ema = make_ema(self.unet) if self.task.ema else None
        self.optimizer, self.lr_scheduler = build_optimizer(self._trainable_parameters(), self.config.train)

    def _restore(self) -> int:
        """Load the last checkpoint into the freshly built state; return its step (0 if none)."""
        if self.accelerator.is_main_process:
            runs.remove_temporaries(self.run_dir)
        self.accelerator.wait_for_everyone()
        checkpoints = runs.list_checkpoints(self.run_dir)
        if not checkpoints:
            # Killed before its first checkpoint: nothing to lose, start the same run from step 0.
            if self.accelerator.is_main_process:
                runs.truncate_metrics(self.run_dir / "metrics.jsonl", 0)
            return 0
        checkpoint = runs.load_checkpoint(checkpoints[-1])
        if not self._config_matches(checkpoint["config"]):
            raise runs.RunError(
                f"checkpoint {checkpoints[-1]} was written by another configuration: resume with the "
                "run's own settings, or start again with --overwrite"
            )
        state = checkpoint["state"]
        processes = self.accelerator.num_processes
        # Checkpoints written before the process count was recorded cannot be checked.
        if state.get("world_size", processes) != processes:
            raise runs.RunError(
                f"checkpoint {checkpoints[-1]} was written by {state['world_size']} processes and this "
                f"launch has {processes}: every batch and noise draw depends on the process count, so "
                f"resume with {state['world_size']} processes (accelerate launch --num_processes "
                f"{state['world_size']}), or start again with --overwrite"
            )
        self._load_states(checkpoint["model"], checkpoint["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        if self.accelerator.is_main_process:
            runs.truncate_metrics(self.run_dir / "metrics.jsonl", step)
        return step

    def _config_matches(self, stored: dict) -> bool:
        try:
            return type(self.config).normalize(stored) == self.config.to_dict()
        except UsageError:  # another kind of run's config
            return False

    def _named_trainable(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        parameters = dict(model.named_parameters())
        return {name: parameters[name] for name in self.trainable}

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._named_trainable(self.accelerator.unwrap_model(self.unet)).values())

    def _model_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the model: its trainable parameters."""
        return self._named_trainable(self.accelerator.unwrap_model(self.unet))

    def _ema_state(self) -> dict[str, torch.Tensor]:
        return self._named_trainable(self.ema) if self.ema is not None else {}

    def _load_states(self, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]) -> None:
        trainable = self._named_trainable(self.unet)
        shapes = {name: p.shape for name, p in trainable.items()}
        fits = {name: t.shape for name, t in model.items()} == shapes
        if not fits or (self.ema is not None and {name: t.shape for name, t in ema.items()} != shapes):
            raise runs.RunError(
                f"the checkpoints in {self.run_dir} do not fit this model: start again with --overwrite"
            )
        with torch.no_grad():
            for name, parameter in trainable.items():
                parameter.copy_(model[name])
            if self.ema is not None:
                for name, parameter in self._named_trainable(self.ema).items():
                    parameter.copy_(ema[name])

    def _update_ema(self, step: int) -> None:
        if self.ema is not None:
            decay = ema_decay_at(step, self.config.train.ema_decay)
            update_ema(self.ema, self.accelerator.unwrap_model(self.unet), decay, self.trainable)

    def _prepare(self) -> None:
        """Let the task set up its data; hand the model and optimiser to accelerate."""
        self.task.prepare(self.accelerator, self.run_dir)
        self.unet, self.optimizer = self.accelerator.prepare(self.unet, self.optimizer)
        if self.ema is not None:
            self.ema.to(self.accelerator.device)

    def _batches(self):
        return self.task.batches(self.accelerator)

    # ---------------------------------------------------------------------------------------------

    def train(self, resume: bool = False) -> TrainResult:
        """Build, restore (``resume``), run the loop and save; torch's TF32 switches are set from
        the config for the run and put back after it."""
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.config.train.allow_tf32
        try:
            return self._train(resume)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
            for tracker in self.accelerator.trackers if self.trackers else ():
                tracker.finish()  # not accelerator.end_training(): that ends the process group too

    def _start_trackers(self, start_step: int) -> None:
        """Trackers mirror metrics.jsonl (which stays the record resume relies on). A resumed run
        drops what TensorBoard holds past its checkpoint, as metrics.jsonl does."""
        options = {
            "tensorboard": {"purge_step": start_step + 1} if start_step else {},
            "wandb": {"name": self.run_dir.name, "dir": str(self.run_dir / LOGS)},
        }
        if self.accelerator.is_main_process:
            (self.run_dir / LOGS).mkdir(exist_ok=True)
        self.accelerator.init_trackers("pudm", config=tracker_config(self.config), init_kwargs=options)

    def _train(self, resume: bool) -> TrainResult:
        cfg, accelerator = self.config, self.accelerator
        self._build()
        if not resume and accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            runs.atomic_write_json(self.run_dir / runs.CONFIG, cfg.to_dict())
        start_step = self._restore() if resume else 0
        if self.trackers:
            self._start_trackers(start_step)
        self._prepare()
        device = accelerator.device
        # add_noise indexes alphas_cumprod by the timesteps: keep both on the device.
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)

        progress = tqdm(
            total=cfg.train.steps,
            initial=start_step,
            desc=f"{cfg.train.method} train",
            disable=not (self.show_progress and accelerator.is_main_process),
            dynamic_ncols=True,
        )
        self.unet.train()
        with StopRequest() as stop:
            self._loop(start_step, progress, stop)
        progress.close()

        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self._checkpoint(cfg.train.steps)
            self._finish()
        accelerator.wait_for_everyone()
        return TrainResult(self.run_dir, cfg.train.steps, self.last_metrics)

    def _loop(self, start_step: int, progress: tqdm, stop: StopRequest) -> None:
        """The steps, and between them the per-tick bookkeeping: logging, stops, checkpoints."""
        accelerator, train = self.accelerator, self.config.train
        fetch, num_unlabeled, num_sensitive, objective_method = self._batches()
        world_size = accelerator.num_processes
        step_inputs = _StepInputs(
            fetch=fetch,
            method=objective_method,
            pool_weights=self.task.pool_weights,
            trainable=self._trainable_parameters(),
            batches=PUBatches(
                num_unlabeled,
                num_sensitive,
                train.batch_size * train.gradient_accumulation_steps,
                seed=train.seed * 1000,
                sensitive_per_batch=self.config.data.sensitive_per_batch if num_sensitive else None,
            ),
            # Data parallel: the objective's sums and counts are all-reduced: the global batch's.
            reduce=CrossProcessSum() if world_size > 1 else None,
        )
        tick, nonfinite_run = _Tick(), 0
        for step in range(start_step, train.steps):
            outcome, row = self._step(step, step_inputs)
            done = step + 1
            tick.steps += 1
            if outcome == _APPLIED:
                tick.rows.append(row)
            elif outcome == _OVERFLOW:
                tick.overflow += 1
            nonfinite_run = nonfinite_run + 1 if outcome == _SKIPPED else 0
            tick.skipped += outcome == _SKIPPED
            if nonfinite_run >= train.max_nonfinite_steps:
                self._log_tick(done, tick, progress)
                self._checkpoint(done)
                accelerator.wait_for_everyone()
                raise NonFiniteLoss(done, nonfinite_run, self.run_dir)
            if done % train.log_every == 0 or done == train.steps:
                self._log_tick(done, tick, progress)
                tick = _Tick()
            progress.update(1)
            if world_size > 1:
                # Every process must stop after the same step: agree at log ticks (a host sync
                # happens there anyway) rather than pay an all-reduce per step.
                stopping = done % train.log_every == 0 and self._any_process(stop.requested)
            else:
                stopping = stop.requested
            if stopping and done < train.steps:
                # Between two steps the state is consistent: save it, then leave.
                self._checkpoint(done)
                # Nobody leaves before the checkpoint is on disk: a launcher tears the whole group
                # down as soon as one process exits with an error.
                accelerator.wait_for_everyone()
                raise TrainingInterrupted(done, self.run_dir)
            if done % train.checkpoint_every == 0 and done < train.steps:
                self._checkpoint(done)

    def _step(self, step: int, inputs: _StepInputs) -> tuple[str, torch.Tensor | None]:
        """One optimisation step: the step's batch, noise and timesteps, the per-sample loss, the
        objective, and the guarded update. Returns what happened (applied, overflow or skipped)
        and, for an applied step, its TICK_FIELDS row (a device tensor: no host sync)."""
        accelerator, train = self.accelerator, self.config.train
        device, rank, world_size = accelerator.device, accelerator.process_index, accelerator.num_processes
        index = inputs.batches.indices(step, rank, world_size).to(device)
        clean, is_sensitive, conditioning = inputs.fetch(index, step)
        # One generator per step: the noise of step k depends only on (seed, k), so a resumed run
        # draws exactly what an uninterrupted one would. Each process draws the noise and
        # timesteps of the whole global batch and keeps its block, as with the items: N processes
        # with batch B train exactly like one process with batch N*B (and K micro-batches of B
        # like one batch of K*B).
        mine = slice(rank * len(clean), (rank + 1) * len(clean))
        generator = torch.Generator(device=device).manual_seed((train.seed * 1_000_003 + step) * 64)
        noise = torch.randn((world_size * len(clean), *clean.shape[1:]), generator=generator, device=device)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (world_size * len(clean),),
            generator=generator,
            device=device,
        )
        noise, timesteps = noise[mine], timesteps[mine]
        out = self._objective(step, inputs, index, clean, is_sensitive, conditioning, noise, timesteps)
        accelerator.backward(out.loss)
        grad_norm = accelerator.clip_grad_norm_(inputs.trainable, train.max_grad_norm)
        scaler = accelerator.scaler  # fp16 on GPUs: torch's GradScaler; None otherwise
        # A non-finite loss (or, without an fp16 grad scaler, which handles its own overflow, a
        # non-finite gradient) must never reach the weights: skip the update. The check is one
        # host sync per step. Under data parallelism both values are global already.
        finite = torch.isfinite(out.loss.detach())
        if scaler is None:
            finite = finite & torch.isfinite(torch.as_tensor(grad_norm))
        outcome, row = _SKIPPED, None
        if bool(finite):
            self.optimizer.step()
            if scaler is not None and self.optimizer.step_was_skipped:
                # fp16 overflow in the gradients: the scaler skipped the update and lowered its
                # scale. Routine while the scale settles; the weights and EMA are untouched and the
                # inf grad norm stays out of the tick's averages.
                outcome = _OVERFLOW
            else:
                self._update_ema(step)
                outcome, row = _APPLIED, _tick_row(out, grad_norm)
        elif scaler is not None:
            # clip_grad_norm_ unscaled the gradients, and only the scaler's update() clears that:
            # without it the next step's unscale_() raises. A non-finite loss is treated as an
            # overflow: the scale backs off.
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return outcome, row

    def _objective(self, step, inputs, index, clean, is_sensitive, conditioning, noise, timesteps):
        """The per-sample loss and the objective of this process's block; with K micro-batches,
        every micro-batch but the last is backpropagated here. Returns the last one's output."""
        accelerator, train = self.accelerator, self.config.train
        method = inputs.method if step >= train.warm_start_steps else "unsupervised"
        pool_weights = inputs.pool_weights

        def micro_objective(part: slice, reduce):
            """The objective of the items ``part`` of this process's block, with ``reduce``."""
            with accelerator.autocast():
                per_sample_loss = per_sample_denoising_loss(
                    self.unet,
                    self.noise_scheduler,
                    clean[part],
                    noise[part],
                    timesteps[part],
                    None if conditioning is None else {k: v[part] for k, v in conditioning.items()},
                )
            return objective(
                method,
                per_sample_loss,
                is_sensitive[part],
                beta=train.beta,
                correction=train.correction,
                reduce=reduce,
                **_objective_inputs(inputs.method, step, train, index[part], timesteps[part], pool_weights),
            )

        parts = [
            slice(j * train.batch_size, (j + 1) * train.batch_size)
            for j in range(train.gradient_accumulation_steps)
        ]
        if len(parts) == 1:
            out = micro_objective(slice(None), inputs.reduce)
        else:
            # Gradient accumulation that keeps the objective exact: |mean_U l - beta mean_S l| and
            # its sign are not sums over micro-batches, so first learn the whole batch's sums
            # (forward only), then backpropagate each micro-batch with them.
            recorder = SumRecorder()
            with torch.no_grad():
                for part in parts:
                    micro_objective(part, recorder)
            total = recorder.total() if inputs.reduce is None else inputs.reduce(recorder.total())
            known = KnownSums(total, accelerator.num_processes)
            for part in parts[:-1]:
                with accelerator.no_sync(self.unet):
                    accelerator.backward(micro_objective(part, known).loss)
            out = micro_objective(parts[-1], known)
        return out

    def _any_process(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def _log_tick(self, step: int, tick: _Tick, progress) -> None:
        rows, steps, seconds = tick.rows, tick.steps, time.perf_counter() - tick.start
        if rows:
            means = dict(zip(TICK_FIELDS, torch.stack(rows).mean(0).tolist(), strict=True))
        else:  # every step of the tick was skipped: no value (null in metrics.jsonl)
            means = dict.fromkeys(TICK_FIELDS, float("nan"))
        train = self.config.train
        images = steps * train.batch_size * train.gradient_accumulation_steps * self.accelerator.num_processes
        self.last_metrics = {
            "step": step,
            "lr": self.lr_scheduler.get_last_lr()[0],
            **means,
            "steps_per_second": steps / seconds,
            "images_per_second": images / seconds,
            "skipped_nonfinite": tick.skipped,
            "skipped_overflow": tick.overflow,
        }
        if self.accelerator.is_main_process:
            runs.append_jsonl(self.run_dir / "metrics.jsonl", self.last_metrics)
        if self.trackers:
            finite = {k: v for k, v in self.last_metrics.items() if k != "step" and math.isfinite(v)}
            self.accelerator.log(finite, step=step)
        progress.set_postfix(progress_fields(self.config.train.method, means), refresh=False)

    def _checkpoint(self, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        runs.save_checkpoint(
            self.run_dir,
            step,
            model_state=self._model_state(),
            ema_state=self._ema_state(),
            trainer_state={
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                # fp16's loss scale: a resumed run continues at the scale it had
                "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
                # batches and noise depend on (step, rank, world size): a resume needs the same
                "world_size": self.accelerator.num_processes,
            },
            config=self.config.to_dict(),
            keep=self.config.train.keep_checkpoints,
        )

    def _log_grid(self) -> None:
        """The end-of-run sample grid, to every tracker."""
        import numpy as np
        from PIL import Image

        grid = np.asarray(Image.open(self.run_dir / "samples.png").convert("RGB"))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": grid[None]}, step=self.config.train.steps, dataformats="NHWC")
            else:
                tracker.log_images({"samples": [grid]}, step=self.config.train.steps)

    def _finish(self) -> None:
        """What the task saves (pipeline, grid), then summary.json, last: its presence marks a
        complete run."""
        self.task.finish(self)
        if self.trackers and (self.run_dir / "samples.png").is_file():
            self._log_grid()
        runs.atomic_write_json(
            self.run_dir / runs.SUMMARY,
            {
                "steps": self.config.train.steps,
                "final_metrics": self.last_metrics,
                "data": self.task.summary(),
            },
        )


def _objective_inputs(method: str, step: int, train, index, timesteps, pool_weights) -> dict:
    """The extra per-item inputs of the objective at ``step``: weighted's weights, pu-bounded's
    high-noise mask; none during a warm start (the unsupervised objective)."""
    if step < train.warm_start_steps:
        return {}
    if method == "weighted":
        return {"weights": pool_weights[index]}
    if method == "pu-bounded":
        return {"high_noise": timesteps >= train.pu_min_timestep}
    return {}


# What each log tick averages; "bracket" is the PU negative-risk estimate mean_U l - beta mean_S l;
# "live_sensitive_fraction" the share of S items whose h(l) is above 1e-6 (h(l) underflows to 0 in
# float32 once l > ~104, and the S term of supervised and the positive risk of pu are then dead).
TICK_FIELDS = (
    "loss",
    "risk",
    "positive_risk",
    "bracket",
    "mean_unlabeled_loss",
    "mean_sensitive_loss",
    "corrected_fraction",
    "sensitive_per_batch",
    "live_sensitive_fraction",
    "grad_norm",
)

# What the progress bar shows beside the loss: what the method optimises.
_PROGRESS_FIELDS = {
    "supervised": ("positive_risk", "live_sensitive_fraction"),
    "pu": ("bracket", "positive_risk"),
}
_PROGRESS_NAMES = {"positive_risk": "h_S", "bracket": "bracket", "live_sensitive_fraction": "live_S"}


def progress_fields(method: str, means: dict[str, float]) -> dict[str, str]:
    """The progress bar's postfix for ``method``: the loss, and for supervised/pu their S terms."""
    shown = {"loss": f"{means['loss']:.3g}"}
    for name in _PROGRESS_FIELDS.get(method, ()):
        shown[_PROGRESS_NAMES[name]] = f"{means[name]:.3g}"
    return shown


def _tick_row(out, grad_norm) -> torch.Tensor:
    """One step's TICK_FIELDS as a device tensor (no host sync)."""
    return torch.stack(
        [
            out.loss.detach(),
            out.risk.detach(),
            out.positive_risk.detach(),
            out.negative_risk.detach(),
            out.mean_unlabeled_loss.detach(),
            out.mean_sensitive_loss.detach(),
            out.corrected.detach().float(),
            out.num_sensitive.detach().float(),
            out.live_sensitive_fraction.detach().float(),
            torch.as_tensor(grad_norm, device=out.loss.device).float(),
        ]
    )
