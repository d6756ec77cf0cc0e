"""pudm audit: the share of sensitive samples estimated from U and S alone, checked where the truth
is known (score mixtures, real digit mixtures), the same for a run and for its samples on disk, and
the usual one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from pudm.audit import AUDIT, AUDIT_GRID, LEVELS, AuditConfig, adjusted_share, audit_images, noised
from pudm.cli import main
from pudm.errors import UsageError

QUICK = AuditConfig(folds=3, epochs=5, noise_draws=2, resamples=100)


def _digits():
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0 * 2 - 1, dtype=torch.float32).unsqueeze(1)
    return images, digits.target


def _uint8(images: torch.Tensor) -> np.ndarray:
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def parts():
    """Real digits, odd = sensitive: U (600 even + 60 odd), S (120 odd) and, apart from both, the
    pools the 'samples' are mixed from (real items, so the truth of every mixture is known)."""
    images, labels = _digits()
    rng = np.random.default_rng(0)
    even = rng.permutation(np.flatnonzero(labels % 2 == 0))
    odd = rng.permutation(np.flatnonzero(labels % 2 == 1))
    return {
        "unlabeled": images[np.r_[even[:600], odd[:60]]],
        "sensitive": images[odd[60:180]],
        "normal_pool": images[even[600:]],
        "sensitive_pool": images[odd[180:]],
        "beta": 60 / 660,
    }


def test_adjusted_share_recovers_the_share_of_known_score_mixtures():
    rng = np.random.default_rng(0)
    normal = lambda n: rng.beta(2, 5, n)  # noqa: E731
    sensitive = lambda n: rng.beta(5, 2, n)  # noqa: E731
    beta = 0.1
    scores_u = np.r_[normal(9000), sensitive(1000)]
    scores_s = sensitive(2000)
    for share in (0.0, 0.05, 0.3):
        count = round(share * 20000)
        scores_x = np.r_[normal(20000 - count), sensitive(count)][None, :]
        estimate, detail = adjusted_share(scores_u, scores_s, scores_x, beta)
        assert estimate == pytest.approx(share, abs=0.02), (share, estimate)
        assert detail["thresholds_used"] >= 10
    # Without beta's correction the normal items' rate is over-stated and the share under-stated.
    count = round(0.3 * 20000)
    scores_x = np.r_[normal(20000 - count), sensitive(count)][None, :]
    assert adjusted_share(scores_u, scores_s, scores_x, 0.0)[0] < 0.27
    # S that looks like U: no threshold separates them, no estimate (not a confident 0).
    assert adjusted_share(normal(1000), normal(500), normal(800)[None, :], beta)[0] is None


def test_noise_is_the_ddpm_schedule_and_fixed_by_the_seed():
    images = torch.zeros(4, 1, 8, 8)
    first, again = noised(images, 100, 2, seed=5), noised(images, 100, 2, seed=5)
    assert torch.equal(first, again) and first.shape == (2, 4, 1, 8, 8)
    # abar_100 of the linear 1e-4..0.02 schedule: the noise std of zero images is sqrt(1 - abar).
    alpha_bar = np.prod(1 - np.linspace(1e-4, 0.02, 1000)[:101])
    assert float(first.std()) == pytest.approx(np.sqrt(1 - alpha_bar), rel=0.1)
    assert torch.equal(noised(images + 0.5, 0, 1, seed=1)[0], images + 0.5)


@pytest.mark.parametrize("share", [0.0, 0.05, 0.2])
def test_audit_recovers_known_shares_of_real_digit_mixtures(parts, share):
    normal = parts["normal_pool"]
    count = round(share * len(normal) / (1 - share))
    samples = _uint8(torch.cat([normal, parts["sensitive_pool"][:count]]))
    truth = count / len(samples)
    report, scores = audit_images(samples, parts["unlabeled"], parts["sensitive"], parts["beta"], QUICK)
    estimate, (low, high) = report["sensitive_share"], report["interval"]
    assert abs(estimate - truth) <= 0.25 * truth + 0.03, (truth, estimate)
    assert low - 0.01 <= truth <= high + 0.01, (truth, low, high)
    assert report["warnings"] == [] and report["samples_vs_unlabeled_auc"] < 0.7
    # Real items look like U already: the lowest level that passes the check is the one used.
    tried = report["samples_vs_unlabeled_auc_by_level"]
    assert list(tried)[-1] == str(report["noise_level"]) and tried[str(report["noise_level"])] <= 0.55
    assert all(auc > 0.55 for auc in list(tried.values())[:-1])
    if count:  # the sensitive items score higher than the normal ones
        assert scores[len(normal) :].mean() > scores[: len(normal)].mean() + 0.2


def test_without_beta_it_is_estimated_from_the_same_scores(parts):
    normal = parts["normal_pool"]
    count = round(0.2 * len(normal) / 0.8)
    samples = _uint8(torch.cat([normal, parts["sensitive_pool"][:count]]))
    truth = count / len(samples)
    report, _ = audit_images(samples, parts["unlabeled"], parts["sensitive"], None, QUICK)
    assert report["beta_source"] == "estimated (BBE)"
    assert abs(report["beta"] - parts["beta"]) < 0.05, report["beta"]
    assert abs(report["sensitive_share"] - truth) <= 0.25 * truth + 0.03
    low, high = report["interval"]
    assert low <= report["sensitive_share"] <= high


def test_samples_like_nothing_in_u_get_a_warning_not_a_confident_zero(parts):
    noise = np.random.default_rng(0).integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
    report, _ = audit_images(noise, parts["unlabeled"], parts["sensitive"], parts["beta"], QUICK)
    tried = report["samples_vs_unlabeled_auc_by_level"]
    assert list(tried) == [str(level) for level in LEVELS] and min(tried.values()) > 0.65
    assert report["noise_level"] == int(min(tried, key=tried.get))
    assert any("look like nothing in U" in warning for warning in report["warnings"])


def _write(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    for index, pixels in enumerate(_uint8(images)):
        Image.fromarray(pixels[..., 0]).save(folder / f"{index:04d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    _write(root / "U", parts["unlabeled"][::2])
    _write(root / "S", parts["sensitive"][::2])
    return root


def test_a_run_and_its_samples_on_disk_audit_the_same(folders, tmp_path, capsys):
    run = tmp_path / "run"
    train = ["train", "--unlabeled", str(folders / "U"), "--sensitive", str(folders / "S"), "--beta", "0.1"]
    train += ["--image-size", "8", "--channels", "1", "--steps", "4", "--batch-size", "16", "--quiet"]
    train += ["--log-every", "2", "--checkpoint-every", "2", "--sample-steps", "2", "--grid-size", "4"]
    assert main([*train, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["audit", str(run), "--num", "60", "--quiet", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((run / AUDIT).read_text())
    assert printed == report
    assert 0.0 <= report["sensitive_share"] <= 1.0 and len(report["interval"]) == 2
    assert report["beta"] == 0.1 and report["beta_source"] == "the run's"
    assert report["num_samples"] == 60 and report["sampler"] and report["sampling_seed"] == 0
    assert Image.open(run / AUDIT_GRID).size[0] > 8
    card = (run / "pipeline" / "README.md").read_text()
    assert f"about {report['sensitive_share']:.1%} of 60 samples look like S" in card

    assert main(["sample", str(run), "--num", "60", "--out", str(tmp_path / "s.npz")]) == 0
    samples = np.load(tmp_path / "s.npz")["images"]
    _write(tmp_path / "samples", torch.from_numpy(samples).permute(0, 3, 1, 2).float() / 127.5 - 1)
    given = ["--unlabeled", str(folders / "U"), "--sensitive", str(folders / "S"), "--beta", "0.1"]
    for target in (tmp_path / "s.npz", tmp_path / "samples"):
        out = tmp_path / f"audit-{target.stem}"
        assert main(["audit", str(target), *given, "--out", str(out)]) == 0
        again = json.loads((out / AUDIT).read_text())
        assert again["sensitive_share"] == report["sensitive_share"]
        assert again["interval"] == report["interval"]
        assert again["beta_source"] == "given"
    assert "look like S" in capsys.readouterr().out
    # U without S on a run would silently mix the run's S with another U: refused.
    assert main(["audit", str(run), "--unlabeled", str(folders / "U")]) == 2
    assert "together" in capsys.readouterr().err


def _bad_cases(folders: Path, tmp_path: Path) -> list:
    empty = tmp_path / "empty"
    empty.mkdir()
    wide = tmp_path / "wide"
    wide.mkdir()
    Image.fromarray(np.zeros((8, 12), dtype=np.uint8)).save(wide / "a.png")
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    whole = tmp_path / "whole.npz"
    np.savez(whole, images=np.zeros((30, 8, 8, 1), np.uint8))
    (tmp_path / "cut.npz").write_bytes(whole.read_bytes()[:100])
    few = _write(tmp_path / "few", torch.zeros(5, 1, 8, 8))
    data = ["--unlabeled", str(folders / "U"), "--sensitive", str(folders / "S")]
    out = ["--out", str(tmp_path / "out")]
    return [
        ([str(tmp_path / "nowhere"), *data, *out], "does not exist"),
        ([str(folders / "U"), *out], "give --unlabeled and --sensitive"),
        ([str(folders / "U"), *data], "give --out"),
        ([str(empty), *data, *out], "no readable image"),
        ([str(wide), *data, *out], "square"),
        ([str(tmp_path / "junk.npz"), *data, *out], "not a samples file"),
        (
            [
                str(folders / "U"),
                "--unlabeled",
                str(folders / "U"),
                "--sensitive",
                str(tmp_path / "no"),
                *out,
            ],
            "--sensitive",
        ),
        ([str(folders / "U"), *data, "--beta", "1.5", *out], "--beta must be in [0, 1)"),
        ([str(folders / "U"), *data, "--noise-level", "1000", *out], "--noise-level"),
        ([str(folders / "U"), *data, "--num", "1", *out], "--num must be >= 20"),
        ([str(tmp_path / "cut.npz"), *data, *out], "not a samples file"),
        ([str(few), *data, *out], "too few"),
        ([str(folders / "U"), *data, "--out", str(folders / "U" / "0000.png")], "is a file"),
    ]


def test_samples_of_another_shape_than_u_and_s_are_refused(parts):
    # The command line reads U and S at the samples' size (as training reads them at
    # --image-size); tensors given to the API must already agree.
    with pytest.raises(UsageError, match="of their own size"):
        audit_images(np.zeros((30, 16, 16, 1), np.uint8), parts["unlabeled"], parts["sensitive"], 0.1, QUICK)
    with pytest.raises(UsageError, match="too few"):
        audit_images(np.zeros((0, 8, 8, 1), np.uint8), parts["unlabeled"], parts["sensitive"], 0.1, QUICK)


def test_bad_input_is_one_line_and_writes_nothing(folders, tmp_path, capsys):
    for argv, message in _bad_cases(folders, tmp_path):
        capsys.readouterr()
        assert main(["audit", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
        assert not (tmp_path / "out").exists()


class _Untouchable:
    """Stands in for the hidden truth: any use of it fails the test."""

    def __getattribute__(self, name):
        raise AssertionError(f"the audit read the hidden truth (.{name})")

    def _fail(self, *args):
        raise AssertionError("the audit read the hidden truth")

    __len__ = __getitem__ = __iter__ = __bool__ = __array__ = __float__ = _fail


def test_the_audit_never_reads_the_hidden_truth(tmp_path, monkeypatch):
    """A labeled preset's split carries which items of U are sensitive and U's fine labels: the
    audit of a run works with both replaced by something that fails when read."""
    import dataclasses

    import pudm.datasets
    from pudm.audit import audit

    run = tmp_path / "run"
    train = ["train", "--preset", "digits_even", "--method", "unsupervised", "--steps", "2", "--quiet"]
    train += ["--batch-size", "16", "--log-every", "1", "--checkpoint-every", "2", "--sample-steps", "2"]
    assert main([*train, "--grid-size", "4", "--out", str(run)]) == 0
    real = pudm.datasets.split_from_config

    def hidden(config):
        split = real(config)
        assert split.unlabeled_is_sensitive is not None  # there is a truth to hide
        return dataclasses.replace(
            split, unlabeled_is_sensitive=_Untouchable(), unlabeled_labels=_Untouchable()
        )

    monkeypatch.setattr(pudm.datasets, "split_from_config", hidden)
    report = audit(run, num=40, steps=2, config=QUICK)
    assert report["num_unlabeled"] > 0 and report["beta_source"] == "the run's"
