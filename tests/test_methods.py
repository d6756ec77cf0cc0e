"""Beyond the paper: pu-bounded, weighted, reject and the warm start, each against what it must do."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pudm import objective
from pudm.classifier import FitConfig
from pudm.cli import main
from pudm.filtering import Rejector, platt_scaling, sample_with_rejection, soft_weights, weights_report

LOSS = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
SENSITIVE = torch.tensor([False, False, False, True, True, True])
HIGH = torch.tensor([True, False, True, True, False, True])  # U: 1 and 3 high, 2 low; S: 4, 6 high


def h(value: float) -> float:
    return -math.log(1.0 - math.exp(-value))


# -- objectives by hand ------------------------------------------------------------------------


def test_weighted_by_hand():
    weights = torch.tensor([0.5, 1.0, 0.0, 0.3, 0.3, 0.3], dtype=torch.float64)
    out = objective("weighted", LOSS, SENSITIVE, weights=weights)
    # U items only: (0.5 * 1 + 1 * 2 + 0 * 3) / (0.5 + 1 + 0); S items are ignored.
    assert out.loss.item() == pytest.approx(2.5 / 1.5)
    assert out.mean_unlabeled_loss.item() == pytest.approx(2.0)  # logged unweighted
    ones = objective("weighted", LOSS, SENSITIVE, weights=torch.ones(6, dtype=torch.float64))
    assert ones.loss.item() == pytest.approx(objective("unsupervised", LOSS, SENSITIVE).loss.item())


def test_weighted_all_zero_weights_train_nothing():
    loss = LOSS.clone().requires_grad_()
    out = objective("weighted", loss, SENSITIVE, weights=torch.zeros(6, dtype=torch.float64))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.equal(loss.grad, torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("correction", ["abs", "nn"])
def test_pu_bounded_by_hand(correction):
    beta = 0.5
    # High noise: U {1, 3}, S {4, 6}; low: U {2} (unsupervised), S {5} (not used).
    positive = beta * (h(4.0) + h(6.0)) / 2
    bracket = (1.0 + 3.0) / 2 - beta * (4.0 + 6.0) / 2  # = -0.5: the correction fires
    pu_high = positive + abs(bracket) if correction == "abs" else positive + max(bracket, 0.0)
    expected = (2.0 + 2 * pu_high) / 3
    out = objective("pu-bounded", LOSS, SENSITIVE, beta=beta, correction=correction, high_noise=HIGH)
    assert out.risk.item() == pytest.approx(expected)
    assert out.negative_risk.item() == pytest.approx(bracket)
    assert out.positive_risk.item() == pytest.approx(positive)
    assert bool(out.corrected)
    if correction == "nn":  # steps on -bracket for the high-noise part
        assert out.loss.item() == pytest.approx((2.0 + 2 * -bracket) / 3)


def test_pu_bounded_gradients_leave_low_noise_sensitive_items_alone():
    loss = LOSS.clone().requires_grad_()
    objective("pu-bounded", loss, SENSITIVE, beta=0.1, high_noise=HIGH).loss.backward()
    assert loss.grad[4] == 0.0, "an S item below t0 takes no part"
    assert loss.grad[1] == pytest.approx(1 / 3), "a U item below t0 is trained as unsupervised"
    assert loss.grad[3] < 0 and loss.grad[5] < 0, "S items above t0 are ascended"


@pytest.mark.parametrize("correction", ["abs", "nn"])
@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_pu_bounded_is_pu_above_every_item_and_unsupervised_below(correction, beta):
    everything, nothing = torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)
    results = {}
    for name, method, extra in (
        ("pu", "pu", {}),
        ("bounded-all", "pu-bounded", {"high_noise": everything}),
        ("unsupervised", "unsupervised", {}),
        ("bounded-none", "pu-bounded", {"high_noise": nothing}),
    ):
        loss = LOSS.clone().requires_grad_()
        out = objective(method, loss, SENSITIVE, beta=beta, correction=correction, **extra)
        out.loss.backward()
        results[name] = (out.loss.item(), out.risk.item(), loss.grad)
    for a, b in (("pu", "bounded-all"), ("unsupervised", "bounded-none")):
        assert results[a][0] == pytest.approx(results[b][0])
        assert results[a][1] == pytest.approx(results[b][1])
        torch.testing.assert_close(results[a][2], results[b][2])


def test_extra_inputs_belong_to_their_method():
    with pytest.raises(ValueError, match="weights"):
        objective("pu", LOSS, SENSITIVE, weights=torch.ones(6))
    with pytest.raises(ValueError, match="weights"):
        objective("weighted", LOSS, SENSITIVE)
    with pytest.raises(ValueError, match="high_noise"):
        objective("pu-bounded", LOSS, SENSITIVE)
    with pytest.raises(ValueError, match="shape"):
        objective("pu-bounded", LOSS, SENSITIVE, high_noise=torch.ones(5, dtype=torch.bool))


# -- weighted: calibration and planted items -------------------------------------------------------


def test_platt_scaling_recovers_an_overconfident_scale():
    generator = torch.Generator().manual_seed(0)
    truth = torch.randn(40_000, generator=generator) * 2
    labels = torch.rand(40_000, generator=generator) < torch.sigmoid(truth)
    overconfident = 3.0 * truth
    a, b = platt_scaling(overconfident[~labels], overconfident[labels])
    assert a == pytest.approx(1 / 3, rel=0.05)
    assert abs(b) < 0.05


def _planted(num_normal: int, num_sensitive: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 grey images: normal ones bright top-left, sensitive ones bright bottom-right."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(num_normal + num_sensitive, 1, 8, 8, generator=generator) * 0.6 - 1.0
    images[:num_normal, :, :4, :4] += 1.2
    images[num_normal:, :, 4:, 4:] += 1.2
    is_sensitive = torch.arange(len(images)) >= num_normal
    return images, is_sensitive


def test_weights_are_one_minus_beta_times_a_ratio_calibrated_to_what_is_known_of_it(monkeypatch):
    """Scores that overlap (so that many ratios fall between 0 and 1 / beta, where beta matters):
    w = clip(1 - beta r), r <= 1 / beta, mean r over U = 1 (so mean w = 1 - beta where none clip)."""
    import pudm.filtering as filtering

    logit_u, logit_s = torch.linspace(-4, 4, 200), torch.linspace(-1, 6, 50)
    monkeypatch.setattr(filtering, "out_of_fold_logits", lambda *args, **kwargs: (logit_u, logit_s))
    beta = 0.2
    soft = soft_weights(torch.zeros(200, 1, 8, 8), torch.zeros(50, 1, 8, 8), beta=beta)
    ratios = soft.ratios
    assert int(((ratios > 0.5) & (ratios < 4.5)).sum()) > 40, "the check needs ratios where beta matters"
    torch.testing.assert_close(soft.weights, (1 - beta * ratios).clamp(0, 1), rtol=0, atol=1e-6)
    assert float(ratios.max()) < 1 / beta and float(ratios.mean()) == pytest.approx(1.0, abs=1e-4)
    assert bool((soft.weights.diff() <= 0).all()), "a higher score, never a higher weight"
    assert soft.summary()["mean_clipped_ratio"] == pytest.approx(1.0, abs=1e-4)


def test_soft_weights_remove_planted_sensitive_items_and_keep_normal_ones():
    unlabeled, hidden = _planted(90, 10, seed=0)
    sensitive, _ = _planted(0, 40, seed=1)
    soft = soft_weights(unlabeled, sensitive, beta=0.1, folds=2, fit_config=FitConfig(epochs=15))
    weights = soft.weights
    assert weights.shape == (100,) and bool(((weights >= 0) & (weights <= 1)).all())
    # w = 1 - beta r, r = p_S / p_U at most 1 / beta on U: the planted items reach the ceiling.
    torch.testing.assert_close(weights, (1 - 0.1 * soft.ratios).clamp(0, 1), rtol=0, atol=1e-6)
    assert float(soft.ratios.max()) <= 1 / 0.1 + 1e-4
    assert float(soft.ratios.clamp(max=10).mean()) == pytest.approx(1.0, abs=1e-3), "E_U[r] = 1"
    report = weights_report(weights, hidden)
    assert report["mean_weight_hidden_sensitive"] <= 0.10, report
    assert report["mean_weight_hidden_normal"] >= 0.90, report
    # Soft, not a relabelled hard mask: better than filter's 0/1 mask in Brier score on this data.
    brier = float(((1 - weights) - hidden.float()).pow(2).mean())
    assert brier < 0.05, brier


# -- reject -------------------------------------------------------------------------------------------


class _BrightRejector:
    """Flags images whose mean pixel is above 127: about half of uniform noise."""

    class info:  # noqa: N801 - what sample_with_rejection reads of a rejector
        beta, threshold = 0.5, 127.0

    def flags(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).mean(1) > 127.0


def _draw(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, 4, 4, 1), dtype=np.uint8)


def test_rejection_never_returns_a_flagged_sample_and_repeats():
    rejector = _BrightRejector()
    images, report = sample_with_rejection(_draw, rejector, num=300)
    assert images.shape == (300, 4, 4, 1)
    assert not rejector.flags(images).any()
    assert report["num_drawn"] >= 300 and 0.3 < report["rejected_share"] < 0.7
    again, _ = sample_with_rejection(_draw, rejector, num=300)
    assert np.array_equal(images, again), "same call, same images"


def test_rejection_gives_up_with_a_usage_error_when_everything_is_flagged():
    from pudm import UsageError

    class Everything(_BrightRejector):
        def flags(self, images):
            return np.ones(len(images), dtype=bool)

    with pytest.raises(UsageError, match="sensitive samples almost only"):
        sample_with_rejection(_draw, Everything(), num=10)


def test_rejector_flags_the_planted_pattern_and_survives_save_and_load(tmp_path):
    unlabeled, hidden = _planted(90, 10, seed=0)
    sensitive, _ = _planted(0, 40, seed=1)
    rejector = Rejector.fit(unlabeled, sensitive, beta=0.1, folds=2, fit_config=FitConfig(epochs=15))
    fresh_normal, fresh_sensitive = _planted(50, 0, seed=5)[0], _planted(0, 50, seed=6)[0]
    as_uint8 = lambda x: ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
    assert rejector.flags(as_uint8(fresh_sensitive)).mean() > 0.9
    assert rejector.flags(as_uint8(fresh_normal)).mean() < 0.2
    rejector.save(tmp_path / "rejector")
    loaded = Rejector.load(tmp_path / "rejector")
    assert loaded.info == rejector.info
    np.testing.assert_array_equal(
        loaded.scores(as_uint8(fresh_normal)), rejector.scores(as_uint8(fresh_normal))
    )


TINY = ["--batch-size", "8", "--quiet", "--sample-steps", "2", "--grid-size", "4", "--filter-epochs", "1"]


def test_reject_run_samples_only_what_its_rejector_keeps(tmp_path):
    out = tmp_path / "reject"
    assert main(["train", "--method", "reject", "--steps", "4", "--out", str(out), *TINY]) == 0
    assert (out / "rejector" / "config.json").is_file()
    assert main(["sample", str(out), "--num", "40", "--steps", "2", "--out", str(tmp_path / "s.npz")]) == 0
    images = np.load(tmp_path / "s.npz")["images"]
    assert len(images) == 40
    assert not Rejector.load(out / "rejector").flags(images).any()


# -- weighted and the warm start through the real loop ------------------------------------------------


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("steps_per_second", "images_per_second")} for r in rows]


def test_weighted_with_unit_weights_trains_exactly_as_unsupervised(tmp_path, monkeypatch):
    from pudm.methods.weighted import Weighted

    args = ["--steps", "4", "--log-every", "1", *TINY]
    assert main(["train", "--method", "unsupervised", "--out", str(tmp_path / "u"), *args]) == 0
    monkeypatch.setattr(Weighted, "fit", lambda self, config, split, device: {"weights": [1.0] * 825})
    assert main(["train", "--method", "weighted", "--out", str(tmp_path / "w1"), *args]) == 0
    assert [m["loss"] for m in _metrics(tmp_path / "w1")] == [m["loss"] for m in _metrics(tmp_path / "u")]
    # Weights that drop half of U change the loss trace: the weights reach the objective.
    monkeypatch.setattr(
        Weighted, "fit", lambda self, config, split, device: {"weights": [k % 2 * 1.0 for k in range(825)]}
    )
    assert main(["train", "--method", "weighted", "--out", str(tmp_path / "w2"), *args]) == 0
    assert [m["loss"] for m in _metrics(tmp_path / "w2")] != [m["loss"] for m in _metrics(tmp_path / "u")]


def test_weighted_run_writes_its_weights_without_the_hidden_truth(tmp_path):
    out = tmp_path / "weighted"
    assert main(["train", "--method", "weighted", "--steps", "2", "--out", str(out), *TINY]) == 0
    stored = json.loads((out / "weights.json").read_text())
    assert len(stored["weights"]) == 825 and all(0.0 <= w <= 1.0 for w in stored["weights"])
    assert not any("sensitive" in key and "hidden" in key for key in stored), "no truth in training output"


def test_warm_start_switches_objective_exactly_at_step_n_and_resumes_across_it(tmp_path):
    args = ["--method", "pu", "--steps", "6", "--warm-start-steps", "3", "--log-every", "1"]
    args += ["--checkpoint-every", "2", "--keep-checkpoints", "5", *TINY]
    full = tmp_path / "full"
    assert main(["train", "--out", str(full), *args]) == 0
    rows = _metrics(full)
    # Unsupervised: the logged bracket is mean_U l; PU: mean_U l - beta mean_S l.
    for row in rows:
        unsupervised = row["bracket"] == row["mean_unlabeled_loss"]
        assert unsupervised == (row["step"] <= 3), row
    # Resume from the step-2 checkpoint, before the switch.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for name in ("pipeline", "summary.json", "samples.png"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for checkpoint in (resumed / "checkpoints").iterdir():
        if checkpoint.name != "step_00000002":
            shutil.rmtree(checkpoint)
    assert main(["train", "--out", str(resumed), "--resume", "--quiet"]) == 0
    assert _metrics(resumed) == rows
    weights = "pipeline/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(full / weights), load_file(resumed / weights)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_warm_start_on_a_method_without_s_is_a_usage_error(tmp_path, capsys):
    code = main(["train", "--method", "filter", "--warm-start-steps", "2", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "--warm-start-steps: method filter" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "pu-bounded", "--pu-min-timestep", "2000"], "--pu-min-timestep must be in [0, 1000]"),
        (["--method", "pu", "--steps", "5", "--warm-start-steps", "5"], "--warm-start-steps must be in"),
        (["--method", "weighted", "--filter-folds", "1"], "--filter-folds must be >= 2"),
    ],
)
def test_bad_values_of_the_new_flags_are_one_line(tmp_path, capsys, argv, message):
    assert main(["train", "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_reject_trains_exactly_as_unsupervised_and_the_benchmark_reuses_the_twin(tmp_path):
    from pudm.benchmark import from_twin
    from pudm.config import preset

    args = ["--steps", "4", "--seed", "1", *TINY]
    assert main(["train", "--method", "unsupervised", "--out", str(tmp_path / "u"), *args]) == 0
    assert main(["train", "--method", "reject", "--out", str(tmp_path / "r"), *args]) == 0
    weights = "pipeline/unet/diffusion_pytorch_model.safetensors"
    trained = [load_file(tmp_path / run / weights) for run in ("u", "r")]
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])

    config = json.loads((tmp_path / "r" / "config.json").read_text())
    from pudm.config import RunConfig

    reject = RunConfig.from_dict(config)
    assert from_twin(reject, tmp_path / "copied", tmp_path / "u")
    copied = load_file(tmp_path / "copied" / weights)
    assert all(torch.equal(copied[k], trained[1][k]) for k in copied)
    assert json.loads((tmp_path / "copied" / "summary.json").read_text())["trained_as"] == "u"
    assert (
        Rejector.load(tmp_path / "copied" / "rejector").info
        == Rejector.load(tmp_path / "r" / "rejector").info
    )
    # Another seed is not a twin: nothing is written.
    other = preset("digits_even")
    other.train.method, other.train.seed = "reject", 2
    assert not from_twin(other, tmp_path / "not", tmp_path / "u")
    assert not (tmp_path / "not").exists()


def test_too_few_s_items_for_the_folds_fail_before_an_overwrite_touches_the_old_run(tmp_path, capsys):
    from conftest import tree_digest

    out = tmp_path / "run"
    assert main(["train", "--method", "unsupervised", "--steps", "2", "--out", str(out), *TINY]) == 0
    before = tree_digest(out)
    argv = ["train", "--method", "weighted", "--num-sensitive", "3", "--overwrite", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--filter-folds must be in [2, 3] for method weighted" in err and "Traceback" not in err
    assert tree_digest(out) == before, "the old run is untouched"


def test_rejection_may_return_fewer_when_asked_and_a_damaged_rejector_is_one_line(tmp_path):
    from pudm import UsageError

    class Everything(_BrightRejector):
        def flags(self, images):
            return np.ones(len(images), dtype=bool)

    images, report = sample_with_rejection(_draw, Everything(), num=10, allow_fewer=True)
    assert len(images) == 0 and report["rejected_share"] == 1.0
    with pytest.raises(UsageError, match="--num must be > 0"):
        sample_with_rejection(_draw, _BrightRejector(), num=0)
    unlabeled, _ = _planted(20, 4, seed=0)
    sensitive, _ = _planted(0, 10, seed=1)
    Rejector.fit(unlabeled, sensitive, beta=0.1, folds=2, fit_config=FitConfig(epochs=1)).save(
        tmp_path / "rej"
    )
    (tmp_path / "rej" / "fold1.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="is not a readable rejector"):
        Rejector.load(tmp_path / "rej")
