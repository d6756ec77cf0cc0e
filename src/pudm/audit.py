"""Audit without labels: the share of a model's samples that are sensitive, from U and S alone.

A user of PU learning has no labeled normal data, so no judge trained on labels can say whether a
model still generates sensitive items. What they have is U (the mixture ``beta p_S + (1 - beta)
p_N``), S (a sample of ``p_S``) and beta. That is enough for **adjusted classify-and-count**:

1. K classifiers of S against U are cross-fitted (each item of U and S is scored by the one model
   that did not train on it). For a threshold c, the held-out S items give the true-positive rate
   ``tpr(c)``, and U gives the rate on normal items: ``q_U(c) = beta tpr(c) + (1 - beta) fpr(c)``.
2. The samples are scored by the same models; their share above c is ``q(c) = pi tpr(c) + (1 -
   pi) fpr(c)``, so ``pi = (q(c) - fpr(c)) / (tpr(c) - fpr(c))``.
3. The estimate is the median of ``pi`` over thresholds where S and normal items are told apart
   (``tpr - fpr >= 0.25``; Forman's median sweep), and a percentile bootstrap over the samples,
   U and S gives the 95% interval.

The assumption that can fail is that a sensitive *sample* scores like a real sensitive item.
Generated images lose detail, and a classifier that keys on detail then calls generated sensitive
items normal: the estimate falls, the dangerous direction. The classifiers therefore compare items
**noised** to a level ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` (t of the 1000-step linear
DDPM schedule) where detail is drowned for real and generated items alike, while the coarse
content that tells S from normal survives. The level is chosen by measurement for each audit: the
lowest of :data:`LEVELS` at which a classifier of samples against U no longer tells them apart
(held-out AUC <= :data:`LOOKS_LIKE_U`). Every item is noised with fixed seeded draws, so an audit
is deterministic and a folder of a run's samples audits as the run does.

The same check guards against a confident 0 from a model whose samples look like nothing in U
(noise, a collapsed model): where no level brings the samples-vs-U AUC below :data:`FOREIGN_AUC`,
the audit says so.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pudm import runs
from pudm.classifier import FitConfig, predict_proba
from pudm.errors import UsageError
from pudm.filtering import fit_sensitive_classifier

AUDIT, AUDIT_GRID = "audit.json", "audit.png"
ESTIMATOR = "adjusted classify-and-count (median sweep) on noised items, cross-fitted S-vs-U CNNs"
# The noise levels tried, lowest first, and the samples-vs-U AUC at which samples look like U.
LEVELS = (0, 50, 100, 150, 200, 300, 400)
LOOKS_LIKE_U = 0.55
# The samples look like nothing in U where no level brings the samples-vs-U AUC below this
# (plus beta / 2: what a model without sensitive samples differs from U by, in content alone).
FOREIGN_AUC = 0.65
FEW_SENSITIVE = 50
# Fewer samples than this: no audit (the held-out halves of the samples-vs-U check need some).
MIN_SAMPLES = 20


@dataclass(frozen=True)
class AuditConfig:
    """How an audit is made.

    Attributes:
        noise_level: DDPM timestep (of 1000, linear schedule) the items are noised to; 0: none;
            None: the lowest of :data:`LEVELS` where samples and U look alike.
        noise_draws: noised copies of each item, for training and (averaged) for scoring.
        folds: cross-fitted S-vs-U classifiers.
        epochs: training epochs of each classifier (over the noised copies).
        min_separation: thresholds where tpr - fpr is below this are not used.
        resamples: bootstrap resamples of the interval.
        seed: seeds the folds, the noise and the classifiers.
    """

    noise_level: int | None = None
    noise_draws: int = 3
    folds: int = 5
    epochs: int = 10
    min_separation: float = 0.25
    resamples: int = 500
    seed: int = 0

    def validate(self) -> None:
        if self.noise_level is not None and not 0 <= self.noise_level < 1000:
            raise UsageError(f"--noise-level must be in [0, 1000), got {self.noise_level}")
        if self.noise_draws < 1 or self.epochs < 1 or self.resamples < 1:
            raise UsageError("--noise-draws, --epochs and --resamples must be >= 1")
        if self.folds < 2:
            raise UsageError(f"--folds must be >= 2, got {self.folds}")


def noise_scales(level: int) -> tuple[float, float]:
    """``(sqrt(abar_t), sqrt(1 - abar_t))`` of the 1000-step linear DDPM schedule (1e-4 to 0.02)."""
    if level == 0:
        return 1.0, 0.0
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alpha_bar = float(np.prod(1.0 - betas[: level + 1]))
    return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)


def noised(images: torch.Tensor, level: int, draws: int, seed: int) -> torch.Tensor:
    """``draws`` noised copies of ``images`` (N, C, H, W in [-1, 1]): (draws, N, C, H, W), the
    noise drawn from ``seed`` alone."""
    signal, noise = noise_scales(level)
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn((draws, *images.shape), generator=generator)
    return signal * images.float().unsqueeze(0) + noise * eps


@torch.no_grad()
def _mean_score(model: torch.nn.Module, copies: torch.Tensor) -> np.ndarray:
    """P(S | x_t) averaged over the noised copies (draws, N, ...)."""
    model.eval()
    return torch.stack([predict_proba(model, copy)[:, 1] for copy in copies]).mean(0).numpy()


@dataclass
class Scores:
    """Cross-fitted P(S | x_t): U's and S's out of fold, the samples' by every fold model (K, N)."""

    unlabeled: np.ndarray
    sensitive: np.ndarray
    samples: np.ndarray


