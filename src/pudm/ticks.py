"""What the loop logs: one metrics line per tick, the average of the tick's applied steps.

A step's figures stay on the device (a row of :data:`TICK_FIELDS`); the host reads them once per
tick. The tick under way is part of every checkpoint, so a run resumed inside a tick writes the
same line as the run that was never stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pudm import methods

# What a step did: updated the weights, was skipped by the fp16 grad scaler (overflow), or was
# skipped by pudm's non-finite guard.
APPLIED, OVERFLOW, SKIPPED = "applied", "overflow", "skipped"

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
_PROGRESS_NAMES = {"positive_risk": "h_S", "bracket": "bracket", "live_sensitive_fraction": "live_S"}


def progress_fields(method: str, means: dict[str, float]) -> dict[str, str]:
    """The progress bar's postfix: the loss, and the tick fields the method says it optimises."""
    shown = {"loss": f"{means['loss']:.3g}"}
    for name in methods.get(method).progress:
        shown[_PROGRESS_NAMES[name]] = f"{means[name]:.3g}"
    return shown


@dataclass
class Tick:
    """What one log tick gathers between two metrics lines, and the run of non-finite steps.

    Its state goes into every checkpoint, so that a run resumed in the middle of a tick writes the
    same metrics line as the run that was never stopped."""

    start: float = field(default_factory=time.perf_counter)
    rows: list = field(default_factory=list)
    steps: int = 0
    skipped: int = 0
    overflow: int = 0
    nonfinite_run: int = 0
    carried: float = 0.0  # seconds of this tick before the checkpoint it was resumed from

    def begin(self) -> None:
        """The loop starts now: the set-up before it (a classifier's fit, a model's load) is not
        counted in the first tick's steps per second."""
        self.start = time.perf_counter() - self.carried

    def record(self, outcome: str, row: torch.Tensor | None) -> None:
        self.steps += 1
        if outcome == APPLIED:
            self.rows.append(row)
        self.overflow += outcome == OVERFLOW
        self.skipped += outcome == SKIPPED
        self.nonfinite_run = self.nonfinite_run + 1 if outcome == SKIPPED else 0

    def next(self) -> Tick:
        """The next tick: nothing gathered yet, the non-finite run carried on."""
        return Tick(nonfinite_run=self.nonfinite_run)

    def state_dict(self) -> dict:
        rows = torch.stack(self.rows).cpu() if self.rows else torch.zeros(0, len(TICK_FIELDS))
        seconds = time.perf_counter() - self.start
        return {"rows": rows, "steps": self.steps, "skipped": self.skipped, "overflow": self.overflow,
                "nonfinite_run": self.nonfinite_run, "seconds": seconds}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict | None, device) -> Tick:
        """The tick a checkpoint stopped in (a fresh one for checkpoints without it)."""
        if not state:
            return cls()
        return cls(
            carried=float(state["seconds"]),
            rows=list(state["rows"].to(device).unbind()),
            steps=int(state["steps"]),
            skipped=int(state["skipped"]),
            overflow=int(state["overflow"]),
            nonfinite_run=int(state["nonfinite_run"]),
        )


def tick_row(out, grad_norm) -> torch.Tensor:
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
