"""Which calibration gives ``weighted`` weights that remove the sensitive items of U?

``weighted`` trains on U with w(x) = clip(1 - beta r(x), 0, 1), r = p_S / p_U the density ratio
of an S-vs-U classifier. On U the true ratio cannot exceed 1 / beta (p_U >= beta p_S), so a
classifier calibrated without that ceiling over-states r in its tail and under-states it in the
bulk, and sensitive items keep weight. This script scores every item of U and S out of fold once
(the same cross-fitted CNN as ``weighted``) and compares calibrations of those logits:

- ``platt``: sigmoid(a z + b), the calibration weighted used first (no ceiling);
- ``bounded-platt``: sigmoid(a z + b) / (1 + beta), fitted with the ceiling in the model;
- ``isotonic``: a monotone step function of z, fitted with the balanced loss, capped at the ceiling;
- ``rescaled``: platt's ratios scaled so that the mean weight over U is 1 - beta;
- ``bounded-platt, mean 1``: bounded-platt's slope, its bias set so that the mean ratio over U is
  1 (true of the true ratio: E_U[p_S / p_U] = 1).

For each: the mean weight of U's hidden sensitive and hidden normal items, the share of hidden
sensitive items that keep a weight above 0.5, the Brier score of 1 - w as the chance of
"sensitive" against the hidden truth, and, for reference, the Brier score of ``filter``'s hard
mask (drop the top beta share of the same scores). The hidden truth is read here, by the judge,
never by pudm's training code. One JSON line per case and calibration, then a Markdown table::

    python benchmarks/weighted_calibration.py --cases digits_even,digits-3,digits-8 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch


def digits_class_case(sensitive_class: int, beta: float, num_normal: int, seed: int):
    """U = ``num_normal`` digits of the other classes + the beta share of ``sensitive_class``;
    S = the rest of that class; as a user's folders would hold them (no labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0 * 2.0 - 1.0).float()[:, None]
    rng = np.random.default_rng(seed)
    is_sensitive = digits.target == sensitive_class
    normal = rng.permutation(np.flatnonzero(~is_sensitive))[:num_normal]
    hidden = rng.permutation(np.flatnonzero(is_sensitive))
    num_hidden = round(num_normal * beta / (1.0 - beta))
    u_index = np.concatenate([normal, hidden[:num_hidden]])
    truth = np.concatenate([np.zeros(len(normal), bool), np.ones(num_hidden, bool)])
    order = rng.permutation(len(u_index))
    return images[u_index[order]], images[hidden[num_hidden:]], torch.from_numpy(truth[order]), beta


def preset_case(name: str):
    from pudm.config import preset
    from pudm.datasets import split_from_config

    split = split_from_config(preset(name))
    return split.unlabeled, split.sensitive, split.unlabeled_is_sensitive, 0.1


def calibrations(logit_u: torch.Tensor, logit_s: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """The density ratio r of every U item under each calibration."""
    from sklearn.isotonic import IsotonicRegression

    from pudm.filtering import bounded_platt_scaling, platt_scaling

    ceiling = 1.0 / (1.0 + beta)
    a, b = platt_scaling(logit_u, logit_s)
    platt = (logit_u * a + b).clamp(-30, 30).exp()
    out = {"platt": platt}
    a, b = bounded_platt_scaling(logit_u, logit_s, beta)
    g = torch.sigmoid(logit_u * a + b) * ceiling
    out["bounded-platt"] = g / (1 - g)
    z = torch.cat([logit_u, logit_s]).double().numpy()
    y = np.concatenate([np.zeros(len(logit_u)), np.ones(len(logit_s))])
    weight = np.where(y == 1, 0.5 / len(logit_s), 0.5 / len(logit_u))
    iso = IsotonicRegression(y_min=0.0, y_max=ceiling, out_of_bounds="clip").fit(z, y, sample_weight=weight)
    g = torch.from_numpy(iso.predict(logit_u.double().numpy())).float().clamp(max=ceiling)
    out["isotonic"] = g / (1 - g)
    out["bounded-platt, mean 1"] = _unit_mean(logit_u, a, ceiling)
    low, high = 0.0, 1.0  # scale s of platt's ratios with mean clip(1 - beta s r) = 1 - beta
    for _ in range(60):
        middle = (low + high) / 2 if high < 1e6 else low * 2
        mean = float((1 - beta * middle * platt).clamp(0, 1).mean())
        low, high = (middle, high) if mean > 1 - beta else (low, middle)
        if high == 1.0 and mean > 1 - beta:
            high = 2.0 * middle
    out["rescaled"] = platt * (low + high) / 2
    return out


def nnpu_posteriors(unlabeled, sensitive, beta, folds, fit_config):
    """P(S | x, x in U) of every U item from a non-negative PU classifier (Kiryo et al. 2017,
    logistic loss, prior beta) cross-fitted over U and S like the S-vs-U classifier."""
    import math

    import torch.nn.functional as F

    from pudm.classifier import _augment, build_classifier

    generator = torch.Generator().manual_seed(fit_config.seed)
    fold_u = torch.randperm(len(unlabeled), generator=generator) % folds
    fold_s = torch.randperm(len(sensitive), generator=generator) % folds
    posterior = torch.empty(len(unlabeled))
    for fold in range(folds):
        held_u, held_s = fold_u == fold, fold_s == fold
        u, s = unlabeled[~held_u], sensitive[~held_s]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fit_config.seed * 100 + fold)
            model = build_classifier("cnn", u.shape[1], 2, u.shape[-1])
            batch = fit_config.batch_size
            steps = fit_config.epochs * math.ceil(len(u) / batch)
            optimizer = torch.optim.AdamW(model.parameters(), lr=fit_config.learning_rate, weight_decay=1e-4)
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, fit_config.learning_rate, total_steps=steps
            )
            g = torch.Generator().manual_seed(fit_config.seed * 100 + fold)
            model.train()
            for _ in range(steps):
                iu = torch.randint(0, len(u), (batch,), generator=g)
                i_s = torch.randint(0, len(s), (batch,), generator=g)
                z = model(_augment(torch.cat([u[iu], s[i_s]]), 1, g))
                z = z[:, 1] - z[:, 0]
                zu, zs = z[:batch], z[batch:]
                positive = beta * F.softplus(-zs).mean()
                negative = F.softplus(zu).mean() - beta * F.softplus(zs).mean()
                loss = -negative if negative.item() < 0 else positive + negative
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
            model.eval()
            with torch.no_grad():
                out = model(unlabeled[held_u])
            posterior[held_u] = torch.sigmoid(out[:, 1] - out[:, 0])
    return posterior


