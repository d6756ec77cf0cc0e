"""Evaluation classifier, metrics, the filter baseline and the benchmark, through the real CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tree_digest
from pudm import methods
from pudm.classifier import Classifier, FitConfig, train_for_config
from pudm.cli import main
from pudm.config import RunConfig, preset
from pudm.datasets import split_from_config
from pudm.evaluation import classifier_fid, inception_fid, wilson_interval
from pudm.filtering import filter_report, keep_mask, sensitive_scores
from pudm.runs import RunError
from pudm.sampling import to_uint8

TINY = ["--steps", "4", "--batch-size", "16", "--checkpoint-every", "2", "--log-every", "2", "--quiet"]
TINY += ["--sample-steps", "3", "--grid-size", "4", "--filter-folds", "2", "--filter-epochs", "1"]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clf") / "digits_even"
    assert main(["classifier", "train", "--preset", "digits_even", "--epochs", "8", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "pu"
    assert main(["train", "--out", str(out), *TINY]) == 0
    return out


def test_wilson_interval_matches_hand_computed_values():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(1000, 1000)
    assert high == 1.0 and 0.99 < low < 1.0
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_classifier_learns_digits_and_round_trips(classifier_dir):
    classifier = Classifier.load(classifier_dir)
    info = classifier.info
    assert info.preset == "digits_even" and info.normal_classes == (0, 2, 4, 6, 8)
    assert info.heldout_accuracy > 0.9, "8 epochs of the small CNN separate the digits"
    split = split_from_config(preset("digits_even"))
    test = to_uint8(split.test)
    predicted = classifier.predict(test)
    assert classifier.is_normal(predicted).mean() > 0.9, "the test split holds normal (even) digits only"
    config = json.loads((classifier_dir / "config.json").read_text())
    assert config["kind"] == "pudm-classifier" and config["num_heldout"] + config["num_train"] == 1797


def test_classifier_reports_its_recall_per_class_and_of_sensitive_items(classifier_dir):
    """The stored recalls are those of the held-out 20%, recomputed here from the same split."""
    from pudm.classifier import predict_proba, stratified_holdout
    from pudm.datasets import load_digits_source

    classifier = Classifier.load(classifier_dir)
    info = classifier.info
    source = load_digits_source()
    _, held = stratified_holdout(source.labels, 0.2, info.seed)
    truth = source.labels[held].numpy()
    predicted = predict_proba(classifier.model, source.images[held]).argmax(-1).numpy()
    for c in range(10):
        assert info.heldout_class_recall[c] == pytest.approx(float(np.mean(predicted[truth == c] == c)))
    odd = truth % 2 == 1
    assert info.heldout_sensitive_recall == pytest.approx(
        float(np.mean(~classifier.is_normal(predicted[odd])))
    )
    assert info.heldout_sensitive_recall > 0.9


def test_pixel_frechet_distance_shares_no_judge_and_sees_pixel_defects(classifier_dir):
    """Zero for identical sets, larger for worse copies; and it sees a defect (a constant offset
    of the background) that changes the pixels a lot."""
    from pudm.evaluation import pixel_fid

    real = to_uint8(split_from_config(preset("digits_even")).test)
    assert abs(pixel_fid(real, real)) < 1e-6
    generator = np.random.default_rng(0)
    slightly = np.clip(real.astype(int) + generator.integers(-10, 11, real.shape), 0, 255).astype(np.uint8)
    badly = np.clip(real.astype(int) + generator.integers(-60, 61, real.shape), 0, 255).astype(np.uint8)
    assert 0 < pixel_fid(real, slightly) < pixel_fid(real, badly)
    grey_background = np.maximum(real, 60).astype(np.uint8)
    assert pixel_fid(real, grey_background) > pixel_fid(real, slightly)


def test_fid_is_zero_for_identical_sets_and_grows_with_distortion(classifier_dir):
    classifier = Classifier.load(classifier_dir)
    real = to_uint8(split_from_config(preset("digits_even")).test)
    same = classifier_fid(classifier, real, real)
    assert abs(same) < 1e-3
    generator = np.random.default_rng(0)
    noisy = np.clip(real.astype(int) + generator.integers(-40, 41, real.shape), 0, 255).astype(np.uint8)
    blank = np.zeros_like(real)
    blank[:, 2:6, 2:6] = generator.integers(0, 255, (len(real), 4, 4, 1))
    assert 0 < classifier_fid(classifier, real, noisy) < classifier_fid(classifier, real, blank)


def test_inception_fid_without_torch_fidelity_names_the_fix():
    pytest.importorskip("torchmetrics")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        images = np.zeros((4, 8, 8, 1), np.uint8)
        with pytest.raises(ValueError, match="torch-fidelity"):
            inception_fid(images, images)
    else:
        pytest.skip("torch-fidelity is installed here; the offline message is tested without it")


def test_keep_mask_drops_exactly_the_beta_share_with_the_highest_scores():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.0, 0.7, 0.4, 0.5, 0.6])
    keep = keep_mask(scores, 0.3)
    assert keep.tolist() == [True, False, True, False, True, True, False, True, True, True]
    assert keep_mask(scores, 0.0).all()
    report = filter_report(keep, torch.tensor([False, True, False, False] + [False] * 6))
    assert report["num_dropped"] == 3 and report["dropped_truly_sensitive"] == 1
    assert report["recall"] == 1.0 and report["precision"] == pytest.approx(1 / 3)


def test_sensitive_scores_find_the_hidden_sensitive_items():
    generator = torch.Generator().manual_seed(0)
    normal = -1 + 0.2 * torch.rand(60, 1, 8, 8, generator=generator)
    sensitive_like = 0.8 + 0.2 * torch.rand(40, 1, 8, 8, generator=generator)
    unlabeled = torch.cat([normal, sensitive_like[:6]])  # 6 hidden sensitive items at the end
    scores = sensitive_scores(unlabeled, sensitive_like[6:], folds=3, fit_config=FitConfig(epochs=15))
    dropped = ~keep_mask(scores, 6 / 66)
    assert dropped[-6:].all() and not dropped[:-6].any()
    with pytest.raises(ValueError, match="S is empty"):
        sensitive_scores(unlabeled, sensitive_like[:0])


def test_filter_method_trains_without_the_dropped_items(tmp_path):
    out = tmp_path / "filter"
    assert main(["train", "--out", str(out), "--method", "filter", *TINY, "--filter-epochs", "6"]) == 0
    report = json.loads((out / "filter.json").read_text())
    assert report["num_dropped"] == round(0.1 * 825) and report["num_kept"] == 825 - report["num_dropped"]
    assert len(report["kept_indices"]) == report["num_kept"]
    assert "dropped_truly_sensitive" not in report and "recall" not in report, (
        "training never reads the truth"
    )
    # Judged as the evaluator judges it: the dropped items are mostly the hidden odd digits.
    hidden = split_from_config(preset("digits_even")).unlabeled_is_sensitive
    kept = torch.zeros(825, dtype=torch.bool)
    kept[report["kept_indices"]] = True
    judged = filter_report(kept, hidden)
    # (random drops would give about 0.09 for both)
    assert judged["recall"] > 0.6 and judged["precision"] > 0.6, judged
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["sensitive_per_batch"] == 0, "filter trains on the kept part of U alone"
    # A resumed run reads the stored mask instead of recomputing it; a foreign mask is refused.
    config = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
    split = split_from_config(config)
    keep = methods.get("filter").prepare(config, split, out)
    assert int(keep.sum()) == report["num_kept"] and keep[report["kept_indices"]].all()
    (out / "filter.json").write_text(json.dumps({**report, "kept_indices": [10**6]}))
    with pytest.raises(RunError, match="delete it to recompute"):
        methods.get("filter").prepare(config, split, out)


def test_evaluate_writes_eval_json(run_dir, classifier_dir, capsys):
    args = ["evaluate", str(run_dir), "--classifier", str(classifier_dir), "--num", "24", "--quiet"]
    assert main([*args, "--sample-steps", "3"]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    histogram = result["class_histogram"]
    assert sum(histogram) == 24 and len(histogram) == 10
    # The rate is the share of samples the judge calls even, with its Wilson interval.
    even = sum(histogram[c] for c in (0, 2, 4, 6, 8))
    assert result["non_sensitive_rate"] == pytest.approx(even / 24)
    assert result["non_sensitive_rate_95ci"] == pytest.approx(list(wilson_interval(even, 24)))
    # The FID is that of these very samples (same pipeline, sampler and seed) against the test split.
    from pudm.models import load_pipeline
    from pudm.sampling import generate

    pipeline = load_pipeline(run_dir / "pipeline")
    samples = generate(pipeline.unet, pipeline.scheduler.config, num=24, steps=3, seed=0, show_progress=False)
    classifier = Classifier.load(classifier_dir)
    assert classifier.is_normal(classifier.predict(samples)).sum() == even
    real = to_uint8(split_from_config(preset("digits_even")).test)
    assert result["fid_classifier"] == pytest.approx(classifier_fid(classifier, real, samples), rel=1e-4)
    assert result["fid_classifier_name"] == "FID (classifier features)"
    assert result["sampler"] == "dpm-sde" and result["sampling_steps"] == 3 and result["num_samples"] == 24
    assert result["classifier"]["fingerprint"] == Classifier.load(classifier_dir).fingerprint()
    assert (run_dir / "eval_samples.png").is_file()
    assert "non-sensitive rate" in capsys.readouterr().out
    # Same settings, same numbers.
    assert main([*args, "--sample-steps", "3"]) == 0
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["non_sensitive_rate"] == result["non_sensitive_rate"]
    assert again["fid_classifier"] == pytest.approx(result["fid_classifier"])


def test_evaluate_bad_input(tmp_path, run_dir, classifier_dir, capsys):
    odd = tmp_path / "odd"
    Classifier(*_odd_classifier()).save(odd)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((run_dir / "config.json").read_text())
    cases = [
        ([str(run_dir), "--classifier", str(classifier_dir), "--num", "0"], "--num must be > 0"),
        (
            [str(run_dir), "--classifier", str(odd)],
            "train one with pudm classifier train --preset digits_even",
        ),
        ([str(unfinished), "--classifier", str(classifier_dir)], "has no pipeline/"),
        ([str(tmp_path / "missing"), "--classifier", str(classifier_dir)], "does not exist"),
        ([str(run_dir), "--classifier", str(tmp_path)], "not a pudm classifier folder"),
    ]
    before = tree_digest(run_dir)
    for args, message in cases:
        assert main(["evaluate", *args, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert tree_digest(run_dir) == before, "a refused evaluation writes nothing"
    # The benchmark refuses the wrong classifier before it writes anything.
    assert main(["benchmark", "--classifier", str(odd), "--out", str(tmp_path / "bench"), "--quiet"]) == 2
    assert "trained for digits_odd" in capsys.readouterr().err and not (tmp_path / "bench").exists()
    # A trained classifier is not replaced without --overwrite.
    classifier_before = tree_digest(classifier_dir)
    assert main(["classifier", "train", "--out", str(classifier_dir), "--epochs", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err and tree_digest(classifier_dir) == classifier_before


def _odd_classifier():
    config = preset("digits_odd")
    classifier = train_for_config(config, fit_config=FitConfig(epochs=1))
    return classifier.model, classifier.info


def test_corrupt_classifier_is_refused(tmp_path, classifier_dir, run_dir, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((classifier_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["evaluate", str(run_dir), "--classifier", str(broken), "--quiet"]) == 2
    assert "could not be loaded" in capsys.readouterr().err


def test_benchmark_writes_tables_and_plots_and_resumes(tmp_path, classifier_dir, capsys):
    out = tmp_path / "bench"
    args = [
        "benchmark",
        "--methods",
        "unsupervised,pu,filter",
        "--seeds",
        "0,1",
        "--steps",
        "2",
        "--num",
        "12",
    ]
    args += ["--classifier", str(classifier_dir), "--out", str(out), "--sample-steps", "2", "--quiet"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["cells"]) == sorted(
        f"{method}-seed{seed}" for method in ("unsupervised", "pu", "filter") for seed in (0, 1)
    )
    rows = {row["method"]: row for row in results["summary"]}
    for row in rows.values():
        values = row["non_sensitive_rate_per_seed"]
        assert row["non_sensitive_rate_mean"] == pytest.approx(np.mean(values))
        assert row["non_sensitive_rate_std"] == pytest.approx(np.std(values, ddof=1))
    assert "dropped_truly_sensitive" in results["cells"]["filter-seed0"]["filter"]
    trained = results["cells"]["pu-seed1"]["training"]
    assert trained["steps"] == 2 and trained["seconds"] > 0
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 3 and "| pu | 2 |" in table
    from PIL import Image

    for plot in ("grids.png", "rate_vs_fid.png", "training_curves.png"):
        picture = np.asarray(Image.open(out / plot).convert("L"), dtype=float)
        assert picture.std() > 10, f"{plot} is blank"
    assert "| filter | 2 |" in capsys.readouterr().out

    # Re-running reuses every finished cell; a cell cut short (no summary, no eval) is redone alone.
    before = tree_digest(out / "runs")
    assert main(args) == 0
    assert tree_digest(out / "runs") == before
    (out / "runs" / "pu-seed1" / "summary.json").unlink()
    (out / "runs" / "pu-seed1" / "eval.json").unlink()
    assert main(args) == 0
    after = tree_digest(out / "runs")
    assert {k: v for k, v in after.items() if not k.startswith("pu-seed1")} == {
        k: v for k, v in before.items() if not k.startswith("pu-seed1")
    }
    assert (out / "runs" / "pu-seed1" / "eval.json").is_file()

    # An evaluation made under another seed scheme (other samples for the same seed) is redone.
    stale = out / "runs" / "filter-seed0" / "eval.json"
    record = json.loads(stale.read_text())
    record["sampling_seeds"] = "older"
    stale.write_text(json.dumps(record))
    assert main(args) == 0
    assert json.loads(stale.read_text())["sampling_seeds"] != "older"

    # A fresh clone holds results.json, not the runs: a cell with no run folder is taken from
    # results.json when it records the same config and evaluation; the grids, drawn from run
    # folders, are kept rather than redrawn with a hole where a method has none left.
    import shutil

    recorded = json.loads((out / "results.json").read_text())
    grids = (out / "grids.png").read_bytes()
    for seed in (0, 1):
        shutil.rmtree(out / "runs" / f"unsupervised-seed{seed}")
    assert main(args) == 0
    assert not (out / "runs" / "unsupervised-seed0").exists()
    assert not (out / "runs" / "unsupervised-seed1").exists()
    again = json.loads((out / "results.json").read_text())
    assert again["cells"] == recorded["cells"] and again["summary"] == recorded["summary"]
    assert (out / "grids.png").read_bytes() == grids
    # A recorded config that is not the cell's own is trained again.
    recorded["cells"]["unsupervised-seed0"]["config"]["train"]["learning_rate"] *= 2
    (out / "results.json").write_text(json.dumps(recorded))
    assert main(args) == 0
    assert (out / "runs" / "unsupervised-seed0" / "eval.json").is_file()


def test_benchmark_audits_every_cell_when_asked(tmp_path, classifier_dir, capsys):
    out = tmp_path / "audited"
    args = ["benchmark", "--methods", "unsupervised", "--seeds", "0", "--steps", "2", "--num", "24"]
    args += ["--classifier", str(classifier_dir), "--out", str(out), "--sample-steps", "2", "--quiet"]
    args.append("--audit")
    assert main(args) == 0
    cell = json.loads((out / "results.json").read_text())["cells"]["unsupervised-seed0"]
    stored = json.loads((out / "runs" / "unsupervised-seed0" / "audit.json").read_text())
    assert cell["audit"]["sensitive_share"] == stored["sensitive_share"] and stored["num_samples"] == 24
    assert "audited without labels |" in (out / "table.md").read_text()
    assert "audited without labels" in capsys.readouterr().out
    # Re-running reuses the audit made with the same samples.
    before = (out / "runs" / "unsupervised-seed0" / "audit.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "runs" / "unsupervised-seed0" / "audit.json").stat().st_mtime_ns == before


def test_benchmark_beta_sweep_and_bad_input(tmp_path, classifier_dir, capsys):
    out = tmp_path / "sweep"
    args = [
        "benchmark",
        "--methods",
        "unsupervised,pu",
        "--seeds",
        "0",
        "--betas",
        "0.05,0.3",
        "--steps",
        "2",
    ]
    args += [
        "--num",
        "8",
        "--classifier",
        str(classifier_dir),
        "--out",
        str(out),
        "--sample-steps",
        "2",
        "--quiet",
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["cells"]) == ["pu-beta0.05-seed0", "pu-beta0.3-seed0", "unsupervised-seed0"]
    assert results["cells"]["pu-beta0.3-seed0"]["beta"] == 0.3
    capsys.readouterr()
    cases = [
        (["--methods", "pu,magic"], "unknown method 'magic'"),
        (["--betas", "0.1,1.5"], "beta must be in [0, 1)"),
        (["--num", "0"], "--num must be > 0"),
        (["--preset", "nope"], "unknown preset 'nope'"),
    ]
    for extra, message in cases:
        assert main(["benchmark", "--out", str(tmp_path / "bad"), "--quiet", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "bad").exists()


def test_demo_is_the_quick_benchmark(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(["demo", "--out", str(out), "--steps", "2", "--num", "8", "--sample-steps", "2", "--quiet"]) == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["unsupervised", "pu", "filter"] and results["seeds"] == [0]
    assert (out / "classifier" / "model.safetensors").is_file()
    assert "non-sensitive rate" in capsys.readouterr().out


def test_resnet_classifier_trains_saves_and_starts_from_weights(tmp_path):
    import torchvision

    from pudm.classifier import ClassifierInfo, build_classifier, fit, load_backbone_weights

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 32, 32, generator=generator) * 2 - 1
    labels = torch.tensor([0, 1] * 4)
    model = build_classifier("resnet18", channels=3, num_classes=2, image_size=32)
    assert model.features(images[:2]).shape == (2, 512)
    # ImageNet-style weights from a local file: every backbone tensor of matching shape is copied.
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    load_backbone_weights(model, tmp_path / "resnet18.pth")
    assert torch.equal(model.net.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable state dict"):
        load_backbone_weights(model, tmp_path / "junk.pth")
    fit(model, images, labels, FitConfig(epochs=1, batch_size=4))
    info = ClassifierInfo("resnet18", 2, 3, 32, 512, "folder", (0,), "custom", 0.5, 0.5, 8, 0, 1, 0)
    Classifier(model, info).save(tmp_path / "clf")
    loaded = Classifier.load(tmp_path / "clf")
    uint8 = to_uint8(images)
    assert (loaded.predict(uint8) == Classifier(model, info).predict(uint8)).all()
    with pytest.raises(ValueError, match="do not fit a classifier"):
        loaded.predict(uint8[:, :16, :16])


def test_the_model_card_tells_what_the_run_is_and_follows_its_evaluation(classifier_dir, tmp_path):
    out = tmp_path / "run"
    assert (
        main(["train", "--out", str(out), *TINY, "--num-unlabeled-sensitive", "37", "--num-sensitive", "123"])
        == 0
    )
    card = (out / "pipeline" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "- pudm" in card
    config = json.loads((out / "config.json").read_text())
    assert f"| method | {config['train']['method']} |" in card
    assert f"| beta (share of sensitive items in U) | {config['train']['beta']} (given) |" in card
    assert (
        "| S (labeled sensitive) | 123 |" in card
        and "| U (unlabeled, may hide sensitive items) | 787 |" in card
    )
    assert "37" not in card, "the hidden truth of the split never goes into a card"
    assert "Not evaluated yet" in card and "suppressed and measured, not proven impossible" in card
    assert main(["evaluate", str(out), "--classifier", str(classifier_dir), "--num", "50", "--quiet"]) == 0
    card = (out / "pipeline" / "README.md").read_text()
    report = json.loads((out / "eval.json").read_text())
    assert "Not evaluated yet" not in card
    assert f"| non-sensitive rate | {report['non_sensitive_rate']:.3f}" in card
    assert f"| FID (classifier features) | {report['fid_classifier']:.2f} |" in card
    # The card is part of the pipeline folder diffusers loads; it loads as before.
    from diffusers import DDPMPipeline

    assert DDPMPipeline.from_pretrained(out / "pipeline").unet is not None


def test_training_time_sums_the_log_ticks(tmp_path):
    from pudm.benchmark import training_time

    assert training_time(tmp_path) is None
    rows = [
        {"step": 50, "steps_per_second": 5.0, "loss": 1.0},
        {"step": 100, "steps_per_second": 2.0},  # replaced by the resumed run's tick below
        {"step": 100, "steps_per_second": 10.0},
        {"step": 100, "eval": "no speed in this row"},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    assert training_time(tmp_path) == {"steps": 100, "seconds": 15.0, "steps_per_second": 6.67}
