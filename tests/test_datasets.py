"""The paper's presets read from files in the real on-disk formats (written by the tests), through
the same loaders a user's downloaded files go through; full Table-1 counts where memory allows."""

import pickle

import numpy as np
import pytest
import torch

from dataset_files import MARK, cycling_labels, write_celeba, write_cifar10, write_mnist, write_stl10
from pudm.cli import main
from pudm.config import PAPER_PRESETS, preset
from pudm.datasets import DatasetMissing, load_paper_source, read_cifar_batch, split_from_config


def _label_of(images: torch.Tensor) -> torch.Tensor:
    """Undo the helpers' encoding (every pixel 10 * label + 5) from the image centre."""
    value = (images[:, 0, images.shape[-2] // 2, images.shape[-1] // 2] + 1.0) * 127.5
    return ((value - 5) / 10).round().long()


def _check_split(split, config, size):
    data = config.data
    assert len(split.unlabeled) == data.num_unlabeled_normal + data.num_unlabeled_sensitive
    assert int(split.unlabeled_is_sensitive.sum()) == data.num_unlabeled_sensitive
    assert len(split.sensitive) == data.num_sensitive and len(split.test) == data.num_test
    assert tuple(split.unlabeled.shape[1:]) == (3, size, size)
    normal = torch.tensor(data.normal_classes)
    # Hidden truth, labels and pixels agree: the loader kept images and labels together.
    assert torch.equal(~torch.isin(split.unlabeled_labels, normal), split.unlabeled_is_sensitive)
    assert not torch.isin(split.sensitive_labels, normal).any()
    assert torch.isin(split.test_labels, normal).all()
    for images, labels in (
        (split.unlabeled[:50], split.unlabeled_labels[:50]),
        (split.test[:50], split.test_labels[:50]),
    ):
        assert torch.equal(_label_of(images), labels)


@pytest.mark.parametrize(
    "name, writer, train, test, size",
    [
        ("MNIST_even", write_mnist, 60000, 10000, 32),
        ("CIFAR10_vehicles", write_cifar10, 50000, 10000, 32),
        ("STL10_animals", write_stl10, 5000, 8000, 96),
    ],
)
def test_paper_presets_build_table_1_counts_from_local_files(tmp_path, name, writer, train, test, size):
    writer(tmp_path, cycling_labels(train), cycling_labels(test))
    config = preset(name)
    config.data.data_dir, config.data.download = str(tmp_path), False
    split = split_from_config(config)
    _check_split(split, config, size)


def test_orientation_survives_each_reader(tmp_path):
    """The marker pixel stays at (row 1, column 6) of the native image: no transposed reader."""
    labels = cycling_labels(20)
    write_mnist(tmp_path, labels, labels)
    write_cifar10(tmp_path, labels, labels)
    write_stl10(tmp_path, labels, labels)
    for name, native in (("mnist", 28), ("cifar10", 32), ("stl10", 96)):
        source = load_paper_source(name, native, 3, tmp_path, download=False)
        image = source.images[torch.tensor([3])][0]
        bright = torch.nonzero(image[0] == image[0].max())
        assert bright.tolist() == [list(MARK)], name
        assert source.labels[3] == 3 and source.test_labels[7] == 7


def test_celeba_male_from_local_files(tmp_path):
    male = np.array([i % 3 == 0 for i in range(90)])
    partition = np.array([2 if i >= 60 else i % 2 for i in range(90)])  # 0 train, 1 valid, 2 test
    write_celeba(tmp_path, male, partition)
    source = load_paper_source("celeba", 16, 3, tmp_path, download=False)
    assert len(source.labels) == 60 and len(source.test_labels) == 30
    assert source.labels.tolist() == male[:60].astype(int).tolist()
    images = source.images[torch.arange(6)]
    assert images.shape == (6, 3, 16, 16)
    bright = images.mean((1, 2, 3)) > 0
    assert bright.tolist() == male[:6].tolist()  # men were written bright

    config = preset("CelebA_male")
    assert config.model.pretrained == "google/ddpm-celebahq-256" and config.data.image_size == 256
    config.data.data_dir, config.data.download, config.data.image_size = str(tmp_path), False, 16
    config.model.pretrained = None
    config.data.num_unlabeled_normal, config.data.num_unlabeled_sensitive = 15, 5
    config.data.num_sensitive, config.data.num_test = 5, 8
    split = split_from_config(config)
    assert (len(split.unlabeled), len(split.sensitive), len(split.test)) == (20, 5, 8)
    assert split.test_labels.tolist() == [1] * 8 and split.sensitive_labels.tolist() == [0] * 5


TABLE_1 = {
    "MNIST_even": ("mnist", (0, 2, 4, 6, 8), 25000, 2500, 2500, 128, 32),
    "MNIST_odd": ("mnist", (1, 3, 5, 7, 9), 25000, 2500, 2500, 128, 32),
    "CIFAR10_vehicles": ("cifar10", (0, 1, 8, 9), 20000, 2000, 2000, 128, 32),
    "CIFAR10_animals": ("cifar10", (2, 3, 4, 5, 6, 7), 20000, 2000, 2000, 128, 32),
    "STL10_vehicles": ("stl10", (0, 2, 8, 9), 2000, 200, 200, 32, 96),
    "STL10_animals": ("stl10", (1, 3, 4, 5, 6, 7), 2000, 200, 200, 32, 96),
    "CelebA_male": ("celeba", (1,), 2000, 200, 200, 16, 256),
    "CelebA_female": ("celeba", (0,), 2000, 200, 200, 16, 256),
}


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_presets_hold_the_papers_settings(name):
    source, normal, u_normal, u_sensitive, s, batch, size = TABLE_1[name]
    config = preset(name)
    data, train, model = config.data, config.train, config.model
    assert (data.source, data.normal_classes, data.channels, data.image_size) == (source, normal, 3, size)
    assert (data.num_unlabeled_normal, data.num_unlabeled_sensitive, data.num_sensitive) == (
        u_normal,
        u_sensitive,
        s,
    )
    assert train.batch_size == batch and train.learning_rate == 1e-4 and train.warmup_steps == 500
    assert train.steps == 100 * -(-(u_normal + u_sensitive + s) // batch)  # 100 epochs
    assert model.block_out_channels == (128, 128, 256, 512) and model.layers_per_block == 2
    assert model.down_block_types[2] == "AttnDownBlock2D" and model.up_block_types[1] == "AttnUpBlock2D"
    assert (config.sample.sampler, config.sample.steps) == ("ddim", 50)
    if model.pretrained is None:  # the model itself builds for this data (on the meta device: no memory)
        from pudm.models import build_unet

        with torch.device("meta"):
            unet = build_unet(model, image_size=size, channels=3)
        assert unet.config.sample_size == size and unet.config.in_channels == 3
        assert sum(p.numel() for p in unet.parameters()) > 30_000_000
    assert preset(name.lower()).preset == name  # names match without regard to case
    assert name in PAPER_PRESETS


def test_missing_files_name_what_to_put_where(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--preset", "CIFAR10_animals", "--data-dir", str(tmp_path / "data"), "--no-download"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        "cifar-10-batches-py/data_batch_1" in err and "cifar-10-python.tar.gz" in err and "--data-dir" in err
    )
    assert not out.exists()


def test_a_data_file_that_would_run_code_is_refused(tmp_path):
    labels = cycling_labels(20)
    write_cifar10(tmp_path, labels, labels)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        read_cifar_batch(bad)
    with pytest.raises(DatasetMissing, match="cannot be read"):
        load_paper_source("cifar10", 32, 3, tmp_path, download=False)


def test_a_paper_preset_trains_from_local_files(tmp_path):
    write_mnist(tmp_path / "data", cycling_labels(200), cycling_labels(100))
    out = tmp_path / "run"
    argv = ["train", "--preset", "mnist_even", "--data-dir", str(tmp_path / "data"), "--no-download"]
    argv += ["--num-unlabeled-normal", "40", "--num-unlabeled-sensitive", "4", "--num-sensitive", "8"]
    argv += [
        "--num-test",
        "10",
        "--model",
        "small",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--warmup-steps",
        "0",
    ]
    argv += ["--log-every", "1", "--sample-steps", "2", "--grid-size", "4", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    summary = (out / "summary.json").read_text()
    assert '"unlabeled": 44' in summary and '"test": 10' in summary
