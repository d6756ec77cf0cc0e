"""The ``filter`` baseline: drop the part of U that looks most like S, then train without S.

It is the method most users would try first. A classifier learns S (label 1) against U (label 0);
every item of U is scored by a model that did not see it (K-fold cross-fitting, so the scores are
not memorised labels), and the ``beta`` share of U with the highest sensitive score is removed.
Plain (unsupervised) diffusion training then runs on the rest.
"""

from __future__ import annotations

import torch

from pudm.classifier import FitConfig, build_classifier, fit, predict_proba
from pudm.errors import UsageError


def sensitive_scores(
    unlabeled: torch.Tensor,
    sensitive: torch.Tensor,
    folds: int = 5,
    fit_config: FitConfig | None = None,
    arch: str = "cnn",
) -> torch.Tensor:
    """Out-of-fold P(sensitive | x) for every item of ``unlabeled`` (images in [-1, 1], NCHW)."""
    if len(sensitive) == 0:
        raise UsageError("the filter baseline needs labeled sensitive images (S is empty): add S")
    if not 2 <= folds <= len(unlabeled):
        raise UsageError(f"--filter-folds must be in [2, |U| = {len(unlabeled)}], got {folds}")
    fit_config = fit_config or FitConfig()
    generator = torch.Generator().manual_seed(fit_config.seed)
    fold_of = torch.randperm(len(unlabeled), generator=generator) % folds
    scores = torch.empty(len(unlabeled))
    for fold in range(folds):
        held = fold_of == fold
        model = fit_sensitive_classifier(unlabeled[~held], sensitive, fit_config, fold, arch)
        scores[held] = predict_proba(model, unlabeled[held])[:, 1]
    return scores


def fit_sensitive_classifier(
    unlabeled: torch.Tensor, sensitive: torch.Tensor, fit_config: FitConfig, fold: int, arch: str = "cnn"
) -> torch.nn.Module:
    """A classifier of S (label 1) against U (label 0) with balanced class weights (S is usually
    much smaller than U), initialised and trained with a seed of its own per fold."""
    images = torch.cat([unlabeled, sensitive])
    labels = torch.cat(
        [torch.zeros(len(unlabeled), dtype=torch.long), torch.ones(len(sensitive), dtype=torch.long)]
    )
    counts = torch.bincount(labels, minlength=2).float()
    fold_config = FitConfig(**{**vars(fit_config), "seed": fit_config.seed * 100 + fold})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fold_config.seed)
        model = build_classifier(arch, unlabeled.shape[1], 2, unlabeled.shape[-1])
    fit(model, images, labels, fold_config, class_weights=counts.sum() / (2.0 * counts))
    return model


def keep_mask(scores: torch.Tensor, beta: float) -> torch.Tensor:
    """True for the items of U that stay: all but the round(beta |U|) highest scores."""
    drop = round(beta * len(scores))
    keep = torch.ones(len(scores), dtype=torch.bool)
    if drop:
        keep[torch.argsort(scores, descending=True, stable=True)[:drop]] = False
    return keep


def filter_report(keep: torch.Tensor, unlabeled_is_sensitive: torch.Tensor | None) -> dict:
    """How many items were dropped and, where the hidden truth exists, how many were sensitive."""
    report = {"num_unlabeled": len(keep), "num_kept": int(keep.sum()), "num_dropped": int((~keep).sum())}
    if unlabeled_is_sensitive is not None:
        dropped = ~keep
        caught = int((dropped & unlabeled_is_sensitive).sum())
        report["dropped_truly_sensitive"] = caught
        report["precision"] = caught / max(1, int(dropped.sum()))
        report["recall"] = caught / max(1, int(unlabeled_is_sensitive.sum()))
        report["kept_sensitive"] = int((keep & unlabeled_is_sensitive).sum())
    return report
