"""What a training method is: the contract every module of :mod:`pudm.methods` fills in.

A method says what it needs (S, beta, the hidden truth), checks that the data gives it, fits
what it must before the loop (its *state*: a keep mask, per-item weights, a rejector), says what
the loop trains on (which items of U, with which weights, and whether batches draw S) and with
which objective (a formula of :func:`pudm.objectives.objective`, the one source of the
formulas), what it does at sampling time (a guard), and how the evaluator judges its state
against the hidden truth. The loop, the tasks, the CLI, the API, the benchmark and the evaluator
ask the registry (:mod:`pudm.methods`) and never name a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from pudm.errors import UsageError

# The objectives whose value depends on the S items of a batch; the others draw from U alone.
S_OBJECTIVES = ("supervised", "pu", "pu-bounded")


@dataclass
class TrainingItems:
    """What the loop trains on.

    Attributes:
        unlabeled: indices into U of the items that train, in U's order.
        weights: each of those items' weight in the objective (None: every item weighs 1).
        sensitive: whether the batches draw S too (pooled with U, or ``--sensitive-per-batch``).
    """

    unlabeled: torch.Tensor
    weights: torch.Tensor | None = None
    sensitive: bool = False


class Method:
    """One training method. Subclasses set the class attributes and override what differs.

    Attributes:
        name: what ``--method`` takes.
        summary: one line for ``--help`` and the documentation.
        objective: the formula of :func:`pudm.objectives.objective` the loop reduces with.
        uses_beta: whether beta changes what is trained (``--beta`` matters, ``--betas`` sweeps it).
        reads_hidden_truth: whether it trains on which items of U are sensitive: ``oracle`` only,
            a reference point where labels exist. The contract tests hold every other method to
            weights that do not change when that truth is scrambled.
        on_latents: offered by ``pudm sd`` (Stable Diffusion latents).
        progress: the tick fields the progress bar shows beside the loss.
        state_name: the file or folder of the run that holds its fitted state (None: no state).
        trains_like: a method that trains exactly the same weights (``reject`` trains as
            ``unsupervised``): a benchmark copies that twin's model and fits only the state.
        report_key: where ``eval.json`` keeps its state judged against the hidden truth.
        card_note: what its model card must say beyond the common text.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    objective: ClassVar[str] = "unsupervised"
    uses_beta: ClassVar[bool] = False
    reads_hidden_truth: ClassVar[bool] = False
    on_latents: ClassVar[bool] = False
    progress: ClassVar[tuple[str, ...]] = ()
    state_name: ClassVar[str | None] = None
    trains_like: ClassVar[str | None] = None
    report_key: ClassVar[str | None] = None
    card_note: ClassVar[str | None] = None

    def __repr__(self) -> str:
        return f"<method {self.name}>"

    @property
    def draws_sensitive(self) -> bool:
        """Whether the batches hold S items (the objective uses them)."""
        return self.objective in S_OBJECTIVES

    @property
    def uses_sensitive(self) -> bool:
        """Whether it needs S at all (in its batches, or to fit its state)."""
        return self.draws_sensitive

    @property
    def warm_start(self) -> bool:
        """Whether ``--warm-start-steps`` changes anything: only an objective that uses S."""
        return self.draws_sensitive

    # -- before training -------------------------------------------------------------------------

    def check_data(self, split, folds: int | None = None) -> None:
        """Raise :class:`UsageError` when ``split`` cannot train this method (before anything is
        written). ``folds``: the cross-fitting folds, where the method fits classifiers."""

    def fit(self, config, split, device: torch.device | str = "cpu") -> Any:
        """The fitted state (None: the method fits nothing). Runs on one process only."""
        return None

    def save_state(self, state: Any, run_dir: Path) -> None:
        """Write ``state`` into the run folder, atomically (``state_name``)."""

    def load_state(self, run_dir: Path, split) -> Any:
        """The state a run holds, checked against ``split`` (None when it holds none)."""
        return None

    def prepare(self, config, split, run_dir: Path, accelerator=None) -> Any:
        """The state the loop trains with: fitted and saved by the main process unless the run
        already holds it (a resume), then loaded by every process after a barrier, so that all
        processes train with the same bytes (and a resume with the first run's)."""
        if self.state_name is None:
            return None
        is_main = accelerator is None or accelerator.is_main_process
        device = "cpu" if accelerator is None else accelerator.device
        failure = None
        if is_main:
            try:
                if self.load_state(run_dir, split) is None:
                    self.save_state(self.fit(config, split, device), Path(run_dir))
            except BaseException as error:  # every process must learn of it, not wait at a barrier
                failure = f"{type(error).__name__}: {error}"
                if accelerator is None or accelerator.num_processes == 1:
                    raise
                _tell_everyone(accelerator, failure)
                raise
        if accelerator is not None and accelerator.num_processes > 1:
            failure = _tell_everyone(accelerator, failure)
            if failure is not None:
                raise RuntimeError(f"{self.name}: the main process failed to fit the state: {failure}")
        state = self.load_state(run_dir, split)
        if state is None:
            raise RuntimeError(f"{self.name}: the state written to {run_dir} could not be read back")
        return state

    # -- the loop --------------------------------------------------------------------------------

    def training_items(self, split, state: Any) -> TrainingItems:
        """Every item of U, and S where the objective uses it."""
        return TrainingItems(torch.arange(split.num_unlabeled), None, self.draws_sensitive)

    def objective_inputs(self, train, weights: torch.Tensor | None, timesteps: torch.Tensor) -> dict:
        """The objective's extra per-item inputs for one batch (``weights``: the batch items'
        weights from :meth:`training_items`, None where it gives none)."""
        return {}

    # -- after training --------------------------------------------------------------------------

    def guard(self, run_dir: Path):
        """What filters this run's samples at sampling time (a rejector), None for most methods."""
        return None

    def truth_report(self, run_dir: Path, split) -> dict | None:
        """The run's state judged against the hidden truth of U (the evaluator's, where labels
        exist; None otherwise or for a method without state)."""
        return None

    def sampler_caution(self, prediction_type: str, sampler: str) -> str | None:
        """Why ``sampler`` is unsafe for a model of this method, or None."""
        return None


class ClassifierMethod(Method):
    """A method built on the cross-fitted S-vs-U classifier of :mod:`pudm.filtering`
    (``filter``, ``weighted``, ``reject``): it needs S, beta and enough items for the folds."""

    uses_beta = True
    uses_sensitive = True
    # The folds split U (filter, reject) or U and S both (weighted).
    folds_over_sensitive: ClassVar[bool] = False

    def check_data(self, split, folds: int | None = None) -> None:
        if folds is None:
            return
        if split.num_sensitive == 0:
            raise UsageError(f"method {self.name} needs labeled sensitive images (S is empty): add S")
        largest = (
            min(split.num_unlabeled, split.num_sensitive)
            if self.folds_over_sensitive
            else split.num_unlabeled
        )
        if not 2 <= folds <= largest:
            raise UsageError(f"--filter-folds must be in [2, {largest}] for method {self.name}, got {folds}")

    @staticmethod
    def fit_config(config):
        """The classifier's training settings: ``--filter-epochs`` epochs, the run's seed."""
        from pudm.classifier import FitConfig

        return FitConfig(epochs=config.train.filter_epochs, seed=config.train.seed)


def _tell_everyone(accelerator, failure: str | None) -> str | None:
    """The main process's word (None: its state is written) given to every process: a collective,
    so it also serves as the barrier before the others read the state."""
    from accelerate.utils import broadcast_object_list

    word = [failure]
    broadcast_object_list(word, from_process=0)
    return word[0]
