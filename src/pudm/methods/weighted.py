"""``weighted``: train on U with each item weighted by its estimated chance of being normal,
w(x) = clip(1 - beta r(x), 0, 1), r = p_S / p_U from a calibrated S-vs-U classifier (a soft
filter; :func:`pudm.filtering.soft_weights`)."""

from __future__ import annotations

from pathlib import Path

import torch

from pudm import runs
from pudm.methods.base import ClassifierMethod, TrainingItems

WEIGHTS = "weights.json"


class Weighted(ClassifierMethod):
    name = "weighted"
    summary = "sum_U w l / sum_U w, w = 1 - beta r(x) from a calibrated S-vs-U density ratio"
    objective = "weighted"
    folds_over_sensitive = True
    state_name = WEIGHTS
    report_key = "weights"

    def fit(self, config, split, device="cpu") -> dict:
        from pudm.filtering import soft_weights

        train = config.train
        soft = soft_weights(
            split.unlabeled,
            split.sensitive,
            train.beta,
            folds=train.filter_folds,
            fit_config=self.fit_config(config),
            device=device,
        )
        # No hidden truth here: how the weights of truly sensitive items compare is eval.json's.
        return {
            "beta": train.beta,
            "folds": train.filter_folds,
            **soft.summary(),
            "weights": soft.weights.tolist(),
            "ratios": soft.ratios.tolist(),
            "scores": soft.scores.tolist(),
        }

    def save_state(self, state: dict, run_dir: Path) -> None:
        runs.atomic_write_json(Path(run_dir) / WEIGHTS, state)

    def load_state(self, run_dir: Path, split) -> torch.Tensor | None:
        """The weight of every U item, in U's order, or None."""
        path = Path(run_dir) / WEIGHTS
        if not path.is_file():
            return None
        weights = torch.tensor(runs.read_json(path).get("weights", []), dtype=torch.float32)
        if len(weights) != split.num_unlabeled:
            raise runs.RunError(
                f"{path} does not belong to this run's data: delete it to recompute the weights"
            )
        return weights

    def training_items(self, split, state: torch.Tensor) -> TrainingItems:
        if state is None:
            raise ValueError("method weighted needs the weights of its S-vs-U classifier")
        return TrainingItems(torch.arange(split.num_unlabeled), state)

    def objective_inputs(self, train, weights: torch.Tensor | None, timesteps: torch.Tensor) -> dict:
        return {"weights": weights}

    def truth_report(self, run_dir: Path, split) -> dict | None:
        from pudm.filtering import weights_report

        path = Path(run_dir) / WEIGHTS
        if not path.is_file():
            return None
        stored = runs.read_json(path)
        weights = self.load_state(run_dir, split)
        keys = ("mean_weight", "zero_weight_share", "mean_clipped_ratio", "fitted_mean_ratio", "calibration")
        return {**{k: stored.get(k) for k in keys}, **weights_report(weights, split.unlabeled_is_sensitive)}
