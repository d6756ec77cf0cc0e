"""PU splits and mixed U/S batches."""

import pytest
import torch

from pudm.data import IndexStream, LabeledSource, PUBatches, PUSplit, build_pu_split
from pudm.datasets import load_digits_source


def toy_source(count: int = 200) -> LabeledSource:
    # Each image holds its own index, so parts of a split can be traced back to the source.
    images = torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1).expand(count, 1, 2, 2).clone()
    return LabeledSource(images=images, labels=torch.arange(count) % 10, name="toy")


def ids(images: torch.Tensor) -> set[int]:
    return {int(v) for v in images[:, 0, 0, 0]}


def test_split_counts_disjoint_and_truthful():
    source = toy_source()
    split = build_pu_split(source, (0, 2, 4, 6, 8), 50, 5, 20, 30, seed=3)
    assert (len(split.unlabeled), len(split.sensitive), len(split.test)) == (55, 20, 30)
    parts = [ids(split.unlabeled), ids(split.sensitive), ids(split.test)]
    assert sum(len(p) for p in parts) == len(set().union(*parts)), "parts overlap"
    is_normal = lambda i: (i % 10) % 2 == 0  # noqa: E731
    assert all(is_normal(i) for i in ids(split.test))
    assert not any(is_normal(i) for i in ids(split.sensitive))
    hidden = split.unlabeled_is_sensitive
    truth = torch.tensor([not is_normal(int(v)) for v in split.unlabeled[:, 0, 0, 0]])
    assert torch.equal(hidden, truth) and int(hidden.sum()) == 5
    assert split.summary()["true_beta"] == pytest.approx(5 / 55)


def test_split_is_deterministic_in_seed():
    source = toy_source()
    a = build_pu_split(source, (0, 1), 20, 5, 10, 5, seed=1)
    b = build_pu_split(source, (0, 1), 20, 5, 10, 5, seed=1)
    c = build_pu_split(source, (0, 1), 20, 5, 10, 5, seed=2)
    assert torch.equal(a.unlabeled, b.unlabeled) and torch.equal(a.sensitive, b.sensitive)
    assert not torch.equal(a.unlabeled, c.unlabeled)


@pytest.mark.parametrize(
    "counts,message",
    [
        ((50, 5, 0, 10), "S is empty"),
        ((0, 0, 5, 10), "U is empty"),
        ((200, 5, 5, 10), "normal items"),
        ((50, 90, 20, 10), "sensitive items"),
        ((50, -1, 5, 10), ">= 0"),
    ],
)
def test_split_rejects_impossible_counts(counts, message):
    with pytest.raises(ValueError, match=message):
        build_pu_split(toy_source(), (0, 2, 4, 6, 8), *counts, seed=0)


def test_digits_source_is_real_and_resizable():
    source = load_digits_source()
    assert source.images.shape == (1797, 1, 8, 8)
    assert source.images.min() == -1.0 and source.images.max() == 1.0
    big = load_digits_source(image_size=16, channels=3)
    assert big.images.shape == (1797, 3, 16, 16)
    assert torch.equal(big.images[:, 0], big.images[:, 2])


def test_index_stream_covers_each_epoch_once_and_is_stateless():
    stream = IndexStream(10, seed=4)
    first = stream.take(0, 25)
    assert sorted(first[:10].tolist()) == list(range(10))
    assert sorted(first[10:20].tolist()) == list(range(10))
    # A fresh stream recomputes any window from the position alone (what resuming relies on).
    assert torch.equal(IndexStream(10, seed=4).take(13, 9), first[13:22])


def test_pooled_batches_mix_u_and_s_in_proportion():
    batches = PUBatches(num_unlabeled=300, num_sensitive=100, batch_size=40, seed=0)
    sensitive = torch.cat([batches.indices(step) for step in range(100)]) >= 300
    assert sensitive.float().mean().item() == pytest.approx(0.25, abs=0.01)


def test_fixed_sensitive_per_batch():
    batches = PUBatches(num_unlabeled=300, num_sensitive=7, batch_size=16, seed=0, sensitive_per_batch=4)
    for step in range(5):
        index = batches.indices(step)
        assert len(index) == 16
        assert int((index >= 300).sum()) == 4
        assert index.max() < 307


def test_batches_reject_bad_settings():
    with pytest.raises(ValueError, match="sensitive_per_batch"):
        PUBatches(10, 5, batch_size=4, seed=0, sensitive_per_batch=5)
    with pytest.raises(ValueError, match="batch_size"):
        PUBatches(10, 5, batch_size=0, seed=0)


def test_oracle_is_refused_where_u_has_no_labels():
    from pudm import methods
    from pudm.tasks import training_pool

    images = torch.zeros(4, 1, 2, 2)
    unlabeled_only = PUSplit(unlabeled=images, sensitive=images[:1], test=images[:0])
    with pytest.raises(ValueError, match="oracle needs the hidden labels"):
        methods.get("oracle").check_data(unlabeled_only)
    pu = methods.get("pu").training_items(unlabeled_only, None)
    pool, is_sensitive = training_pool(unlabeled_only, pu)
    assert (len(pool), int(is_sensitive.sum())) == (5, 1)
    labeled = build_pu_split(toy_source(), (0, 2, 4, 6, 8), 50, 5, 20, 30, seed=3)
    pool, is_sensitive = training_pool(labeled, methods.get("oracle").training_items(labeled, None))
    assert (len(pool), int(is_sensitive.sum())) == (50, 0), "oracle keeps only the hidden-normal part of U"
