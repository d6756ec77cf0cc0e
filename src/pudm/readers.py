"""U, S and test images from the formats users hold, told apart by what the path is.

=====================  ==========================================================================
``--unlabeled X``      read as
=====================  ==========================================================================
a folder of images     an image folder (recursive; captions from ``metadata.jsonl``), as before
``*.parquet``          Parquet: one file, a folder of them, or a brace pattern
                       (``u-{000..127}.parquet``); the image column holds Hugging Face datasets'
                       ``{bytes, path}`` struct, raw bytes, or a path (relative to the file)
a ``save_to_disk``     the Arrow files of a ``datasets`` Dataset saved with ``save_to_disk``
folder                 (``state.json`` beside them); a DatasetDict's folder gives its ``train``
``*.tar``              WebDataset shards: one tar, or a brace pattern (``u-{000..127}.tar``); the
                       members of a sample share a key (``0001.jpg``, ``0001.txt``, ``0001.cls``)
``owner/name``         a Hugging Face hub data set (``datasets.load_dataset``, split ``train``),
                       when no such path exists here (needs ``pip install datasets`` and a network)
=====================  ==========================================================================

Columns: ``--image-column`` (default ``image``; for tar shards, an extension such as ``jpg``,
default the first image member of a sample), ``--caption-column`` (Stable Diffusion's captions;
default ``text`` where a table has it, ``txt`` in shards) and ``--label-column``, which marks the
labeled sensitive rows of one table holding both U and S (1 / true: S; 0 / false: U), so the same
source can serve as ``--unlabeled`` alone.

Everything here reads into memory (uint8 at the training size): Parquet needs ``pyarrow``
(``pip install 'pudm[data]'``), tar shards the standard library alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pudm.errors import UsageError

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "ppm", "pgm", "tif", "tiff")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BRACE = re.compile(r"\{([^{}]*)\}")


class DataSourceError(UsageError):
    """A U, S or test source that cannot be read; the message names it and the fix."""


@dataclass(frozen=True)
class Columns:
    """Which columns (Parquet, Arrow, hub) or member extensions (tar shards) hold what."""

    image: str = "image"
    caption: str | None = None  # None: "text" (tables) / "txt" (shards) where present
    label: str | None = None


@dataclass
class ImageSet:
    """Images read from one source: uint8 (N, C, H, W), a stable name per item, what was skipped.

    ``names`` are relative file names (folders), ``file.parquet:row`` (tables) or ``shard.tar:key``
    (shards). ``captions`` holds each item's caption where the source has one (None for folders,
    whose captions live in ``metadata.jsonl``). ``fingerprint`` changes when the data does."""

    images: torch.Tensor
    names: list[str]
    where: str
    kind: str
    fingerprint: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    captions: list[str | None] | None = None
    marked: list[bool] | None = None  # --label-column: the labeled sensitive rows

    def __len__(self) -> int:
        return len(self.names)

    def as_float(self) -> torch.Tensor:
        """float32 in [-1, 1], the range the diffusion models train in."""
        return self.images.float() / 127.5 - 1.0

    def subset(self, keep: np.ndarray, where: str) -> ImageSet:
        """The items where ``keep`` is true (a table split by its label column)."""
        keep = np.asarray(keep, dtype=bool)
        index = np.flatnonzero(keep)
        pick = [self.names[i] for i in index]
        return ImageSet(
            images=self.images[torch.from_numpy(index)],
            names=pick,
            where=where,
            kind=self.kind,
            fingerprint=_digest([self.fingerprint, *pick]),
            skipped=list(self.skipped),
            captions=None if self.captions is None else [self.captions[i] for i in index],
        )


def _digest(parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def expand_braces(pattern: str, limit: int = 1_000_000) -> list[str]:
    """``u-{000..003}.tar`` -> u-000.tar .. u-003.tar (zero padding kept, as the shell does);
    ``{a,b}`` lists, nested ones too. Braces without a range or a comma are refused."""
    open_at = pattern.find("{")
    if open_at < 0:
        return [pattern]
    depth, close_at, commas = 0, -1, []
    for index in range(open_at, len(pattern)):
        char = pattern[index]
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 1:
            commas.append(index)
        if depth == 0:
            close_at = index
            break
    if close_at < 0:
        raise DataSourceError(f"{pattern}: a brace is not closed")
    body, head, tail = pattern[open_at + 1 : close_at], pattern[:open_at], pattern[close_at + 1 :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        padded = first.startswith("0") or last.startswith("0")
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    elif commas:
        bounds = [open_at, *commas, close_at]
        options = [pattern[bounds[i] + 1 : bounds[i + 1]] for i in range(len(bounds) - 1)]
    else:
        raise DataSourceError(f"{pattern}: {{{body}}} is neither a range (000..127) nor a list (a,b)")
    if len(options) > limit:
        raise DataSourceError(f"{pattern}: expands to more than {limit} names")
    return [expanded for option in options for expanded in expand_braces(head + option + tail, limit)]


DATA_SUFFIXES = (".parquet", ".tar", ".tar.gz", ".tgz", ".arrow")


def _is_hub_id(text: str, base: Path) -> bool:
    """``owner/name``, naming no data file and no folder that exists here."""
    return (
        HUB_ID.match(text) is not None
        and not text.endswith(DATA_SUFFIXES)
        and not (base / text.split("/")[0]).exists()
    )


def stored_spec(value: str | Path, base: Path | None = None) -> str:
    """A source as a run's config stores it: local paths (and patterns) absolute, resolved against
    ``base`` (default the working folder); a hub id that is no local path stays as it is."""
    text = str(value)
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    exists = any(Path(p).exists() for p in expand_braces(str(path)))
    if not exists and _is_hub_id(text, base or Path.cwd()):
        return text
    return str(path.resolve()) if "{" not in text else str(Path(path.parent.resolve(), path.name))


def kind_of(spec: str, flag: str = "--unlabeled") -> str:
    """``folder``, ``parquet``, ``arrow``, ``tar`` or ``hub``: what ``spec`` is."""
    text = str(spec)
    try:
        return _kind_of(text, flag)
    except OSError as error:  # a name too long, a path through a file
        raise DataSourceError(f"{flag} {text[:200]} cannot be used as a path ({error.strerror})") from None


def _kind_of(text: str, flag: str) -> str:
    paths = [Path(p) for p in expand_braces(text)]
    if len(paths) > 1 or "{" in text:
        suffixes = {p.name.split(".", 1)[-1] for p in paths}
        if all(p.name.endswith(".parquet") for p in paths):
            return "parquet"
        if all(p.name.endswith((".tar", ".tar.gz", ".tgz")) for p in paths):
            return "tar"
        raise DataSourceError(
            f"{flag} {text}: a brace pattern must name .parquet or .tar files, "
            f"not {', '.join(sorted(suffixes))}"
        )
    path = paths[0]
    if path.is_file():
        if path.name.endswith(".parquet"):
            return "parquet"
        if path.name.endswith((".tar", ".tar.gz", ".tgz")):
            return "tar"
        raise DataSourceError(
            f"{flag} {path} is a file of a kind pudm does not read: give a folder of images, Parquet files, "
            "a save_to_disk folder or .tar shards"
        )
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "arrow"
        if any(path.glob("*.parquet")) and not any(_has_images(path)):
            return "parquet"
        return "folder"
    if _is_hub_id(text, Path.cwd()):
        return "hub"
    raise DataSourceError(f"{flag} {text} does not exist: check the path")


def _has_images(folder: Path) -> Iterator[Path]:
    """Image files at the top of ``folder`` (a Parquet folder with a preview image stays Parquet)."""
    from pudm.imagefolder import IMAGE_EXTENSIONS

    return (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def load_images(
    spec: str | Path,
    size: int,
    channels: int,
    strict: bool = False,
    flag: str = "--unlabeled",
    columns: Columns | None = None,
) -> ImageSet:
    """Every image of ``spec`` at ``size`` x ``size`` with ``channels`` (1 or 3), whatever its format.

    Raises:
        DataSourceError, ImageFolderError: a missing or unreadable source, a missing column, no
            readable image, or (``strict``) any unreadable image.
    """
    from pudm.imagefolder import load_folder

    columns = columns or Columns()
    kind = kind_of(str(spec), flag)
    if kind == "folder":
        return load_folder(Path(spec), size, channels, strict, flag)
    if kind == "tar":
        items = _tar_items(str(spec), columns, flag)
    elif kind == "parquet":
        items = _table_items(_parquet_tables(str(spec), columns, flag), columns, flag)
    elif kind == "arrow":
        items = _table_items(_arrow_tables(Path(spec), columns, flag), columns, flag)
    else:
        items = _table_items(_hub_tables(str(spec), columns, flag), columns, flag)
    return _decode(items, str(spec), kind, size, channels, strict, flag)


@dataclass
class _Item:
    name: str
    image: bytes | Path | None
    caption: str | None
    label: object
    size_key: str  # what the fingerprint hashes for this item


def _decode(items, where: str, kind: str, size: int, channels: int, strict: bool, flag: str) -> ImageSet:
    from pudm.imagefolder import ImageFolderError, read_or_skip

    if channels not in (1, 3):
        raise ImageFolderError(f"--channels must be 1 (grey) or 3 (RGB), got {channels}")
    arrays, names, captions, labels, skipped, keys = [], [], [], [], [], []
    for item in items:
        keys.append(item.size_key)
        source = io.BytesIO(item.image) if isinstance(item.image, bytes) else item.image
        array = read_or_skip(source, item.name, size, channels, strict, flag, skipped, "items")
        if array is None:
            continue
        arrays.append(array)
        names.append(item.name)
        captions.append(item.caption)
        labels.append(item.label)
    if not arrays:
        detail = f" (first: {skipped[0][0]}, {skipped[0][1]})" if skipped else ""
        raise ImageFolderError(
            f"{flag} {where}: no readable image in {len(skipped)} items{detail}: check the data"
        )
    return ImageSet(
        images=torch.from_numpy(np.stack(arrays)),
        names=names,
        where=where,
        kind=kind,
        fingerprint=_digest([kind, *keys]),
        skipped=skipped,
        captions=captions,
        marked=_marks(labels, flag) if any(label is not None for label in labels) else None,
    )


def _marks(labels: list, flag: str) -> list[bool]:
    """--label-column values as S (True) / U (False)."""
    marks = []
    for label in labels:
        text = str(label).strip().lower()
        if text in ("1", "true", "1.0"):
            marks.append(True)
        elif text in ("0", "false", "0.0"):
            marks.append(False)
        else:
            raise DataSourceError(
                f"{flag}: --label-column holds {label!r}; it marks the labeled sensitive items with "
                "1 / true and the unlabeled ones with 0 / false"
            )
    return marks


# -- tables: Parquet, save_to_disk, the hub --------------------------------------------------------


def _require_pyarrow(flag: str):
    try:
        import pyarrow
    except ImportError:
        raise DataSourceError(
            f"{flag}: reading Parquet and Arrow data needs pyarrow: pip install 'pudm[data]'"
        ) from None
    return pyarrow


def _parquet_tables(spec: str, columns: Columns, flag: str) -> Iterator[tuple[str, Path, object]]:
    _require_pyarrow(flag)
    import pyarrow.parquet as pq

    paths = [Path(p) for p in expand_braces(spec)]
    if len(paths) == 1 and paths[0].is_dir():
        paths = sorted(paths[0].glob("*.parquet"))
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataSourceError(f"{flag}: {missing[0]} does not exist ({len(missing)} of {len(paths)} missing)")
    for path in paths:
        try:
            table = pq.read_table(path)
        except Exception as error:  # noqa: BLE001 - pyarrow's errors for damaged files
            raise DataSourceError(
                f"{flag}: {path} cannot be read as Parquet ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:100]}): replace the file"
            ) from None
        yield path.name, path.parent, table


def _arrow_tables(folder: Path, columns: Columns, flag: str) -> Iterator[tuple[str, Path, object]]:
    """The Arrow files of a ``datasets`` save_to_disk folder (a DatasetDict: its train split)."""
    pyarrow = _require_pyarrow(flag)
    try:
        files, folder = _arrow_files(folder, flag)
    except DataSourceError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataSourceError(
            f"{flag} {folder} is not a readable save_to_disk folder ({type(error).__name__}: "
            f"{str(error)[:100]}): save the data set again"
        ) from None
    for name in files:
        path = folder / name
        try:
            with pyarrow.memory_map(str(path)) as source:
                try:
                    table = pyarrow.ipc.open_stream(source).read_all()
                except pyarrow.ArrowInvalid:
                    table = pyarrow.ipc.open_file(source).read_all()
        except (OSError, pyarrow.ArrowInvalid) as error:
            raise DataSourceError(
                f"{flag}: {path} cannot be read as Arrow ({str(error).splitlines()[0][:100]}): "
                "save the data set again"
            ) from None
        yield name, folder, table


def _arrow_files(folder: Path, flag: str) -> tuple[list[str], Path]:
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise DataSourceError(
                f"{flag} {folder} is a DatasetDict without a train split ({', '.join(splits)}): "
                "give the folder of one split, e.g. " + str(folder / (splits[0] if splits else "SPLIT"))
            )
        folder = folder / "train"
    state = json.loads((folder / "state.json").read_text())
    files = [entry["filename"] for entry in state.get("_data_files", [])]
    if not files:
        raise DataSourceError(f"{flag} {folder}/state.json lists no data files: save the data set again")
    return files, folder


def _hub_tables(spec: str, columns: Columns, flag: str) -> Iterator[tuple[str, Path, object]]:
    try:
        import datasets
    except ImportError:
        raise DataSourceError(
            f"{flag} {spec} is no file or folder here, and reading it as a Hugging Face hub data set "
            "needs the datasets package: check the path, or pip install datasets"
        ) from None
    try:
        loaded = datasets.load_dataset(spec, split="train")
    except Exception as error:  # noqa: BLE001 - network, missing data set, gated access
        raise DataSourceError(
            f"{flag} {spec} is no file or folder here, and as a hub data set it could not be loaded "
            f"({type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}): "
            "check the path, the id and the network"
        ) from None
    yield spec, Path.cwd(), loaded.with_format("arrow")[:]


def _table_items(tables, columns: Columns, flag: str) -> Iterator[_Item]:
    for name, base, table in tables:
        names = table.column_names
        wanted = {"image": columns.image, "label": columns.label}
        if columns.caption is not None:
            wanted["caption"] = columns.caption
        elif "text" in names:
            wanted["caption"] = "text"
        for role, column in wanted.items():
            if column is not None and column not in names:
                raise DataSourceError(
                    f"{flag}: {name} has no column {column!r} (its columns: {', '.join(names)}): "
                    f"give --{role}-column NAME"
                )
        _check_image_type(table.schema.field(columns.image), name, flag)
        images = table.column(columns.image).to_pylist()
        blank = [None] * len(images)
        captions = table.column(wanted["caption"]).to_pylist() if "caption" in wanted else blank
        labels = table.column(columns.label).to_pylist() if columns.label else blank
        for row, (value, caption, label) in enumerate(zip(images, captions, labels, strict=True)):
            image, key = _image_value(value, base)
            yield _Item(f"{name}:{row}", image, caption, label, f"{name}:{row}:{key}")


def _check_image_type(column, name: str, flag: str) -> None:
    """An image column holds datasets' ``{bytes, path}`` struct, raw bytes or paths."""
    import pyarrow

    kind = column.type
    ok = (
        pyarrow.types.is_binary(kind)
        or pyarrow.types.is_large_binary(kind)
        or pyarrow.types.is_string(kind)
        or pyarrow.types.is_large_string(kind)
        or (
            pyarrow.types.is_struct(kind)
            and {"bytes", "path"} & {kind.field(i).name for i in range(kind.num_fields)}
        )
    )
    if not ok:
        raise DataSourceError(
            f"{flag}: column {column.name!r} of {name} holds {kind}, not images (bytes, paths or "
            "datasets' {bytes, path}): give --image-column NAME"
        )


