"""The training loop: PU diffusion training on accelerate.

One loop for every method and every model. A step draws a mixed U/S batch (indices into one
tensor on the device), computes the per-sample denoising error and lets
:func:`pudm.objectives.objective` reduce it with the formula the run's method names. Logging,
checkpoints and stops happen per tick, outside the step; what the model is and what a batch holds
is the task's (:mod:`pudm.tasks`); what the method trains on is the method's (:mod:`pudm.methods`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from tqdm.auto import tqdm

from pudm import methods, runs
from pudm.config import RunConfig
from pudm.data import PUBatches, PUSplit
from pudm.ema import ema_decay_at, make_ema, trainable_names, update_ema
from pudm.errors import UsageError
from pudm.objectives import CrossProcessSum, KnownSums, SumRecorder, objective
from pudm.processes import LOGS, check_trackers, make_accelerator, tracker_config
from pudm.stops import NonFiniteLoss, StopRequest, TrainingInterrupted
from pudm.tasks import Batches, PixelTask
from pudm.ticks import APPLIED, OVERFLOW, SKIPPED, TICK_FIELDS, Tick, progress_fields, tick_row


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


def build_optimizer(parameters, train):
    """AdamW and its learning-rate schedule (linear warm-up, then cosine or constant): the one
    optimiser set-up of every trainer."""
    optimizer = torch.optim.AdamW(parameters, lr=train.learning_rate, weight_decay=train.weight_decay)
    if train.lr_schedule == "cosine":
        return optimizer, get_cosine_schedule_with_warmup(optimizer, train.warmup_steps, train.steps)
    return optimizer, get_constant_schedule_with_warmup(optimizer, train.warmup_steps)


@dataclass
class _Plan:
    """What every step of one run draws on (built once per run by :meth:`Trainer._loop`)."""

    batches: Batches
    indices: PUBatches
    method: methods.Method
    trainable: list
    reduce: CrossProcessSum | None


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_metrics: dict[str, float]


class Trainer:
    """Trains one run into ``run_dir``: the loop, for any model a task describes.

    ``train()`` builds the task's model, its EMA, AdamW and the learning-rate schedule, optionally
    restores them from the last checkpoint, runs the loop, and lets the task save what it makes.
    SIGINT/SIGTERM stop the loop between two steps with a checkpoint of the last complete step.
    The task (default :class:`pudm.tasks.PixelTask` over ``split``; :class:`pudm.sd_task.LatentTask` for
    Stable Diffusion) says what a batch is, what trains and what is saved; the step itself
    (objective, non-finite guard, logging, checkpoints, stops) is here.
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
        self.tick = Tick()

    # -- build, restore, save the state ----------------------------------------------------------

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
        self._check_process_count(state, checkpoints[-1])
        self._load_states(checkpoint["model"], checkpoint["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.tick = Tick.from_state(state.get("tick"), self.accelerator.device)
        step = int(state["step"])
        if self.accelerator.is_main_process:
            runs.truncate_metrics(self.run_dir / "metrics.jsonl", step)
        return step

    def _check_process_count(self, state: dict, checkpoint: Path) -> None:
        processes = self.accelerator.num_processes
        # Checkpoints written before the process count was recorded cannot be checked.
        if state.get("world_size", processes) != processes:
            raise runs.RunError(
                f"checkpoint {checkpoint} was written by {state['world_size']} processes and this "
                f"launch has {processes}: every batch and noise draw depends on the process count, so "
                f"resume with {state['world_size']} processes (accelerate launch --num_processes "
                f"{state['world_size']}), or start again with --overwrite"
            )

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

    def _checkpoint(self, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        unwrapped = self.accelerator.unwrap_model(self.unet)
        runs.save_checkpoint(
            self.run_dir,
            step,
            model_state=self._named_trainable(unwrapped),
            ema_state=self._named_trainable(self.ema) if self.ema is not None else {},
            trainer_state={
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                # fp16's loss scale: a resumed run continues at the scale it had
                "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
                # batches and noise depend on (step, rank, world size): a resume needs the same
                "world_size": self.accelerator.num_processes,
                # the tick under way and the run of non-finite steps, as they stood after `step`
                "tick": self.tick.state_dict(),
            },
            config=self.config.to_dict(),
            keep=self.config.train.keep_checkpoints,
        )

    def _update_ema(self, step: int) -> None:
        if self.ema is not None:
            decay = ema_decay_at(step, self.config.train.ema_decay)
            update_ema(self.ema, self.accelerator.unwrap_model(self.unet), decay, self.trainable)

    # -- the run ---------------------------------------------------------------------------------

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
        # The method's state (fitted by the main process, read by all), then accelerate's wrapping.
        self.task.prepare(accelerator, self.run_dir)
        self.unet, self.optimizer = accelerator.prepare(self.unet, self.optimizer)
        if self.ema is not None:
            self.ema.to(accelerator.device)
        # add_noise indexes alphas_cumprod by the timesteps: keep both on the device.
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(accelerator.device)
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

    def _plan(self) -> _Plan:
        """What every step draws on: the task's batches, the indices of every step's items, the
        method, and the cross-process sum of a data-parallel run."""
        train, world_size = self.config.train, self.accelerator.num_processes
        batches = self.task.batches(self.accelerator)
        indices = PUBatches(
            batches.num_unlabeled,
            batches.num_sensitive,
            train.batch_size * train.gradient_accumulation_steps,
            seed=train.seed * 1000,
            sensitive_per_batch=self.config.data.sensitive_per_batch if batches.num_sensitive else None,
            world_size=world_size,
        )
        # Data parallel: the objective's sums and counts are all-reduced: the global batch's.
        reduce = CrossProcessSum() if world_size > 1 else None
        method = methods.get(train.method)
        return _Plan(batches, indices, method, self._trainable_parameters(), reduce)

    def _loop(self, start_step: int, progress: tqdm, stop: StopRequest) -> None:
        """The steps, and between them the per-tick bookkeeping: logging, stops, checkpoints."""
        plan = self._plan()
        self.tick.begin()
        for step in range(start_step, self.config.train.steps):
            self.tick.record(*self._step(step, plan))
            done = step + 1
            self._stop_if_nonfinite(done, progress)
            self._log_if_due(done, progress)
            progress.update(1)
            self._stop_if_asked(done, stop)
            if done % self.config.train.checkpoint_every == 0 and done < self.config.train.steps:
                self._checkpoint(done)

    def _stop_if_nonfinite(self, done: int, progress: tqdm) -> None:
        """Too many non-finite losses in a row: log, checkpoint the last good state, stop."""
        if self.tick.nonfinite_run >= self.config.train.max_nonfinite_steps:
            count = self.tick.nonfinite_run
            self._log_tick(done, progress)
            self._checkpoint(done)
            self.accelerator.wait_for_everyone()
            raise NonFiniteLoss(done, count, self.run_dir)

    def _log_if_due(self, done: int, progress: tqdm) -> None:
        if done % self.config.train.log_every == 0 or done == self.config.train.steps:
            self._log_tick(done, progress)

    def _stop_if_asked(self, done: int, stop: StopRequest) -> None:
        """SIGINT/SIGTERM: between two steps the state is consistent: save it, then leave."""
        train = self.config.train
        if self.accelerator.num_processes > 1:
            # Every process must stop after the same step: agree at log ticks (a host sync happens
            # there anyway) rather than pay an all-reduce per step.
            stopping = done % train.log_every == 0 and self._any_process(stop.requested)
        else:
            stopping = stop.requested
        if stopping and done < train.steps:
            self._checkpoint(done)
            # Nobody leaves before the checkpoint is on disk: a launcher tears the whole group down
            # as soon as one process exits with an error.
            self.accelerator.wait_for_everyone()
            raise TrainingInterrupted(done, self.run_dir)

    def _step(self, step: int, plan: _Plan) -> tuple[str, torch.Tensor | None]:
        """One optimisation step: the step's batch, noise and timesteps, the per-sample loss, the
        objective, and the guarded update. Returns what happened (applied, overflow or skipped)
        and, for an applied step, its TICK_FIELDS row (a device tensor: no host sync)."""
        accelerator, train = self.accelerator, self.config.train
        device, rank, world_size = accelerator.device, accelerator.process_index, accelerator.num_processes
        index = plan.indices.indices(step, rank).to(device)
        clean, is_sensitive, conditioning = plan.batches.fetch(index, step)
        # One generator per step: the noise of step k depends only on (seed, k), so a resumed run
        # draws exactly what an uninterrupted one would. Each process draws the noise and
        # timesteps of the whole global batch and keeps its block, as with the items: N processes
        # with batch B train exactly like one process with batch N*B (and K micro-batches of B
        # like one batch of K*B).
        mine = slice(rank * len(clean), (rank + 1) * len(clean))
        generator = torch.Generator(device=device).manual_seed((train.seed * 1_000_003 + step) * 64)
        noise = torch.randn((world_size * len(clean), *clean.shape[1:]), generator=generator, device=device)
        horizon = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, horizon, (world_size * len(clean),), generator=generator, device=device)
        weights = None if plan.batches.weights is None else plan.batches.weights[index]
        out = self._objective(
            step, plan, (clean, is_sensitive, conditioning, weights), noise[mine], timesteps[mine]
        )
        accelerator.backward(out.loss)
        grad_norm = accelerator.clip_grad_norm_(plan.trainable, train.max_grad_norm)
        return self._update(step, out, grad_norm)

    def _update(self, step: int, out, grad_norm) -> tuple[str, torch.Tensor | None]:
        """The optimiser step, then the EMA of the weights it produced; neither on a non-finite
        loss or gradient, nor (fp16) on a step the grad scaler skipped."""
        scaler = self.accelerator.scaler  # fp16 on GPUs: torch's GradScaler; None otherwise
        # A non-finite loss (or, without an fp16 grad scaler, which handles its own overflow, a
        # non-finite gradient) must never reach the weights: skip the update. The check is one
        # host sync per step. Under data parallelism both values are global already.
        finite = torch.isfinite(out.loss.detach())
        if scaler is None:
            finite = finite & torch.isfinite(torch.as_tensor(grad_norm))
        outcome, row = SKIPPED, None
        if bool(finite):
            self.optimizer.step()
            if scaler is not None and self.optimizer.step_was_skipped:
                # fp16 overflow in the gradients: the scaler skipped the update and lowered its
                # scale. Routine while the scale settles; the weights and EMA are untouched and the
                # inf grad norm stays out of the tick's averages.
                outcome = OVERFLOW
            else:
                self._update_ema(step)
                outcome, row = APPLIED, tick_row(out, grad_norm)
        elif scaler is not None:
            # clip_grad_norm_ unscaled the gradients, and only the scaler's update() clears that:
            # without it the next step's unscale_() raises. A non-finite loss is treated as an
            # overflow: the scale backs off.
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return outcome, row

    def _objective(self, step: int, plan: _Plan, batch, noise, timesteps):
        """The per-sample loss and the objective of this process's block; with K micro-batches,
        every micro-batch but the last is backpropagated here. Returns the last one's output.
        During a warm start the objective is the unsupervised one, whatever the method."""
        accelerator, train = self.accelerator, self.config.train
        clean, is_sensitive, conditioning, weights = batch
        warm = step < train.warm_start_steps
        formula = "unsupervised" if warm else plan.method.objective

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
            extra = (
                {}
                if warm
                else plan.method.objective_inputs(
                    train, None if weights is None else weights[part], timesteps[part]
                )
            )
            return objective(
                formula,
                per_sample_loss,
                is_sensitive[part],
                beta=train.beta,
                correction=train.correction,
                reduce=reduce,
                **extra,
            )

        parts = [
            slice(j * train.batch_size, (j + 1) * train.batch_size)
            for j in range(train.gradient_accumulation_steps)
        ]
        if len(parts) == 1:
            return micro_objective(slice(None), plan.reduce)
        # Gradient accumulation that keeps the objective exact: |mean_U l - beta mean_S l| and its
        # sign are not sums over micro-batches, so first learn the whole batch's sums (forward
        # only), then backpropagate each micro-batch with them.
        recorder = SumRecorder()
        with torch.no_grad():
            for part in parts:
                micro_objective(part, recorder)
        total = recorder.total() if plan.reduce is None else plan.reduce(recorder.total())
        known = KnownSums(total, accelerator.num_processes)
        for part in parts[:-1]:
            with accelerator.no_sync(self.unet):
                accelerator.backward(micro_objective(part, known).loss)
        return micro_objective(parts[-1], known)

    def _any_process(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    # -- what a run leaves behind ----------------------------------------------------------------

    def _log_tick(self, step: int, progress) -> None:
        tick = self.tick
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
        self.tick = tick.next()
        if self.accelerator.is_main_process:
            runs.append_jsonl(self.run_dir / "metrics.jsonl", self.last_metrics)
        if self.trackers:
            finite = {k: v for k, v in self.last_metrics.items() if k != "step" and math.isfinite(v)}
            self.accelerator.log(finite, step=step)
        progress.set_postfix(progress_fields(train.method, means), refresh=False)

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
