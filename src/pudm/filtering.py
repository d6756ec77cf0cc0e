"""Methods built on an S-vs-U classifier: ``filter``, ``weighted`` and ``reject``.

``filter`` is the method most users would try first. A classifier learns S (label 1) against U
(label 0); every item of U is scored by a model that did not see it (K-fold cross-fitting, so the
scores are not memorised labels), and the ``beta`` share of U with the highest sensitive score is
removed. Plain (unsupervised) diffusion training then runs on the rest.

``weighted`` keeps every item of U with a weight, the estimated chance that it is normal (a soft
filter: :func:`soft_weights`). ``reject`` trains on all of U and drops, at sampling time, the
samples that the filter's fold classifiers call sensitive (:class:`Rejector`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pudm import runs
from pudm.classifier import FitConfig, build_classifier, fit, predict_proba
from pudm.errors import UsageError


def sensitive_scores(
    unlabeled: torch.Tensor,
    sensitive: torch.Tensor,
    folds: int = 5,
    fit_config: FitConfig | None = None,
    arch: str = "cnn",
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Out-of-fold P(sensitive | x) for every item of ``unlabeled`` (images in [-1, 1], NCHW)."""
    return cross_fit(unlabeled, sensitive, folds, fit_config, arch, device)[0]


def cross_fit(
    unlabeled: torch.Tensor,
    sensitive: torch.Tensor,
    folds: int = 5,
    fit_config: FitConfig | None = None,
    arch: str = "cnn",
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, list[torch.nn.Module]]:
    """:func:`sensitive_scores` and the fold models that made them (model k never saw fold k of U),
    trained on ``device`` and returned on the CPU."""
    if len(sensitive) == 0:
        raise UsageError("the filter baseline needs labeled sensitive images (S is empty): add S")
    if not 2 <= folds <= len(unlabeled):
        raise UsageError(f"--filter-folds must be in [2, |U| = {len(unlabeled)}], got {folds}")
    fit_config = fit_config or FitConfig()
    generator = torch.Generator().manual_seed(fit_config.seed)
    fold_of = torch.randperm(len(unlabeled), generator=generator) % folds
    scores = torch.empty(len(unlabeled))
    models = []
    for fold in range(folds):
        held = fold_of == fold
        model = fit_sensitive_classifier(unlabeled[~held], sensitive, fit_config, fold, arch, device)
        scores[held] = predict_proba(model, unlabeled[held].to(device))[:, 1].cpu()
        models.append(model.cpu())
    return scores, models


def fit_sensitive_classifier(
    unlabeled: torch.Tensor,
    sensitive: torch.Tensor,
    fit_config: FitConfig,
    fold: int,
    arch: str = "cnn",
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """A classifier of S (label 1) against U (label 0) with balanced class weights (S is usually
    much smaller than U), initialised and trained with a seed of its own per fold, on ``device``
    (where it stays)."""
    images = torch.cat([unlabeled, sensitive])
    labels = torch.cat(
        [torch.zeros(len(unlabeled), dtype=torch.long), torch.ones(len(sensitive), dtype=torch.long)]
    )
    counts = torch.bincount(labels, minlength=2).float()
    fold_config = FitConfig(**{**vars(fit_config), "seed": fit_config.seed * 100 + fold})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fold_config.seed)
        model = build_classifier(arch, unlabeled.shape[1], 2, unlabeled.shape[-1])
    model.to(device)
    fit(
        model,
        images.to(device),
        labels.to(device),
        fold_config,
        class_weights=(counts.sum() / (2.0 * counts)).to(device),
    )
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


# -- weighted: a soft filter ---------------------------------------------------------------------


@dataclass(frozen=True)
class SoftWeights:
    """Per-item weights of U for ``weighted`` and what a user can check without the hidden truth.

    Attributes:
        weights: w(x) = clip(1 - beta r(x), 0, 1) for every item of U.
        ratios: r(x) = p_S(x) / p_U(x), the calibrated density ratio (at most 1 / beta).
        scores: the out-of-fold P(S | x) of the balanced S-vs-U classifier, before calibration.
        slope, bias: the calibration g = sigmoid(slope z + bias) / (1 + beta) of the logits z.
        fitted_mean_ratio: mean of min(r, 1 / beta) over U under the calibration as fitted, before
            its bias was set so that the mean is 1: the check. The true ratio has E_U[r] = 1 and
            r <= 1 / beta on U, so a value far from 1 says the classifier's scores were off.
    """

    weights: torch.Tensor
    ratios: torch.Tensor
    scores: torch.Tensor
    slope: float
    bias: float
    fitted_mean_ratio: float
    beta: float

    def summary(self) -> dict:
        return {
            "mean_weight": float(self.weights.mean()),
            "zero_weight_share": float((self.weights == 0).float().mean()),
            "mean_clipped_ratio": float(self.ratios.clamp(max=1.0 / self.beta).mean()),
            "fitted_mean_ratio": self.fitted_mean_ratio,
            "calibration": CALIBRATION,
            "slope": self.slope,
            "bias": self.bias,
        }


