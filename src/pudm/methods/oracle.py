"""``oracle``: unsupervised training on the hidden-normal part of U, a reference point that only
labeled benchmarks can have. The one method that reads the hidden truth."""

from __future__ import annotations

import torch

from pudm.errors import UsageError
from pudm.methods.base import Method, TrainingItems


class Oracle(Method):
    name = "oracle"
    summary = "mean l over the hidden-normal part of U (a reference; needs labels)"
    objective = "unsupervised"
    reads_hidden_truth = True

    def check_data(self, split, folds: int | None = None) -> None:
        if split.unlabeled_is_sensitive is None:
            raise UsageError(
                "method oracle needs the hidden labels of U, and this data has none: "
                "use unsupervised, supervised or pu"
            )

    def training_items(self, split, state) -> TrainingItems:
        self.check_data(split)
        return TrainingItems(torch.nonzero(~split.unlabeled_is_sensitive).flatten())
