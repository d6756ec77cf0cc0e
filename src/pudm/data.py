"""PU splits of labeled sources, and mixed U/S mini-batches (the sources are in pudm.datasets).

A PU split draws, from a labeled source and a choice of normal classes, four disjoint parts:

- U-normal and U-sensitive, shuffled together into the unlabeled set U (the model never sees which
  is which; the hidden truth is kept on the split for evaluation and the ``oracle`` reference only);
- S, a small labeled sensitive set;
- a normal-only test split, used by evaluation alone.

Small data sets live on the training device as one tensor; a mini-batch is an index into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pudm.errors import UsageError


@dataclass(frozen=True)
class LabeledSource:
    """Images in [-1, 1], shape (N, C, H, W), float32, with integer class labels of shape (N,).

    ``images`` is a tensor or anything indexable by an index tensor that returns one
    (:class:`pudm.datasets.LazyImages`). Sources with an official test split carry it in
    ``test_images`` / ``test_labels``: the normal test images are then drawn from it. Sources that
    set images apart for the evaluation classifier alone (disjoint from every split's U, S and test
    images) carry them in ``judge_images`` / ``judge_labels``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    test_images: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    judge_images: torch.Tensor | None = None
    judge_labels: torch.Tensor | None = None

    def all_images(self, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluation classifier's images with their labels as one tensor, or a seeded random
        ``limit`` of them: the judge part where the source sets one apart, else every training image."""
        images, labels = self.images, self.labels
        if self.judge_images is not None:
            images, labels = self.judge_images, self.judge_labels
        index = torch.arange(len(labels))
        if limit is not None and limit < len(index):
            index = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))[:limit]
            index = index.sort().values
        return images[index], labels[index]


@dataclass(frozen=True)
class PUSplit:
    """The data of one PU run.

    Attributes:
        unlabeled: U, shape (N_U, C, H, W), in [-1, 1].
        sensitive: S, shape (N_S, C, H, W).
        test: normal-only test images, shape (N_test, C, H, W); may be empty.
        unlabeled_is_sensitive: hidden truth of U (bool, shape (N_U,)), or None where no labels
            exist (user folders). Evaluation and the ``oracle`` method only.
        unlabeled_labels / sensitive_labels / test_labels: fine class labels, or None.
    """

    unlabeled: torch.Tensor
    sensitive: torch.Tensor
    test: torch.Tensor
    unlabeled_is_sensitive: torch.Tensor | None = None
    unlabeled_labels: torch.Tensor | None = None
    sensitive_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.unlabeled.shape[1:])  # type: ignore[return-value]

    @property
    def num_unlabeled(self) -> int:
        return len(self.unlabeled)

    @property
    def num_sensitive(self) -> int:
        return len(self.sensitive)

    def summary(self) -> dict[str, int | float | None]:
        hidden = self.unlabeled_is_sensitive
        return {
            "unlabeled": len(self.unlabeled),
            "unlabeled_sensitive": None if hidden is None else int(hidden.sum()),
            "sensitive": len(self.sensitive),
            "test": len(self.test),
            "true_beta": None if hidden is None else float(hidden.float().mean()),
        }


def resize_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) images to square ``image_size`` (no-op when equal)."""
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    resized = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return resized.clamp(-1.0, 1.0)


def build_pu_split(
    source: LabeledSource,
    normal_classes: tuple[int, ...],
    num_unlabeled_normal: int,
    num_unlabeled_sensitive: int,
    num_sensitive: int,
    num_test: int,
    seed: int,
) -> PUSplit:
    """Draw disjoint U-normal, U-sensitive, S and normal-only test parts from ``source``.

    Items of ``normal_classes`` are normal, all other classes sensitive. The draw depends only on
    ``seed``, so the same seed always gives the same split.

    Raises:
        ValueError: when a count is negative, U or S would be empty, or the source holds too few
            items of a kind.
    """
    for name, count in (
        ("num_unlabeled_normal", num_unlabeled_normal),
        ("num_unlabeled_sensitive", num_unlabeled_sensitive),
        ("num_sensitive", num_sensitive),
        ("num_test", num_test),
    ):
        if count < 0:
            raise UsageError(f"{name} must be >= 0, got {count}")
    if num_sensitive == 0:
        raise UsageError("the labeled sensitive set S is empty: set num_sensitive > 0")
    if num_unlabeled_normal + num_unlabeled_sensitive == 0:
        raise UsageError("the unlabeled set U is empty: set num_unlabeled_normal > 0")

    classes = torch.tensor(normal_classes, dtype=source.labels.dtype)
    is_normal = torch.isin(source.labels, classes)
    generator = torch.Generator().manual_seed(seed)
    normal_idx = torch.nonzero(is_normal).squeeze(1)
    sensitive_idx = torch.nonzero(~is_normal).squeeze(1)
    normal_idx = normal_idx[torch.randperm(len(normal_idx), generator=generator)]
    sensitive_idx = sensitive_idx[torch.randperm(len(sensitive_idx), generator=generator)]

    separate_test = source.test_images is not None
    if separate_test:
        # The official test split: the normal test images come from there, U and S from training.
        test_normal = torch.nonzero(torch.isin(source.test_labels, classes)).squeeze(1)
        test_normal = test_normal[torch.randperm(len(test_normal), generator=generator)]
        if num_test > len(test_normal):
            raise UsageError(
                f"{source.name}'s test split has {len(test_normal)} normal items but the split asks for "
                f"{num_test}: lower the test count"
            )
        test_pick = test_normal[:num_test].sort().values
        test_images, test_labels = source.test_images[test_pick], source.test_labels[test_pick]
        num_test = 0
    need_normal = num_unlabeled_normal + num_test
    need_sensitive = num_unlabeled_sensitive + num_sensitive
    if need_normal > len(normal_idx):
        raise UsageError(
            f"{source.name} has {len(normal_idx)} normal items but the split asks for {need_normal} "
            f"({'U normal' if separate_test else 'U normal + test'}): lower the counts"
        )
    if need_sensitive > len(sensitive_idx):
        raise UsageError(
            f"{source.name} has {len(sensitive_idx)} sensitive items but the split asks for "
            f"{need_sensitive} (U sensitive + S): lower the counts"
        )

    test_idx = normal_idx[:num_test]
    unlabeled_normal_idx = normal_idx[num_test:need_normal]
    unlabeled_sensitive_idx = sensitive_idx[:num_unlabeled_sensitive]
    labeled_sensitive_idx = sensitive_idx[num_unlabeled_sensitive:need_sensitive]

    unlabeled_idx = torch.cat([unlabeled_normal_idx, unlabeled_sensitive_idx])
    hidden = torch.cat(
        [
            torch.zeros(len(unlabeled_normal_idx), dtype=torch.bool),
            torch.ones(len(unlabeled_sensitive_idx), dtype=torch.bool),
        ]
    )
    order = torch.randperm(len(unlabeled_idx), generator=generator)
    unlabeled_idx, hidden = unlabeled_idx[order], hidden[order]
    if not separate_test:
        test_images, test_labels = source.images[test_idx], source.labels[test_idx]
    return PUSplit(
        unlabeled=source.images[unlabeled_idx],
        sensitive=source.images[labeled_sensitive_idx],
        test=test_images,
        unlabeled_is_sensitive=hidden,
        unlabeled_labels=source.labels[unlabeled_idx],
        sensitive_labels=source.labels[labeled_sensitive_idx],
        test_labels=test_labels,
    )


class IndexStream:
    """An endless stream of indices into ``range(size)``: one fresh permutation per epoch.

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so the indices of any step can be
    recomputed from the step number alone: resuming needs no sampler state.
    """

    def __init__(self, size: int, seed: int):
        if size <= 0:
            raise UsageError("cannot draw batches from an empty set")
        self.size = size
        self.seed = seed
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.size, generator=generator)
            self._epoch = epoch
        return self._perm

    def take(self, start: int, count: int) -> torch.Tensor:
        """Indices at stream positions ``start .. start + count - 1``."""
        pieces = []
        position = start
        while count > 0:
            epoch, offset = divmod(position, self.size)
            chunk = self._permutation(epoch)[offset : offset + count]
            pieces.append(chunk)
            position += len(chunk)
            count -= len(chunk)
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)