# How the weights are calibrated (benchmarks/weighted_calibration.py compares the candidates).
CALIBRATION = "bounded-platt, mean 1"


def soft_weights(
    unlabeled: torch.Tensor,
    sensitive: torch.Tensor,
    beta: float,
    folds: int = 5,
    fit_config: FitConfig | None = None,
    arch: str = "cnn",
    device: torch.device | str = "cpu",
) -> SoftWeights:
    """The weights of ``weighted``: each U item's estimated chance of being normal.

    U = beta p_S + (1 - beta) p_N, so a U item x is sensitive with probability beta r(x),
    r = p_S / p_U. A classifier of S against U trained with balanced class weights (as
    :func:`fit_sensitive_classifier`) estimates g = p_S / (p_S + p_U), so r = g / (1 - g). Every
    item of U *and* S gets g from a model that did not see it (K folds over both sets), and the
    out-of-fold logits are calibrated with what is known of the true ratio:

    - r <= 1 / beta on U (p_U >= beta p_S), so g <= 1 / (1 + beta): the calibration is a sigmoid
      scaled to that ceiling, fitted with the balanced loss (:func:`bounded_platt_scaling`). An
      unbounded sigmoid cannot plateau there: it over-states the ratio of the items it is sure of
      and under-states the bulk, and sensitive items keep weight;
    - E_U[r] = 1: the fitted bias is then moved until the mean ratio over U is 1.

    On digits the two together took the mean weight of U's hidden sensitive items from 0.26-0.35
    (Platt scaling) to 0.12-0.23, at a lower Brier score than filter's hard mask (README,
    "weighted").
    """
    logit_u, logit_s = out_of_fold_logits(unlabeled, sensitive, folds, fit_config, arch, device)
    slope, fitted_bias = bounded_platt_scaling(logit_u, logit_s, beta)
    fitted_mean = float(bounded_ratios(logit_u, slope, fitted_bias, beta).clamp(max=1 / beta).mean())
    bias = unit_mean_bias(logit_u, slope, beta)
    ratios = bounded_ratios(logit_u, slope, bias, beta)
    weights = (1.0 - beta * ratios).clamp(0.0, 1.0)
    return SoftWeights(
        weights=weights,
        ratios=ratios,
        scores=torch.sigmoid(logit_u),
        slope=slope,
        bias=bias,
        fitted_mean_ratio=fitted_mean,
        beta=beta,
    )


def bounded_ratios(logits: torch.Tensor, slope: float, bias: float, beta: float) -> torch.Tensor:
    """r = g / (1 - g) of g = sigmoid(slope z + bias) / (1 + beta): in [0, 1 / beta)."""
    g = torch.sigmoid(logits.double() * slope + bias) / (1.0 + beta)
    return (g / (1.0 - g)).float()


