"""``pu``: the paper's PU objective, beta mean_S h(l) + |mean_U l - beta mean_S l| (absPU; nnPU
with ``--correction nn``)."""

from __future__ import annotations

from pudm.methods.base import Method

# Samplers that follow the denoiser deterministically to t = 0 (no fresh noise per step).
DETERMINISTIC_SAMPLERS = ("ddim", "dpm")


class PU(Method):
    name = "pu"
    summary = "beta mean_S h(l) + |mean_U l - beta mean_S l|: the paper's objective (absPU; nnPU)"
    objective = "pu"
    uses_beta = True
    on_latents = True
    progress = ("bracket", "positive_risk")

    def sampler_caution(self, prediction_type: str, sampler: str) -> str | None:
        """With the paper's epsilon loss, ``pu`` ascends the loss of S without bound and its
        denoiser is wrong at low noise, where a deterministic solver relies on it: on digit
        folders a pu model's DDIM 50 samples were noisy (pixel Frechet distance 4x an
        unsupervised model's, and in another case more sensitive samples than no suppression),
        while DDPM 1000 and DPM-Solver++ SDE sampled it well, and the v loss held with every
        sampler (README, "Defaults across samplers"). pudm never makes such a sampler that
        model's default (:mod:`pudm.settings`)."""
        if prediction_type == "epsilon" and sampler in DETERMINISTIC_SAMPLERS:
            return (
                f"a pu model trained with the epsilon loss can break the deterministic {sampler} sampler "
                "(measured: noisy samples, worse than an unsupervised model's); sample with dpm-sde or "
                "ddpm, or train with --prediction-type v_prediction"
            )
        return None