class PUBatches:
    """Mini-batches that mix U and S, as index tensors into a pool ``cat([U, S])`` on the device.

    ``batch_size`` is one process's share; the *global* batch of a step is ``world_size *
    batch_size`` items. With ``sensitive_per_batch=None`` (the paper's way) the global batch is
    drawn from the pooled U and S, so it holds S items in proportion to ``|S| / (|U| + |S|)`` on
    average. With an integer ``k``, every global batch holds exactly ``k`` S items, spread evenly
    over its positions, and U fills the rest; each process takes its block of it. Either way N
    processes with batch B see exactly the items one process with batch N*B sees, in the same order.
    """

    def __init__(
        self,
        num_unlabeled: int,
        num_sensitive: int,
        batch_size: int,
        seed: int,
        sensitive_per_batch: int | None = None,
        world_size: int = 1,
    ):
        if batch_size <= 0:
            raise UsageError(f"batch_size must be > 0, got {batch_size}")
        if world_size <= 0:
            raise UsageError(f"world_size must be > 0, got {world_size}")
        self.global_size = batch_size * world_size
        if sensitive_per_batch is not None and not 0 <= sensitive_per_batch <= self.global_size:
            raise UsageError(
                f"sensitive_per_batch must be in [0, global batch size {self.global_size}], "
                f"got {sensitive_per_batch}"
            )
        self.num_unlabeled = num_unlabeled
        self.num_sensitive = num_sensitive
        self.batch_size = batch_size
        self.world_size = world_size
        self.sensitive_per_batch = sensitive_per_batch
        if sensitive_per_batch is None:
            self._pool = IndexStream(num_unlabeled + num_sensitive, seed)
        else:
            self._unlabeled = IndexStream(num_unlabeled, seed)
            self._sensitive = IndexStream(num_sensitive, seed + 7919) if sensitive_per_batch else None
            # where the k S items sit in every global batch: evenly spaced
            k, size = sensitive_per_batch, self.global_size
            self._is_sensitive_slot = torch.zeros(size, dtype=torch.bool)
            self._is_sensitive_slot[(torch.arange(k) * size) // max(k, 1)] = k > 0

    def global_indices(self, step: int) -> torch.Tensor:
        """Pool indices of the whole global batch of ``step`` (U items < num_unlabeled, S after)."""
        size = self.global_size
        if self.sensitive_per_batch is None:
            return self._pool.take(step * size, size)
        k = self.sensitive_per_batch
        batch = torch.empty(size, dtype=torch.long)
        batch[~self._is_sensitive_slot] = self._unlabeled.take(step * (size - k), size - k)
        if self._sensitive is not None:
            batch[self._is_sensitive_slot] = self._sensitive.take(step * k, k) + self.num_unlabeled
        return batch

    def indices(self, step: int, rank: int = 0) -> torch.Tensor:
        """Pool indices of process ``rank``'s block of the global batch of ``step``."""
        if not 0 <= rank < self.world_size:
            raise UsageError(f"rank must be in [0, {self.world_size}), got {rank}")
        return self.global_indices(step)[rank * self.batch_size : (rank + 1) * self.batch_size]