def score(
    unlabeled: torch.Tensor, sensitive: torch.Tensor, samples: torch.Tensor, config: AuditConfig, level: int
) -> Scores:
    """Train ``config.folds`` S-vs-U classifiers on items noised to ``level`` and score everything."""
    smaller = min(len(unlabeled), len(sensitive))
    if smaller < config.folds:
        raise UsageError(f"an audit needs at least {config.folds} items in U and in S, got {smaller}")
    generator = torch.Generator().manual_seed(config.seed)
    fold_u = torch.randperm(len(unlabeled), generator=generator) % config.folds
    fold_s = torch.randperm(len(sensitive), generator=generator) % config.folds
    # Fixed draws: the same item is noised the same way in every fold and every audit.
    copies_u = noised(unlabeled, level, config.noise_draws, config.seed + 1)
    copies_s = noised(sensitive, level, config.noise_draws, config.seed + 2)
    copies_x = noised(samples, level, config.noise_draws, config.seed + 3)
    fit_config = FitConfig(epochs=config.epochs, seed=config.seed)
    scores_u, scores_s = np.empty(len(unlabeled)), np.empty(len(sensitive))
    scores_x = np.empty((config.folds, len(samples)))
    for fold in range(config.folds):
        held_u, held_s = fold_u == fold, fold_s == fold
        train_u = copies_u[:, ~held_u].flatten(0, 1)
        train_s = copies_s[:, ~held_s].flatten(0, 1)
        model = fit_sensitive_classifier(train_u, train_s, fit_config, fold)
        scores_u[held_u.numpy()] = _mean_score(model, copies_u[:, held_u])
        scores_s[held_s.numpy()] = _mean_score(model, copies_s[:, held_s])
        scores_x[fold] = _mean_score(model, copies_x)
    return Scores(scores_u, scores_s, scores_x)


def adjusted_share(
    scores_u: np.ndarray,
    scores_s: np.ndarray,
    scores_x: np.ndarray,
    beta: float,
    min_separation: float = 0.25,
) -> tuple[float | None, dict]:
    """The share of sensitive items among the samples, and how it was found.

    ``scores_x`` holds every fold model's scores of the samples (K, N): the share above a threshold
    is averaged over the models, as U's and S's out-of-fold rates pool the models. Returns
    ``(None, detail)`` where no threshold separates S from normal items by ``min_separation``.
    """
    if not 0.0 <= beta < 1.0:
        raise UsageError(f"beta must be in [0, 1), got {beta}")
    thresholds = np.quantile(scores_s, np.linspace(0.05, 0.95, 19))
    tpr = (scores_s[None, :] > thresholds[:, None]).mean(1)
    q_u = (scores_u[None, :] > thresholds[:, None]).mean(1)
    fpr = np.clip((q_u - beta * tpr) / (1.0 - beta), 0.0, 1.0)
    q_x = (np.atleast_2d(scores_x)[:, None, :] > thresholds[None, :, None]).mean((0, 2))
    separation = tpr - fpr
    used = separation >= min_separation
    detail = {"thresholds_used": int(used.sum()), "best_separation": float(separation.max())}
    if not used.any():
        return None, detail
    shares = (q_x[used] - fpr[used]) / separation[used]
    return float(np.clip(np.median(shares), 0.0, 1.0)), detail