def _image_value(value, base: Path) -> tuple[bytes | Path | None, str]:
    """An image cell: datasets' ``{bytes, path}`` struct, raw bytes or a path; and its hash key."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return bytes(data), hashlib.sha256(data).hexdigest()[:16]
        value = path
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), hashlib.sha256(value).hexdigest()[:16]
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else base / value
        try:
            stat = path.stat()
            return path, f"{value}:{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:  # missing, or no path at all (a too long string): skipped when decoded
            return path, f"{value}:-1"
    return None, "none"


# -- WebDataset tar shards -------------------------------------------------------------------------


def _tar_items(spec: str, columns: Columns, flag: str) -> Iterator[_Item]:
    paths = [Path(p) for p in expand_braces(spec)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataSourceError(
            f"{flag}: {missing[0]} does not exist ({len(missing)} of {len(paths)} shards missing)"
        )
    image_ext = None if columns.image == "image" else columns.image.lower().lstrip(".")
    caption_ext = (columns.caption or "txt").lower().lstrip(".")
    label_ext = columns.label.lower().lstrip(".") if columns.label else None
    for path in paths:
        for key, members in _tar_samples(path, flag):
            image = None
            if image_ext is not None:
                image = members.get(image_ext)
            else:
                image = next((members[ext] for ext in members if ext.split(".")[-1] in IMAGE_SUFFIXES), None)
            if image_ext is not None and image is None and key is not None:
                raise DataSourceError(
                    f"{flag}: sample {key} of {path.name} has no .{image_ext} member "
                    f"(it has {', '.join(sorted(members))}): give --image-column EXT"
                )
            caption = members.get(caption_ext)
            label = members.get(label_ext) if label_ext else None
            if label_ext and label is None:
                raise DataSourceError(
                    f"{flag}: sample {key} of {path.name} has no .{label_ext} member for --label-column"
                )
            digest = hashlib.sha256(image).hexdigest()[:16] if image else "none"
            yield _Item(
                f"{path.name}:{key}",
                image,
                caption.decode("utf-8", "replace").strip() if caption is not None else None,
                label.decode("utf-8", "replace").strip() if label is not None else None,
                f"{path.name}:{key}:{digest}",
            )


def _tar_samples(path: Path, flag: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """WebDataset's grouping: consecutive members sharing a key (the name up to the first dot of
    its last part) form one sample, ``{extension: bytes}``."""
    try:
        archive = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as error:
        raise DataSourceError(f"{flag}: {path} cannot be read as a tar shard ({error}): replace it") from None
    key, members, seen = None, {}, set()
    with archive:
        try:
            for member in archive:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                this = f"{folder}/{stem}" if folder else stem
                if this != key and key is not None:
                    yield key, members
                    members = {}
                if this != key and this in seen:
                    raise DataSourceError(
                        f"{flag}: {path} holds sample {this} twice, apart: a shard keeps a sample's "
                        "members together (write it again)"
                    )
                seen.add(this)
                key = this
                if ext.lower() in members:
                    raise DataSourceError(f"{flag}: {path} holds {this}.{ext} twice: write the shard again")
                members[ext.lower()] = archive.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            raise DataSourceError(f"{flag}: {path} is truncated or damaged ({error}): replace it") from None
    if key is not None:
        yield key, members


# -- U and S of a run ----------------------------------------------------------------------------


def load_pu(
    unlabeled: str,
    sensitive: str | None,
    size: int,
    channels: int,
    strict: bool = False,
    columns: Columns | None = None,
    need_sensitive: bool = True,
) -> tuple[ImageSet, ImageSet | None]:
    """U and S from their sources. With ``--label-column``, a source whose rows carry the mark is
    split: marked rows are S, the rest U (``--sensitive`` may then be left out)."""
    columns = columns or Columns()
    found_u = load_images(unlabeled, size, channels, strict, "--unlabeled", columns)
    found_s = None
    if found_u.marked is not None and sensitive is not None:
        raise DataSourceError("--label-column marks S inside --unlabeled: give it or --sensitive, not both")
    if found_u.marked is not None:
        marked = np.asarray(found_u.marked)
        if sensitive is None:
            found_s = found_u.subset(marked, f"{unlabeled} (rows marked by --label-column)")
            if not len(found_s) and need_sensitive:
                raise DataSourceError(
                    f"--unlabeled {unlabeled}: --label-column {columns.label} marks no row as sensitive "
                    "(1 / true): mark the labeled sensitive rows, or give --sensitive"
                )
        found_u = found_u.subset(~marked, f"{unlabeled} (rows not marked by --label-column)")
        if not len(found_u):
            raise DataSourceError(f"--unlabeled {unlabeled}: every row is marked sensitive; U is empty")
    elif columns.label is not None and found_u.kind == "folder":
        raise DataSourceError("--label-column applies to tables and tar shards, not to image folders")
    if found_s is None and need_sensitive:
        if sensitive is None:
            raise DataSourceError("--sensitive is missing: give S, or --label-column marking it in U")
        plain = Columns(columns.image, columns.caption)
        found_s = load_images(sensitive, size, channels, strict, "--sensitive", plain)
    return found_u, found_s
