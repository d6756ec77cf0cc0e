"""``supervised``: every item of U treated as normal, S as sensitive (l on U, h(l) on S)."""

from __future__ import annotations

from pudm.methods.base import Method


class Supervised(Method):
    name = "supervised"
    summary = "l on U items, h(l) on S items, batch mean: treats all of U as normal"
    objective = "supervised"
    on_latents = True
    progress = ("positive_risk", "live_sensitive_fraction")