def bootstrap_interval(
    scores: Scores, beta: float | None, config: AuditConfig, level: float = 0.95
) -> tuple[list[float] | None, int]:
    """Percentile bootstrap over the samples, U and S (and beta's estimate, when beta is not given):
    ``([low, high], resamples without an estimate)``, the interval None when no resample had one.

    The fold models and the noise level stay fixed: the interval leaves out their own variance."""
    from pudm.prior import bbe

    rng = np.random.default_rng(config.seed)
    draws, failed = [], 0
    for _ in range(config.resamples):
        u = scores.unlabeled[rng.integers(0, len(scores.unlabeled), len(scores.unlabeled))]
        s = scores.sensitive[rng.integers(0, len(scores.sensitive), len(scores.sensitive))]
        x = scores.samples[:, rng.integers(0, scores.samples.shape[1], scores.samples.shape[1])]
        b = beta if beta is not None else min(bbe(u, s)[0], 0.99)
        share, _ = adjusted_share(u, s, x, b, config.min_separation)
        if share is None:
            failed += 1
        else:
            draws.append(share)
    if not draws:
        return None, failed
    tail = (1 - level) / 2
    low, high = np.quantile(np.asarray(draws), [tail, 1 - tail])
    return [float(low), float(high)], failed


def two_sample_auc(unlabeled: torch.Tensor, samples: torch.Tensor, config: AuditConfig, level: int) -> float:
    """Held-out AUC of a classifier of samples against U at the audit's noise level: 0.5 where the
    samples look like U, near 1 where they look like nothing in it."""
    from sklearn.metrics import roc_auc_score

    generator = torch.Generator().manual_seed(config.seed + 7)
    half_u = torch.randperm(len(unlabeled), generator=generator) % 2 == 0
    half_x = torch.randperm(len(samples), generator=generator) % 2 == 0
    copies_u = noised(unlabeled, level, 1, config.seed + 1)[0]
    copies_x = noised(samples, level, 1, config.seed + 3)[0]
    fit_config = FitConfig(epochs=config.epochs, seed=config.seed + 7)
    # "sensitive" here is the samples: the same balanced two-class fit, samples as label 1.
    model = fit_sensitive_classifier(copies_u[half_u], copies_x[half_x], fit_config, 0)
    with torch.no_grad():
        model.eval()
        held = torch.cat([copies_u[~half_u], copies_x[~half_x]])
        truth = np.r_[np.zeros(int((~half_u).sum())), np.ones(int((~half_x).sum()))]
        return float(roc_auc_score(truth, predict_proba(model, held)[:, 1].numpy()))


