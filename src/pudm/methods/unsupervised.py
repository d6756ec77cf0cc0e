"""``unsupervised``: ordinary diffusion training on U; S is ignored (the baseline)."""

from __future__ import annotations

from pudm.methods.base import Method


class Unsupervised(Method):
    name = "unsupervised"
    summary = "mean_U l: ordinary diffusion training on U; S is ignored"
    objective = "unsupervised"
    on_latents = True
