"""Estimate beta, the share of sensitive items in U, from U and S alone.

The PU objective needs beta; users rarely know it. U is the mixture ``beta p_S + (1 - beta) p_N``
and S is a sample of ``p_S``, so beta is the *mixture proportion* of ``p_S`` in ``p_U``, which a
classifier of S against U identifies wherever normal data have (almost) no mass.

**Best Bin Estimation** (Garg, Wu, Smola, Balakrishnan, Lipton, "Mixture Proportion Estimation
and PU Learning: A Modern Approach", NeurIPS 2021): score held-out items of U and S with an
S-vs-U classifier; for a threshold c, the share of U above c divided by the share of S above c is
an upper estimate of beta, tight where only sensitive items score above c. BBE picks the c that
minimises an upper confidence bound of that ratio::

    q_U(c) / q_S(c) + (1 + gamma) / q_S(c) * (sqrt(log(4/delta) / 2 n_U) + sqrt(log(4/delta) / 2 n_S))

Here every item is scored by a model that never trained on it (K-fold cross-fitting over both U and
S), so all of U and S are held out once. The interval is a percentile bootstrap over the scored
items. The main estimate uses the same small CNN as the filter baseline; the cross-check runs BBE
on a different classifier, logistic regression on PCA features, and a warning is raised when the
two disagree strongly.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pudm.classifier import FitConfig, predict_proba
from pudm.errors import UsageError
from pudm.filtering import fit_sensitive_classifier

# Fewer labeled sensitive items than this: no estimate (an error naming the fix).
MIN_SENSITIVE = 10
# Fewer than this: an estimate, with a warning that it is unstable.
FEW_SENSITIVE = 50
# An estimate at or above this means U looks like S: PU training cannot use it.
MAX_USABLE = 0.9


@dataclass
class PriorEstimate:
    """beta with a 95% interval, the estimator that produced it, and what to be careful about."""

    beta: float
    low: float
    high: float
    method: str
    num_unlabeled: int
    num_sensitive: int
    cross_check: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def bbe(scores_unlabeled: np.ndarray, scores_sensitive: np.ndarray, delta: float = 0.1, gamma: float = 0.01):
    """Best Bin Estimation of the share of S-like items in U from held-out classifier scores.

    Returns ``(estimate, threshold)``; higher scores mean "more like S".
    """
    u = np.sort(np.asarray(scores_unlabeled, dtype=np.float64))
    s = np.sort(np.asarray(scores_sensitive, dtype=np.float64))
    if len(u) == 0 or len(s) == 0:
        raise UsageError("best bin estimation needs scored items of both U and S")
    thresholds = np.unique(s)  # every candidate bin starts at a score of S, so q_S > 0
    q_u = (len(u) - np.searchsorted(u, thresholds, side="left")) / len(u)
    q_s = (len(s) - np.searchsorted(s, thresholds, side="left")) / len(s)
    slack = math.sqrt(math.log(4 / delta) / (2 * len(u))) + math.sqrt(math.log(4 / delta) / (2 * len(s)))
    bound = q_u / q_s + (1 + gamma) * slack / q_s
    best = int(np.argmin(bound))
    return float(min(1.0, q_u[best] / q_s[best])), float(thresholds[best])


def bbe_interval(
    scores_unlabeled: np.ndarray,
    scores_sensitive: np.ndarray,
    resamples: int = 500,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """BBE with a percentile-bootstrap interval over the scored items: ``(estimate, low, high)``."""
    estimate, _ = bbe(scores_unlabeled, scores_sensitive)
    rng = np.random.default_rng(seed)
    u, s = np.asarray(scores_unlabeled), np.asarray(scores_sensitive)
    draws = [bbe(rng.choice(u, len(u)), rng.choice(s, len(s)))[0] for _ in range(resamples)]
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return estimate, float(min(low, estimate)), float(max(high, estimate))


def _folds(count: int, folds: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(count, generator=generator) % folds


def cnn_scores(
    unlabeled: torch.Tensor,
    sensitive: torch.Tensor,
    folds: int = 5,
    fit_config: FitConfig | None = None,
    arch: str = "cnn",
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold P(S | x) for every item of U and of S, from a CNN trained on the other folds."""
    fit_config = fit_config or FitConfig()
    generator = torch.Generator().manual_seed(fit_config.seed)
    fold_u, fold_s = _folds(len(unlabeled), folds, generator), _folds(len(sensitive), folds, generator)
    scores_u, scores_s = torch.empty(len(unlabeled)), torch.empty(len(sensitive))
    for fold in range(folds):
        train_u, train_s = unlabeled[fold_u != fold], sensitive[fold_s != fold]
        model = fit_sensitive_classifier(train_u, train_s, fit_config, fold, arch)
        scores_u[fold_u == fold] = predict_proba(model, unlabeled[fold_u == fold])[:, 1]
        scores_s[fold_s == fold] = predict_proba(model, sensitive[fold_s == fold])[:, 1]
    return scores_u.numpy(), scores_s.numpy()


def pca_logistic_scores(
    unlabeled: torch.Tensor, sensitive: torch.Tensor, folds: int = 5, seed: int = 0, components: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold P(S | x) from logistic regression on PCA features (scikit-learn), cross-fitted."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    generator = torch.Generator().manual_seed(seed + 1)
    fold_u = _folds(len(unlabeled), folds, generator).numpy()
    fold_s = _folds(len(sensitive), folds, generator).numpy()
    x_u, x_s = unlabeled.flatten(1).double().numpy(), sensitive.flatten(1).double().numpy()
    scores_u, scores_s = np.empty(len(x_u)), np.empty(len(x_s))
    for fold in range(folds):
        x = np.concatenate([x_u[fold_u != fold], x_s[fold_s != fold]])
        y = np.concatenate([np.zeros(int((fold_u != fold).sum())), np.ones(int((fold_s != fold).sum()))])
        model = make_pipeline(
            StandardScaler(),
            PCA(n_components=min(components, x.shape[1], len(x) - 1), random_state=seed),
            LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000),
        )
        model.fit(x, y)
        scores_u[fold_u == fold] = model.predict_proba(x_u[fold_u == fold])[:, 1]
        scores_s[fold_s == fold] = model.predict_proba(x_s[fold_s == fold])[:, 1]
    return scores_u, scores_s


