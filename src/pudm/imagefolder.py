"""Image folders: the way users bring their own U, S and test data.

A folder is read recursively; every file with a common image extension is an item, whatever its
size, mode or format. Each image is converted to grey or RGB, its shorter side resized to the
target size and the centre cropped to a square, so mixed sizes and mixed grey/RGB files are fine.
A file that cannot be decoded is skipped and counted (``strict=False``) or stops the load with its
name (``strict=True``). Other files (``metadata.jsonl``, ``README``) are not images and are ignored.

Captions follow diffusers' ``imagefolder`` convention: a ``metadata.jsonl`` in a folder holds one
JSON object per line with ``file_name`` (relative to that folder) and ``text``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pudm.errors import UsageError
from pudm.readers import ImageSet

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
METADATA = "metadata.jsonl"


class ImageFolderError(UsageError):
    """A folder that cannot be used; the message names the folder or file and the fix."""


def list_images(folder: Path, flag: str = "folder") -> list[Path]:
    """Every image file under ``folder`` (recursive, sorted, hidden files skipped)."""
    folder = Path(folder)
    if not folder.exists():
        raise ImageFolderError(f"{flag} {folder} does not exist: check the path")
    if not folder.is_dir():
        raise ImageFolderError(f"{flag} {folder} is a file: give a folder of images")
    found = sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    if not found:
        raise ImageFolderError(
            f"{flag} {folder} holds no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS[:6])}, ...): "
            "put the images in it or give another folder"
        )
    return found


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image as uint8 (C, size, size): grey or RGB, shorter side resized, centre cropped."""
    with Image.open(path) as opened:
        opened.load()  # decode now: a truncated or corrupt file fails here
        picture = ImageOps.exif_transpose(opened)
        if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
            # Transparent pixels over white, not over whatever colour they happen to store.
            rgba = picture.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            picture = Image.alpha_composite(background, rgba)
        picture = picture.convert("L" if channels == 1 else "RGB")
    picture = ImageOps.fit(picture, (size, size), method=Image.Resampling.BICUBIC)
    array = np.asarray(picture, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def read_or_skip(
    source, name: str, size: int, channels: int, strict: bool, flag: str, skipped: list, what: str
) -> np.ndarray | None:
    """:func:`load_image` of ``source`` (a path or a file object; None: no image), or None after
    adding ``(name, reason)`` to ``skipped``; with ``strict``, an unreadable image stops the load."""
    try:
        if source is None:
            raise ValueError("no image in this row")
        return load_image(source, size, channels)
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:120]
        if strict:
            raise ImageFolderError(
                f"{flag}: {name} is not a readable image ({reason}): remove it, or drop --strict "
                f"to skip such {what}"
            ) from None
        skipped.append((name, reason))
        return None


def load_folder(
    folder: Path, size: int, channels: int, strict: bool = False, flag: str = "folder"
) -> ImageSet:
    """Every image under ``folder`` at ``size`` x ``size`` with ``channels`` (1 or 3).

    Raises:
        ImageFolderError: missing or empty folder, no readable image, or (``strict``) any
            unreadable file.
    """
    if channels not in (1, 3):
        raise ImageFolderError(f"--channels must be 1 (grey) or 3 (RGB), got {channels}")
    if size <= 0:
        raise ImageFolderError(f"image size must be > 0, got {size}")
    folder = Path(folder)
    arrays, files, skipped = [], [], []
    for path in list_images(folder, flag):
        array = read_or_skip(path, str(path), size, channels, strict, flag, skipped, "files")
        if array is not None:
            arrays.append(array)
            files.append(path)
    if not arrays:
        raise ImageFolderError(
            f"{flag} {folder}: none of its {len(skipped)} image files could be read "
            f"(first: {Path(skipped[0][0]).name}, {skipped[0][1]}): check the files"
        )
    return ImageSet(
        images=torch.from_numpy(np.stack(arrays)),
        names=[file.relative_to(folder).as_posix() for file in files],
        where=str(folder),
        kind="folder",
        fingerprint=fingerprint(files, folder),
        skipped=skipped,
    )


def read_captions(folder: Path, flag: str = "folder") -> dict[str, str]:
    """Captions from every ``metadata.jsonl`` under ``folder``: relative image path -> text."""
    folder = Path(folder)
    captions: dict[str, str] = {}
    for metadata in sorted(folder.rglob(METADATA)):
        base = metadata.parent.relative_to(folder)
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name, text = entry["file_name"], entry["text"]
                if not isinstance(name, str) or not isinstance(text, str):
                    raise TypeError("file_name and text must be strings")
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ImageFolderError(
                    f"{flag}: {metadata} line {number} is not a JSON object with file_name and text "
                    f"({type(error).__name__}): fix the line"
                ) from None
            relative = (base / name).as_posix()
            if not (folder / relative).is_file():
                raise ImageFolderError(
                    f"{flag}: {metadata} line {number} names {name}, which is not in the folder: "
                    "fix or remove the line"
                )
            captions[relative] = text
    return captions


def fingerprint(files: list[Path], root: Path) -> str:
    """Short hash of the file names and sizes: tells a resumed run that its data changed."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]