def unit_mean_bias(logits: torch.Tensor, slope: float, beta: float) -> float:
    """The bias at which the mean of :func:`bounded_ratios` over ``logits`` is 1 (bisection: the
    mean grows from 0 to 1 / beta > 1 with the bias)."""
    low, high = -100.0, 100.0
    for _ in range(100):
        middle = (low + high) / 2
        if float(bounded_ratios(logits, slope, middle, beta).mean()) < 1.0:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def out_of_fold_logits(
    unlabeled: torch.Tensor,
    sensitive: torch.Tensor,
    folds: int = 5,
    fit_config: FitConfig | None = None,
    arch: str = "cnn",
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """log P(S | x) - log P(U | x) of every item of U and of S, each from the fold model that did
    not see it (K folds over both sets; balanced class weights, as :func:`fit_sensitive_classifier`)."""
    if len(sensitive) == 0:
        raise UsageError("method weighted needs labeled sensitive images (S is empty): add S")
    smaller = min(len(unlabeled), len(sensitive))
    if not 2 <= folds <= smaller:
        raise UsageError(f"--filter-folds must be in [2, min(|U|, |S|) = {smaller}], got {folds}")
    fit_config = fit_config or FitConfig()
    generator = torch.Generator().manual_seed(fit_config.seed)
    fold_u = torch.randperm(len(unlabeled), generator=generator) % folds
    fold_s = torch.randperm(len(sensitive), generator=generator) % folds
    logit_u, logit_s = torch.empty(len(unlabeled)), torch.empty(len(sensitive))
    for fold in range(folds):
        held_u, held_s = fold_u == fold, fold_s == fold
        model = fit_sensitive_classifier(
            unlabeled[~held_u], sensitive[~held_s], fit_config, fold, arch, device
        )
        logit_u[held_u] = _logit(model, unlabeled[held_u].to(device)).cpu()
        logit_s[held_s] = _logit(model, sensitive[held_s].to(device)).cpu()
    return logit_u, logit_s


def _logit(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """log P(S | x) - log P(U | x) of a two-class classifier."""
    with torch.no_grad():
        model.eval()
        logits = torch.cat([model(images[i : i + 512]) for i in range(0, len(images), 512)])
    return (logits[:, 1] - logits[:, 0]).float()


def platt_scaling(logit_unlabeled: torch.Tensor, logit_sensitive: torch.Tensor) -> tuple[float, float]:
    """(a, b) such that sigmoid(a logit + b) is calibrated on these out-of-fold logits, each set
    weighted to half the total (the balanced prior the classifier was trained with)."""
    return _fit_sigmoid(logit_unlabeled, logit_sensitive, ceiling=1.0)


def bounded_platt_scaling(
    logit_unlabeled: torch.Tensor, logit_sensitive: torch.Tensor, beta: float
) -> tuple[float, float]:
    """(a, b) such that g = sigmoid(a logit + b) / (1 + beta) is calibrated on these out-of-fold
    logits (balanced, as :func:`platt_scaling`).

    U = beta p_S + (1 - beta) p_N gives p_U >= beta p_S, so the balanced posterior
    g = p_S / (p_S + p_U) never exceeds 1 / (1 + beta) and r = g / (1 - g) never exceeds 1 / beta.
    Fitting the sigmoid with that ceiling inside it lets sensitive-looking items reach it; an
    unbounded sigmoid cannot plateau there, and trades an over-stated tail against an
    under-stated bulk."""
    return _fit_sigmoid(logit_unlabeled, logit_sensitive, ceiling=1.0 / (1.0 + beta))


def _fit_sigmoid(
    logit_unlabeled: torch.Tensor, logit_sensitive: torch.Tensor, ceiling: float
) -> tuple[float, float]:
    """(a, b) minimising the balanced cross-entropy of ``ceiling * sigmoid(a z + b)`` (L-BFGS)."""
    logits = torch.cat([logit_unlabeled, logit_sensitive]).double()
    labels = torch.cat([torch.zeros(len(logit_unlabeled)), torch.ones(len(logit_sensitive))]).double()
    weight = torch.where(labels == 1, 0.5 / len(logit_sensitive), 0.5 / len(logit_unlabeled))
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=200, line_search_fn="strong_wolfe")
    log_ceiling = math.log(ceiling)

    def closure():
        optimizer.zero_grad()
        scaled = logits * params[0] + params[1]
        # log g and log(1 - g) of g = ceiling * sigmoid(scaled), computed stably
        log_g = log_ceiling + torch.nn.functional.logsigmoid(scaled)
        log_not_g = torch.log1p(-torch.exp(log_g).clamp(max=1 - 1e-12))
        loss = -(weight * (labels * log_g + (1 - labels) * log_not_g)).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    a, b = (float(v) for v in params.detach())
    if not (math.isfinite(a) and math.isfinite(b)):
        return 1.0, 0.0
    return a, b


def weights_report(weights: torch.Tensor, unlabeled_is_sensitive: torch.Tensor | None) -> dict:
    """Mean weight of U's hidden sensitive and normal items (evaluator only: reads the truth)."""
    if unlabeled_is_sensitive is None:
        return {}
    hidden = unlabeled_is_sensitive.bool()
    return {
        "mean_weight_hidden_sensitive": float(weights[hidden].mean()) if hidden.any() else None,
        "mean_weight_hidden_normal": float(weights[~hidden].mean()) if (~hidden).any() else None,
        "share_of_weight_on_sensitive": float(weights[hidden].sum() / weights.sum().clamp_min(1e-12)),
    }


# -- reject: drop sensitive-looking samples at sampling time ----------------------------------------


@dataclass(frozen=True)
class RejectorInfo:
    arch: str
    channels: int
    image_size: int
    folds: int
    beta: float
    # A sample is rejected when the fold models' mean P(S | x) is above this: the score of U's
    # (1 - beta) quantile (out of fold), the filter's cut.
    threshold: float


REJECTOR = "rejector"


class Rejector:
    """The filter's cross-fitted S-vs-U classifiers, used on samples: the fold models' mean
    P(S | x) above the filter's cut on U means "sensitive, draw another".

    The cut is the (1 - beta) quantile of U's out-of-fold scores, each from the one model that did
    not see the item (no ensemble score of U is out of fold), while a sample is scored by the mean
    of all K models, whose upper tail is thinner: on U-like samples the share rejected is therefore
    somewhat below beta. What it rejects is measured, not assumed (``rejected_share`` in eval.json).
    """

    def __init__(self, models: list[torch.nn.Module], info: RejectorInfo):
        self.models = [model.eval() for model in models]
        self.info = info

    @classmethod
    def fit(
        cls,
        unlabeled: torch.Tensor,
        sensitive: torch.Tensor,
        beta: float,
        folds: int = 5,
        fit_config: FitConfig | None = None,
        arch: str = "cnn",
        device: torch.device | str = "cpu",
    ) -> Rejector:
        scores, models = cross_fit(unlabeled, sensitive, folds, fit_config, arch, device)
        kept = scores[keep_mask(scores, beta)]
        threshold = float(kept.max()) if len(kept) else 0.0
        info = RejectorInfo(arch, unlabeled.shape[1], unlabeled.shape[-1], folds, beta, threshold)
        return cls(models, info)

    @torch.no_grad()
    def scores(self, images: np.ndarray) -> np.ndarray:
        """Mean P(S | x) of the fold models for uint8 (N, H, W, C) images."""
        expected = (self.info.image_size, self.info.image_size, self.info.channels)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise UsageError(f"images of shape {images.shape[1:]} do not fit a rejector for {expected}")
        inputs = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return torch.stack([predict_proba(model, inputs)[:, 1] for model in self.models]).mean(0).numpy()

    def flags(self, images: np.ndarray) -> np.ndarray:
        """True for the samples the rejector calls sensitive."""
        return self.scores(images) > self.info.threshold

    def save(self, path: Path) -> None:
        def write(tmp: Path) -> None:
            for index, model in enumerate(self.models):
                state = {k: v.contiguous() for k, v in model.state_dict().items()}
                save_file(state, tmp / f"fold{index}.safetensors")
            (tmp / "config.json").write_text(json.dumps(asdict(self.info), indent=2), encoding="utf-8")

        runs.atomic_write_dir(Path(path), write)

    @classmethod
    def load(cls, path: Path) -> Rejector:
        path = Path(path)
        try:
            info = RejectorInfo(**runs.read_json(path / "config.json"))
            models = []
            for index in range(info.folds):
                model = build_classifier(info.arch, info.channels, 2, info.image_size)
                model.load_state_dict(load_file(path / f"fold{index}.safetensors"))
                models.append(model)
        except Exception as error:  # noqa: BLE001 - a damaged folder gets one answer (safetensors' own errors too)
            raise runs.RunError(
                f"{path} is not a readable rejector ({type(error).__name__}): delete it and train again "
                "with --overwrite"
            ) from None
        return cls(models, info)


def sample_with_rejection(
    draw, rejector: Rejector, num: int, max_draws: int | None = None, allow_fewer: bool = False
) -> tuple[np.ndarray, dict]:
    """``num`` samples none of which ``rejector`` flags, and the share it rejected.

    ``draw(count, round_index)`` returns ``count`` uint8 samples of rejection round
    ``round_index`` (each round its own noise stream), drawing enough for the acceptance rate seen
    so far, so the same call always returns the same images. Stops with an error after
    ``max_draws`` (default 50 num) draws, or with ``allow_fewer`` returns the (possibly fewer,
    possibly no) samples kept by then.
    """
    if num <= 0:
        raise UsageError(f"--num must be > 0, got {num}")
    max_draws = max_draws or 50 * num
    kept: list[np.ndarray] = []
    have = drawn = 0
    acceptance = 1.0 - rejector.info.beta
    round_index = 0
    while have < num:
        need = num - have
        count = min(max_draws - drawn, math.ceil(need / max(acceptance, 0.02) * 1.05) + 4)
        if count <= 0:
            if allow_fewer:
                break
            raise UsageError(
                f"the rejector called {drawn - have} of {drawn} samples sensitive and {have} of the {num} "
                "wanted were kept: this model generates sensitive samples almost only; lower --num or "
                "train with another method"
            )
        images = draw(count, round_index)
        flagged = rejector.flags(images)
        kept.append(images[~flagged])
        have += int((~flagged).sum())
        drawn += count
        acceptance = max(have, 1) / drawn
        round_index += 1
    images = np.concatenate(kept)[:num]
    return images, {
        "num_drawn": drawn,
        "rejected_share": (drawn - have) / drawn,
        "threshold": rejector.info.threshold,
    }
