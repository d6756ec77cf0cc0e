"""``reject``: train as ``unsupervised`` on all of U; at sampling time, drop the samples that the
filter's cross-fitted S-vs-U classifiers call sensitive (:class:`pudm.filtering.Rejector`)."""

from __future__ import annotations

from pathlib import Path

from pudm.methods.base import ClassifierMethod

REJECTOR = "rejector"


class Reject(ClassifierMethod):
    name = "reject"
    summary = "unsupervised, then drop the samples an S-vs-U classifier flags (a sampling-time guard)"
    objective = "unsupervised"
    state_name = REJECTOR
    trains_like = "unsupervised"
    card_note = (
        "**This folder holds the unsupervised model alone.** A `reject` run's figures come from pudm's "
        "sampler, which drops the samples its S-vs-U classifier (the run's `rejector/` folder) calls "
        "sensitive; a pipeline loaded from this folder does not reject anything."
    )

    def fit(self, config, split, device="cpu"):
        from pudm.filtering import Rejector

        train = config.train
        return Rejector.fit(
            split.unlabeled,
            split.sensitive,
            train.beta,
            folds=train.filter_folds,
            fit_config=self.fit_config(config),
            device=device,
        )

    def save_state(self, state, run_dir: Path) -> None:
        state.save(Path(run_dir) / REJECTOR)

    def load_state(self, run_dir: Path, split):
        return self.guard(run_dir)

    def guard(self, run_dir: Path):
        from pudm.filtering import Rejector

        path = Path(run_dir) / REJECTOR
        return Rejector.load(path) if (path / "config.json").is_file() else None
