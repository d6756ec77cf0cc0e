"""``pu-bounded``: the PU objective on the items drawn at timesteps t >= t0, unsupervised below
(:func:`pudm.objectives.objective` has the formula)."""

from __future__ import annotations

import torch

from pudm.methods.base import Method


class PUBounded(Method):
    name = "pu-bounded"
    summary = "pu on the items drawn at timesteps t >= t0 (default 300), unsupervised below"
    objective = "pu-bounded"
    uses_beta = True
    on_latents = True
    progress = ("bracket", "positive_risk")

    def objective_inputs(self, train, weights: torch.Tensor | None, timesteps: torch.Tensor) -> dict:
        return {"high_noise": timesteps >= train.pu_min_timestep}
