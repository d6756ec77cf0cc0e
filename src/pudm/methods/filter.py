"""``filter``: drop the beta share of U that a cross-fitted S-vs-U classifier finds most
sensitive-looking, then train as ``unsupervised`` on the rest (the baseline a user tries first)."""

from __future__ import annotations

from pathlib import Path

import torch

from pudm import runs
from pudm.methods.base import ClassifierMethod, TrainingItems

FILTER = "filter.json"


class Filter(ClassifierMethod):
    name = "filter"
    summary = "mean l over U minus the beta share an S-vs-U classifier flags (the obvious baseline)"
    objective = "unsupervised"
    state_name = FILTER
    report_key = "filter"

    def fit(self, config, split, device="cpu") -> dict:
        from pudm.filtering import filter_report, keep_mask, sensitive_scores

        train = config.train
        scores = sensitive_scores(
            split.unlabeled, split.sensitive, train.filter_folds, self.fit_config(config), device=device
        )
        keep = keep_mask(scores, train.beta)
        # Counts only: how many of the dropped items were truly sensitive is the evaluator's to say
        # (eval.json), since training never reads the hidden truth.
        return {
            **filter_report(keep, None),
            "beta": train.beta,
            "folds": train.filter_folds,
            "kept_indices": torch.nonzero(keep).flatten().tolist(),
            "scores": scores.tolist(),
        }

    def save_state(self, state: dict, run_dir: Path) -> None:
        runs.atomic_write_json(Path(run_dir) / FILTER, state)

    def load_state(self, run_dir: Path, split) -> torch.Tensor | None:
        """The keep mask over U, or None; a file of other data is an error naming the fix."""
        path = Path(run_dir) / FILTER
        if not path.is_file():
            return None
        stored = runs.read_json(path)
        kept = torch.tensor(stored.get("kept_indices", []), dtype=torch.long)
        if stored.get("num_unlabeled") != split.num_unlabeled or not (
            len(kept) and 0 <= int(kept.min()) and int(kept.max()) < split.num_unlabeled
        ):
            raise runs.RunError(
                f"{path} does not belong to this run's data: delete it to recompute the filter"
            )
        keep = torch.zeros(split.num_unlabeled, dtype=torch.bool)
        keep[kept] = True
        return keep

    def training_items(self, split, state: torch.Tensor) -> TrainingItems:
        if state is None:
            raise ValueError("method filter needs the keep mask of its S-vs-U classifier")
        return TrainingItems(torch.nonzero(state).flatten())

    def truth_report(self, run_dir: Path, split) -> dict | None:
        from pudm.filtering import filter_report

        if not (Path(run_dir) / FILTER).is_file():
            return None
        return filter_report(self.load_state(run_dir, split), split.unlabeled_is_sensitive)