def choose_level(unlabeled: torch.Tensor, samples: torch.Tensor, config: AuditConfig) -> tuple[int, dict]:
    """The noise level of the audit and the samples-vs-U AUC at each level tried: the level given,
    else the lowest of :data:`LEVELS` where the AUC is at most :data:`LOOKS_LIKE_U`, else the one
    where it is lowest."""
    levels = LEVELS if config.noise_level is None else (config.noise_level,)
    aucs: dict[int, float] = {}
    for level in levels:
        aucs[level] = two_sample_auc(unlabeled, samples, config, level)
        if aucs[level] <= LOOKS_LIKE_U:
            return level, aucs
    return min(aucs, key=aucs.get), aucs


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def audit_images(
    samples: np.ndarray,
    unlabeled: torch.Tensor,
    sensitive: torch.Tensor,
    beta: float | None = None,
    config: AuditConfig | None = None,
) -> tuple[dict, np.ndarray]:
    """Audit uint8 samples (N, H, W, C) against U and S (float NCHW in [-1, 1]).

    ``beta``: the share of sensitive items in U; None estimates it (Best Bin Estimation on the same
    cross-fitted scores). Returns the report (see :func:`audit`) and the samples' mean score, the
    higher the more sensitive-looking.
    """
    from pudm.prior import bbe

    config = config or AuditConfig()
    config.validate()
    if len(samples) < MIN_SAMPLES:
        raise UsageError(
            f"{len(samples)} samples are too few to audit (at least {MIN_SAMPLES}): give more samples"
        )
    x = as_tensor(samples)
    if x.shape[1:] != unlabeled.shape[1:] or sensitive.shape[1:] != unlabeled.shape[1:]:
        raise UsageError(
            f"the samples are {tuple(x.shape[1:])} (C, H, W), U {tuple(unlabeled.shape[1:])} and S "
            f"{tuple(sensitive.shape[1:])}: audit samples against U and S of their own size"
        )
    start = time.perf_counter()
    level, aucs = choose_level(unlabeled, x, config)
    scores = score(unlabeled, sensitive, x, config, level)
    beta_source = "given"
    if beta is None:
        beta, beta_source = min(bbe(scores.unlabeled, scores.sensitive)[0], 0.99), "estimated (BBE)"
    share, detail = adjusted_share(
        scores.unlabeled, scores.sensitive, scores.samples, beta, config.min_separation
    )
    warnings = []
    interval = None
    if share is None:
        warnings.append(
            f"S and U cannot be told apart at noise level {level} (best tpr - fpr "
            f"{detail['best_separation']:.2f}): no estimate; try a lower --noise-level or more S"
        )
    else:
        interval, failed = bootstrap_interval(scores, beta if beta_source == "given" else None, config)
        if interval is not None:  # the estimate lies inside its interval
            interval = [min(interval[0], share), max(interval[1], share)]
        if failed > 0.05 * config.resamples:
            warnings.append(
                f"{failed} of {config.resamples} bootstrap resamples found no threshold that tells S "
                "from U: the interval is wider than it says"
            )
    auc = aucs[level]
    # Samples with no sensitive items differ from U by content alone: up to AUC 0.5 + beta / 2.
    if auc > FOREIGN_AUC + beta / 2:
        warnings.append(
            f"the samples look like nothing in U (a samples-vs-U classifier tells them apart at every "
            f"noise level, held-out AUC {auc:.2f} at best): the share is not reliable for such samples"
        )
    if len(sensitive) < FEW_SENSITIVE:
        warnings.append(f"S has only {len(sensitive)} images: the estimate is unstable")
    report = {
        "sensitive_share": share,
        "interval": interval,
        "estimator": ESTIMATOR,
        "beta": beta,
        "beta_source": beta_source,
        "num_samples": len(samples),
        "num_unlabeled": len(unlabeled),
        "num_sensitive": len(sensitive),
        **detail,
        "noise_level": level,
        "samples_vs_unlabeled_auc": auc,
        "samples_vs_unlabeled_auc_by_level": {str(k): v for k, v in aucs.items()},
        "config": asdict(config),
        "seconds": round(time.perf_counter() - start, 1),
        "warnings": warnings,
    }
    return report, scores.samples.mean(0)


def save_sorted_grid(samples: np.ndarray, sample_scores: np.ndarray, path: Path, count: int = 64) -> None:
    """The ``count`` most sensitive-looking samples, most sensitive first (row by row)."""
    from pudm.sampling import save_grid

    order = np.argsort(-sample_scores, kind="stable")[:count]
    save_grid(samples[order], path)


def describe(report: dict) -> str:
    """One line: the share with its interval, or why there is none."""
    share = report["sensitive_share"]
    if share is None:
        return "no estimate: " + report["warnings"][0]
    interval = report["interval"]
    said = "no interval" if interval is None else "95% interval [{:.1%}, {:.1%}]".format(*interval)
    return (
        f"about {share:.1%} of {report['num_samples']} samples look like S ({said}; beta "
        f"{report['beta']:.3f}, {report['beta_source']})"
    )


def write(out: Path, report: dict, samples: np.ndarray, sample_scores: np.ndarray) -> None:
    """``OUT/audit.json`` and ``OUT/audit.png``, each written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    save_sorted_grid(samples, sample_scores, out / AUDIT_GRID)
    runs.atomic_write_json(out / AUDIT, report)


def _npz_images(path: Path) -> np.ndarray:
    """The uint8 (N, H, W, C) array ``pudm sample --out FILE.npz`` writes (key ``images``)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            images = stored["images"]
    except Exception as error:  # noqa: BLE001 - zip, pickle and format errors alike mean a bad file
        raise UsageError(
            f"{path} is not a samples file of pudm sample ({type(error).__name__}): write one with "
            "pudm sample RUN --out FILE.npz"
        ) from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise UsageError(f"{path} holds {images.dtype} {images.shape}, not square uint8 (N, H, W, C) images")
    return images


def _images_of_folder(folder: Path, channels: int | None) -> np.ndarray:
    """A folder of generated images, at the size of its first image (grey or RGB as that image
    is, unless ``channels`` says)."""
    from PIL import Image

    from pudm.imagefolder import load_folder

    first = None
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            try:
                with Image.open(path) as image:
                    first = (image.size, image.mode)
                break
            except OSError:
                continue
    if first is None:
        raise UsageError(f"{folder} holds no readable image: give a folder of generated images")
    (width, height), mode = first
    if width != height:
        raise UsageError(f"{folder} holds {width}x{height} images: pudm audits square images")
    channels = channels or (1 if mode in ("L", "1", "I", "I;16") else 3)
    return load_folder(folder, width, channels, flag="the samples").images.permute(0, 2, 3, 1).numpy()