def _digest(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1(item.numpy().tobytes()).hexdigest() for item in images.contiguous()}


def check_inputs(unlabeled: torch.Tensor, sensitive: torch.Tensor) -> list[str]:
    """Refuse inputs that cannot give an estimate; return warnings for ones that give a shaky one."""
    if len(sensitive) < MIN_SENSITIVE:
        raise UsageError(
            f"S holds {len(sensitive)} items; estimating beta needs at least {MIN_SENSITIVE} "
            "(a few hundred for a stable estimate): add labeled sensitive images or pass --beta VALUE"
        )
    if len(unlabeled) < MIN_SENSITIVE:
        raise UsageError(f"U holds {len(unlabeled)} items; estimating beta needs at least {MIN_SENSITIVE}")
    shared = len(_digest(unlabeled) & _digest(sensitive))
    if shared > len(unlabeled) // 2:
        raise UsageError(
            f"U and S are the same data ({shared} of the {len(unlabeled)} items of U are also in S): "
            "give the unlabeled data and the labeled sensitive data separately"
        )
    warnings = []
    if len(sensitive) < FEW_SENSITIVE:
        warnings.append(
            f"S holds only {len(sensitive)} items: the estimate is unstable (its interval shows how "
            f"much); {FEW_SENSITIVE} or more are better"
        )
    if shared:
        warnings.append(f"{shared} items of U are also in S (exact duplicates)")
    return warnings


def estimate_prior(
    unlabeled: torch.Tensor,
    sensitive: torch.Tensor,
    folds: int = 5,
    epochs: int = 20,
    seed: int = 0,
    cross_check: bool = True,
    resamples: int = 500,
) -> PriorEstimate:
    """beta from U and S (images in [-1, 1], NCHW): BBE on cross-fitted CNN scores, with a
    percentile-bootstrap 95% interval and, optionally, BBE on PCA + logistic regression as a check.
    """
    warnings = check_inputs(unlabeled, sensitive)
    if not 2 <= folds <= len(sensitive):
        raise UsageError(f"--folds must be in [2, |S| = {len(sensitive)}], got {folds}")
    scores_u, scores_s = cnn_scores(unlabeled, sensitive, folds, FitConfig(epochs=epochs, seed=seed))
    beta, low, high = bbe_interval(scores_u, scores_s, resamples=resamples, seed=seed)
    result = PriorEstimate(
        beta=beta,
        low=low,
        high=high,
        method=f"bbe (best bin estimation, cnn S-vs-U classifier, {folds}-fold cross-fitted)",
        num_unlabeled=len(unlabeled),
        num_sensitive=len(sensitive),
        warnings=warnings,
    )
    if cross_check:
        check_u, check_s = pca_logistic_scores(unlabeled, sensitive, folds, seed)
        other, other_low, other_high = bbe_interval(check_u, check_s, resamples=resamples, seed=seed)
        result.cross_check = {
            "beta": other,
            "low": other_low,
            "high": other_high,
            "method": f"bbe (best bin estimation, pca + logistic regression, {folds}-fold cross-fitted)",
        }
        if abs(other - beta) > 0.05 and not (low <= other <= high):
            result.warnings.append(
                f"the two estimators disagree: {beta:.3f} (cnn) vs {other:.3f} (pca + logistic "
                "regression); treat beta as uncertain, e.g. compare PU runs at both values"
            )
    if beta >= MAX_USABLE:
        result.warnings.append(
            f"U looks like S (estimated share {beta:.2f}): check that U and S are not the same kind of data"
        )
    return result


def usable_beta(estimate: PriorEstimate) -> float:
    """The estimate as a training beta, refused where it cannot be one."""
    if estimate.beta >= MAX_USABLE:
        raise UsageError(
            f"the estimated share of sensitive items in U is {estimate.beta:.2f}: U looks like S, so PU "
            "training cannot separate them; check the data, or pass --beta VALUE"
        )
    return estimate.beta


def estimate_for_config(config, split=None, cross_check: bool = True) -> PriorEstimate:
    """The estimate of beta for a run's data (seeded by its split seed: one estimate per data)."""
    if split is None:
        from pudm.datasets import split_from_config

        split = split_from_config(config)
    return estimate_prior(
        split.unlabeled,
        split.sensitive,
        folds=5,
        epochs=config.train.filter_epochs,
        seed=config.data.split_seed,
        cross_check=cross_check,
    )


def apply_estimate(config, estimate: PriorEstimate) -> None:
    """``--beta auto``: train with the estimate, and keep the whole estimate in the run's config."""
    config.train.beta = usable_beta(estimate)
    config.train.beta_estimate = estimate.to_dict()


def describe(estimate: PriorEstimate) -> str:
    line = (
        f"beta {estimate.beta:.3f} (95% interval {estimate.low:.3f}-{estimate.high:.3f}; {estimate.method})"
    )
    if estimate.cross_check:
        check = estimate.cross_check
        line += f"; cross-check {check['beta']:.3f} ({check['low']:.3f}-{check['high']:.3f})"
    return line