def _unit_mean(logit_u: torch.Tensor, a: float, ceiling: float) -> torch.Tensor:
    """The bounded sigmoid with slope ``a`` and the bias at which the mean ratio over U is 1
    (E_U[p_S / p_U] = 1 for the true ratio)."""

    def ratios(bias: float) -> torch.Tensor:
        g = torch.sigmoid(logit_u.double() * a + bias) * ceiling
        return (g / (1 - g)).float()

    low, high = -50.0, 50.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if float(ratios(middle).mean()) < 1.0 else (low, middle)
    return ratios((low + high) / 2)


def report(ratios: torch.Tensor, beta: float, truth: torch.Tensor) -> dict:
    weights = (1 - beta * ratios).clamp(0, 1)
    hidden = truth.bool()
    return {
        "mean_weight_hidden_sensitive": float(weights[hidden].mean()),
        "mean_weight_hidden_normal": float(weights[~hidden].mean()),
        "hidden_sensitive_above_half": float((weights[hidden] > 0.5).float().mean()),
        "brier": float(((1 - weights) - hidden.float()).pow(2).mean()),
        "mean_clipped_ratio": float(ratios.clamp(max=1 / beta).mean()),
    }


def main() -> None:
    from pudm.classifier import FitConfig
    from pudm.filtering import keep_mask, out_of_fold_logits

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="digits_even,digits-3,digits-8")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--beta", type=float, default=0.15, help="the digits-K cases' beta")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--nnpu", action="store_true", help="also a non-negative PU classifier's posterior")
    args = parser.parse_args()
    rows: dict[tuple[str, str], list[dict]] = {}
    for case in args.cases.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            if case.startswith("digits-"):
                unlabeled, sensitive, truth, beta = digits_class_case(int(case[7:]), args.beta, 750, seed)
            else:
                unlabeled, sensitive, truth, beta = preset_case(case)
            logit_u, logit_s = out_of_fold_logits(
                unlabeled, sensitive, 5, FitConfig(epochs=args.epochs, seed=seed)
            )
            for name, ratios in calibrations(logit_u, logit_s, beta).items():
                row = {"case": case, "seed": seed, "calibration": name, **report(ratios, beta, truth)}
                print(json.dumps(row), flush=True)
                rows.setdefault((case, name), []).append(row)
            if args.nnpu:
                posterior = nnpu_posteriors(
                    unlabeled, sensitive, beta, 5, FitConfig(epochs=args.epochs, seed=seed)
                )
                row = {
                    "case": case,
                    "seed": seed,
                    "calibration": "nnpu",
                    **report(posterior / beta, beta, truth),
                }
                print(json.dumps(row), flush=True)
                rows.setdefault((case, "nnpu"), []).append(row)
            keep = keep_mask(torch.sigmoid(logit_u), beta)
            hard = {"brier": float(((~keep).float() - truth.float()).pow(2).mean())}
            hard["mean_weight_hidden_sensitive"] = float(keep[truth].float().mean())
            hard["mean_weight_hidden_normal"] = float(keep[~truth].float().mean())
            print(json.dumps({"case": case, "seed": seed, "calibration": "filter (hard mask)", **hard}))
            rows.setdefault((case, "filter (hard mask)"), []).append(hard)
    keys = (
        "mean_weight_hidden_sensitive",
        "mean_weight_hidden_normal",
        "hidden_sensitive_above_half",
        "brier",
    )
    print("\n| case | calibration | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for (case, name), found in rows.items():
        cells = []
        for key in keys:
            values = [row[key] for row in found if key in row]
            cells.append(f"{statistics.median(values):.3f}" if values else "-")
        print(f"| {case} | {name} | " + " | ".join(cells) + " |")
    print(
        f"\nmedian over seeds {args.seeds}; weights w = clip(1 - beta r, 0, 1); Brier of 1 - w vs the truth"
    )


if __name__ == "__main__":
    main()