def _real_images(spec, size: int, channels: int, flag: str) -> torch.Tensor:
    from pudm.readers import load_images

    return load_images(spec, size, channels, flag=flag).as_float()


def audit(
    target: str | Path,
    *,
    unlabeled: str | Path | None = None,
    sensitive: str | Path | None = None,
    beta: float | None = None,
    num: int = 1000,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    channels: int | None = None,
    config: AuditConfig | None = None,
    show_progress: bool = False,
    device: str | None = None,
) -> dict:
    """Audit a run, a diffusers pipeline folder, a folder of generated images or the ``.npz`` of
    ``pudm sample`` without labels.

    A run's samples are drawn as ``pudm sample`` draws them (a ``reject`` run's pass its guard),
    with U, S and beta from its config unless given. A pipeline or a folder of images needs
    ``unlabeled`` and ``sensitive`` (any form ``--unlabeled`` takes). Writes ``OUT/audit.json`` and
    ``OUT/audit.png`` (the most sensitive-looking samples first); ``out`` defaults to the run.

    Returns the report: ``sensitive_share`` and its 95% ``interval`` (None where S and U cannot
    be told apart), how they were made, and ``warnings``.
    """
    from pudm.run_model import RunModel, pipeline_folder

    config = config or AuditConfig()
    config.validate()  # every cheap check before any sampling
    target = Path(target)
    if not target.exists():
        raise UsageError(f"{target} does not exist: give a run, a pipeline folder or a folder of samples")
    if num < MIN_SAMPLES:
        raise UsageError(f"--num must be >= {MIN_SAMPLES} for an audit, got {num}")
    if beta is not None and not 0.0 <= beta < 1.0:
        raise UsageError(f"--beta must be in [0, 1), got {beta}")
    if (unlabeled is None) != (sensitive is None):
        raise UsageError("give --unlabeled and --sensitive together (or neither, to use the run's)")
    is_run = runs.holds_run(target)
    if not is_run and unlabeled is None:
        raise UsageError(f"{target} is not a pudm run: give --unlabeled and --sensitive to audit it against")
    if out is None and not is_run:
        raise UsageError("give --out, the folder for audit.json and audit.png")
    out = Path(out) if out is not None else target
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder")
    how: dict = {"target": target.name}
    caution = None
    is_model = is_run or (target / "model_index.json").is_file() or (target / "pipeline").is_dir()
    if is_model:
        pipeline_folder(target)  # a clear error for an unfinished run
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = RunModel.load(target, sampler=sampler, steps=steps, device=device)
        drawn = model.draw(num, seed, show_progress=show_progress)
        samples = drawn.images
        how.update(sampler=model.sampler, sampling_steps=model.steps, sampling_seed=seed)
        how["sampling"] = drawn.description
        caution = model.caution
    elif target.suffix == ".npz":
        samples = _npz_images(target)
        how["sampling"] = "a samples file"
    else:
        samples = _images_of_folder(target, channels)
        how["sampling"] = "a folder of images"
    size, channels = samples.shape[1], samples.shape[3]
    run_config = None
    if is_run:
        from pudm.config import RunConfig

        run_config = RunConfig.from_dict(runs.read_json(target / runs.CONFIG))
    if unlabeled is None or sensitive is None:
        from pudm.datasets import split_from_config

        split = split_from_config(run_config)  # U and S only: the hidden truth is not read
        u_images, s_images = split.unlabeled, split.sensitive
    else:
        u_images = _real_images(unlabeled, size, channels, "--unlabeled")
        s_images = _real_images(sensitive, size, channels, "--sensitive")
    if beta is None and run_config is not None and unlabeled is None:
        beta = run_config.train.beta
        source = "the run's (estimated)" if run_config.train.beta_estimate else "the run's"
    else:
        source = "given" if beta is not None else None
    report, sample_scores = audit_images(samples, u_images, s_images, beta, config)
    if source is not None:
        report["beta_source"] = source
    if caution:
        report["warnings"].append(f"the sampler: {caution}")
    report.update(how)
    write(out, report, samples, sample_scores)
    if is_run and out.resolve() == target.resolve():
        from pudm.cards import refresh_cards

        refresh_cards(target)  # the model card states the audit
    return report
