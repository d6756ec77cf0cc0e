"""Fashion-MNIST: the IDX reader on files the tests write (gzipped and plain, torchvision's layout
and Debian's flat folder), the two presets' splits, and the bad input a user can give."""

import gzip
import sys

import numpy as np
import pytest
import torch

from conftest import tree_digest
from dataset_files import cycling_labels, write_idx
from pudm.cli import main
from pudm.config import preset
from pudm.datasets import IDXError, load_paper_source, read_idx, split_from_config

TEST_OFFSET = 100  # test images carry pixel code 10 * label + 105, training images 10 * label + 5


def _codes(images: torch.Tensor) -> torch.Tensor:
    """The pixel code at the image centre, back in 0..255."""
    return ((images[:, 0, images.shape[-2] // 2, images.shape[-1] // 2] + 1.0) * 127.5).round().long()


@pytest.mark.parametrize("layout", ["torchvision", "debian"])
@pytest.mark.parametrize("gz", [False, True])
def test_reader_gives_images_labels_and_counts(tmp_path, layout, gz):
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    write_idx(folder, cycling_labels(120), cycling_labels(50), gz=gz, test_offset=TEST_OFFSET)
    assert all(p.name.endswith(".gz") == gz for p in folder.glob("*ubyte*"))
    source = load_paper_source("fashion_mnist", 28, 1, tmp_path, download=False)
    assert len(source.labels) == 120 and len(source.test_labels) == 50
    assert source.labels.tolist() == cycling_labels(120).tolist()
    images = source.images[torch.arange(120)]
    assert images.shape == (120, 1, 28, 28)
    assert torch.equal(_codes(images), 10 * source.labels + 5)
    test = source.test_images[torch.arange(50)]
    assert torch.equal(_codes(test), 10 * source.test_labels + 5 + TEST_OFFSET)
    # Orientation: the marker pixel stays at row 1, column 6.
    assert (images[:, 0, 1, 6] == 1.0).all() and (images[:, 0, 6, 1] < 1.0).all()


@pytest.mark.parametrize("name, sensitive", [("fashion_footwear", (5, 7, 9)), ("fashion_shirt", (6,))])
def test_presets_draw_u_s_and_test_without_test_images_in_training(tmp_path, name, sensitive):
    write_idx(tmp_path, cycling_labels(6000), cycling_labels(3000), gz=True, test_offset=TEST_OFFSET)
    config = preset(name)
    data = config.data
    assert data.source == "fashion_mnist" and (data.image_size, data.channels) == (16, 1)
    assert set(data.normal_classes) == set(range(10)) - set(sensitive)
    assert data.num_unlabeled_sensitive * 10 == data.num_unlabeled_normal, "a 10:1 mixture"
    data.data_dir, data.download = str(tmp_path), False
    split = split_from_config(config)
    assert len(split.unlabeled) == data.num_unlabeled_normal + data.num_unlabeled_sensitive
    assert int(split.unlabeled_is_sensitive.sum()) == data.num_unlabeled_sensitive
    assert len(split.sensitive) == data.num_sensitive and len(split.test) == data.num_test
    assert split.unlabeled.shape[1:] == (1, 16, 16)
    normal = torch.tensor(data.normal_classes)
    assert torch.equal(~torch.isin(split.unlabeled_labels, normal), split.unlabeled_is_sensitive)
    assert set(split.sensitive_labels.tolist()) == set(sensitive)
    assert torch.isin(split.test_labels, normal).all()
    # No test image in U or S, every test image from the official test part (codes >= 105).
    for part in (split.unlabeled, split.sensitive):
        assert (_codes(part) < TEST_OFFSET).all()
    assert (_codes(split.test) >= TEST_OFFSET).all()


def test_read_idx_refuses_truncated_and_foreign_files(tmp_path):
    write_idx(tmp_path, cycling_labels(10), cycling_labels(10))
    images = tmp_path / "train-images-idx3-ubyte"
    assert read_idx(images, 0x803).shape == (10, 28, 28)
    with pytest.raises(IDXError, match="holds labels, not images"):
        read_idx(tmp_path / "train-labels-idx1-ubyte", 0x803)
    cut = tmp_path / "cut"
    cut.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(IDXError, match="truncated"):
        read_idx(cut, 0x803)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(images.read_bytes())[:-20])
    with pytest.raises(IDXError, match="cannot be read"):
        read_idx(broken, 0x803)


def _one_line_exit_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    return line


def test_bad_data_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    base = ["train", "--preset", "fashion_shirt", "--no-download", "--steps", "2", "--out", str(out)]
    line = _one_line_exit_2([*base, "--data-dir", str(empty)], capsys)
    assert "train-images-idx3-ubyte" in line and "dataset-fashion-mnist" in line and "--data-dir" in line
    # Truncated images; labels where images belong.
    data = tmp_path / "data"
    write_idx(data, cycling_labels(6000), cycling_labels(3000))
    images = data / "train-images-idx3-ubyte"
    original = images.read_bytes()
    images.write_bytes(original[: len(original) // 2])
    before = tree_digest(tmp_path)
    line = _one_line_exit_2([*base, "--data-dir", str(data)], capsys)
    assert "train-images-idx3-ubyte" in line and "truncated" in line
    images.write_bytes((data / "train-labels-idx1-ubyte").read_bytes())
    before = tree_digest(tmp_path)
    line = _one_line_exit_2([*base, "--data-dir", str(data)], capsys)
    assert "holds labels, not images" in line
    assert tree_digest(tmp_path) == before and not out.exists()


def test_a_fashion_preset_trains_and_samples_from_local_files(tmp_path):
    write_idx(tmp_path / "data", cycling_labels(600), cycling_labels(300), gz=True)
    out = tmp_path / "run"
    argv = ["train", "--preset", "fashion_footwear", "--data-dir", str(tmp_path / "data"), "--no-download"]
    argv += ["--num-unlabeled-normal", "60", "--num-unlabeled-sensitive", "6", "--num-sensitive", "10"]
    argv += ["--num-test", "20", "--steps", "2", "--batch-size", "8", "--warmup-steps", "0"]
    argv += ["--log-every", "1", "--sample-steps", "2", "--grid-size", "4", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    summary = (out / "summary.json").read_text()
    assert '"unlabeled": 66' in summary and '"test": 20' in summary
    target = tmp_path / "x.npz"
    assert main(["sample", str(out), "--num", "3", "--out", str(target), "--steps", "2"]) == 0
    assert np.load(target)["images"].shape == (3, 16, 16, 1)
