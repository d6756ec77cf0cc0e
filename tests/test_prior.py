"""Estimating beta, the share of sensitive items in U, from U and S alone."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from pudm import UsageError
from pudm.cli import main
from pudm.config import preset
from pudm.datasets import split_from_config
from pudm.prior import bbe, bbe_interval, check_inputs, estimate_for_config, estimate_prior, usable_beta


def _mixture_scores(beta: float, n_u: int = 4000, n_s: int = 1000, seed: int = 0):
    """Classifier scores: sensitive items ~ Beta(6, 1.5), normal items ~ Beta(1.5, 6); U mixes them.

    Normal items have almost no mass near 1: the "top bin" BBE relies on exists. (With heavier
    overlap, e.g. Beta(5, 2) vs Beta(2, 5), BBE stays an upper estimate: +0.03 at beta 0.05.)
    """
    rng = np.random.default_rng(seed)
    hidden = rng.random(n_u) < beta
    scores_u = np.where(hidden, rng.beta(6, 1.5, n_u), rng.beta(1.5, 6, n_u))
    return scores_u, rng.beta(6, 1.5, n_s), hidden.mean()


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.2, 0.3])
def test_bbe_recovers_a_known_mixture_proportion(beta):
    scores_u, scores_s, truth = _mixture_scores(beta)
    estimate, threshold = bbe(scores_u, scores_s)
    assert abs(estimate - truth) < 0.03, (estimate, truth)
    # The estimate is the ratio of the shares of U and S in the bin the threshold opens.
    assert estimate == pytest.approx((scores_u >= threshold).mean() / (scores_s >= threshold).mean())
    value, low, high = bbe_interval(scores_u, scores_s, resamples=200)
    assert value == estimate and low <= truth <= high and high - low < 0.1


def test_bbe_is_not_the_naive_ratio():
    """Guard: the share of U above 0.5 over the share of S above 0.5 overestimates beta here,
    so the bin choice is doing the work."""
    scores_u, scores_s, truth = _mixture_scores(0.1)
    naive = (scores_u > 0.5).mean() / (scores_s > 0.5).mean()
    assert naive - truth > 0.02
    assert abs(bbe(scores_u, scores_s)[0] - truth) < 0.01


def test_bbe_gives_one_when_u_is_s():
    rng = np.random.default_rng(0)
    scores = rng.random(2000)
    assert bbe(scores[:1500], scores[1500:])[0] > 0.85


def test_too_small_or_identical_inputs_are_refused():
    images = torch.randn(100, 1, 8, 8)
    with pytest.raises(ValueError, match="S holds 5 items.*--beta VALUE"):
        check_inputs(images, images[:5])
    with pytest.raises(ValueError, match="U and S are the same data"):
        check_inputs(images, images.clone())
    warnings = check_inputs(images, torch.randn(20, 1, 8, 8))
    assert any("unstable" in w for w in warnings)
    assert check_inputs(images, torch.randn(60, 1, 8, 8)) == []


@pytest.fixture(scope="module")
def digits_split():
    return split_from_config(preset("digits_even"))


def test_estimate_on_digits_is_close_to_the_hidden_truth(digits_split):
    split = digits_split
    truth = float(split.unlabeled_is_sensitive.float().mean())
    estimate = estimate_prior(split.unlabeled, split.sensitive, epochs=8, resamples=100)
    assert abs(estimate.beta - truth) < 0.05, (estimate.beta, truth)
    assert estimate.low <= truth <= estimate.high, "the 95% interval covers the hidden truth"
    assert estimate.high - estimate.low < 0.15, "and says something"
    assert abs(estimate.cross_check["beta"] - truth) < 0.08
    assert estimate.method.startswith("bbe") and estimate.num_sensitive == len(split.sensitive)
    assert usable_beta(estimate) == estimate.beta


def test_estimate_for_u_without_sensitive_items_is_small(digits_split):
    split = digits_split
    normal_only = split.unlabeled[~split.unlabeled_is_sensitive]
    estimate = estimate_prior(normal_only, split.sensitive, epochs=8, resamples=50, cross_check=False)
    assert estimate.beta < 0.03


def test_u_that_looks_like_s_cannot_train(digits_split):
    split = digits_split
    sensitive = split.sensitive
    estimate = estimate_prior(sensitive[:150], sensitive[150:], epochs=4, resamples=50, cross_check=False)
    assert estimate.beta > 0.6
    # The refusal itself, on estimates either side of the limit.
    looks_like_s = dataclasses.replace(estimate, beta=0.95)
    with pytest.raises(UsageError, match="U looks like S"):
        usable_beta(looks_like_s)
    assert usable_beta(dataclasses.replace(estimate, beta=0.3)) == 0.3


def test_estimate_prior_command_json(capsys):
    assert main(["estimate-prior", "--epochs", "4", "--json", "--no-cross-check"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"beta", "low", "high", "method"} <= set(result)
    # What the library gives for the same data and settings, and near the hidden truth (1/11).
    config = preset("digits_even")
    config.train.filter_epochs = 4
    library = estimate_for_config(config, cross_check=False)
    assert result["beta"] == pytest.approx(library.beta) and result["low"] == pytest.approx(library.low)
    assert abs(result["beta"] - 75 / 825) < 0.05


def test_estimate_prior_command_refuses_tiny_s(capsys):
    assert main(["estimate-prior", "--num-sensitive", "4"]) == 2
    err = capsys.readouterr().err
    assert "S holds 4 items" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_train_with_beta_auto_records_the_estimate_and_resumes(tmp_path, capsys):
    out = tmp_path / "auto"
    tiny = ["--steps", "4", "--batch-size", "16", "--checkpoint-every", "2", "--quiet"]
    tiny += ["--sample-steps", "2", "--grid-size", "4", "--filter-epochs", "4"]
    assert main(["train", "--out", str(out), "--beta", "auto", *tiny]) == 0
    config = json.loads((out / "config.json").read_text())
    estimate = config["train"]["beta_estimate"]
    assert config["train"]["beta"] == estimate["beta"] and 0 < estimate["beta"] < 0.3
    assert "beta auto" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--beta", "auto", *tiny]) == 0
    assert main(["train", "--out", str(out), "--resume", "--beta", "0.2", *tiny]) == 2
    assert main(["train", "--out", str(tmp_path / "u"), "--method", "unsupervised", "--beta", "auto"]) == 2


def test_classifier_fit_is_seeded_whatever_ran_before():
    """The S-vs-U classifier (dropout included) depends on its seed alone, not on the global
    generator, so an estimate repeats within one process too."""
    from pudm.classifier import FitConfig, build_classifier, fit

    images, labels = torch.randn(64, 1, 8, 8), torch.arange(64) % 2
    models = []
    for advance in (1000, 3):
        torch.manual_seed(1)
        model = build_classifier("cnn", 1, 2, 8)
        torch.rand(advance)  # whatever ran before moves the global generator on
        models.append(fit(model, images, labels, FitConfig(epochs=2, seed=5)))
    first, second = (m.state_dict() for m in models)
    assert all(torch.equal(first[k], second[k]) for k in first)
