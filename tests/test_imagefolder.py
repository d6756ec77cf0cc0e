"""Image folders as users bring them: nested, mixed formats, sizes and modes, broken files."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pudm.imagefolder import ImageFolderError, fingerprint, load_folder, read_captions


def _write(path, size, mode="RGB", value=128, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}
    if mode == "P":
        Image.new("RGB", size, (value, 0, 0)).convert("P").save(path, format=fmt)
        return path
    shape = (size[1], size[0], channels[mode]) if channels[mode] > 1 else (size[1], size[0])
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path, format=fmt)
    return path


def test_mixed_sizes_modes_formats_and_subfolders(tmp_path):
    _write(tmp_path / "a.png", (40, 20), "RGB", 200)
    _write(tmp_path / "sub" / "b.jpg", (7, 9), "L", 50)
    _write(tmp_path / "sub" / "deeper" / "c.bmp", (16, 16), "RGB", 10)
    _write(tmp_path / "d.webp", (30, 30), "RGBA", 90)
    _write(tmp_path / "e.gif", (12, 12), "P", 250)
    _write(tmp_path / ".hidden" / "f.png", (12, 12))  # hidden: not data
    (tmp_path / "notes.txt").write_text("not an image")
    rgb = load_folder(tmp_path, 8, 3)
    assert rgb.images.shape == (5, 3, 8, 8) and rgb.images.dtype.is_floating_point is False
    assert rgb.names == ["a.png", "d.webp", "e.gif", "sub/b.jpg", "sub/deeper/c.bmp"]
    assert rgb.skipped == []
    grey = load_folder(tmp_path, 8, 1)
    assert grey.images.shape == (5, 1, 8, 8)
    # A grey file becomes three equal channels; the values survive (a flat image stays flat).
    b = rgb.images[3]
    assert (b == b[0]).all() and abs(int(b[0, 0, 0]) - 50) <= 2
    assert abs(int(rgb.images[0, 0, 0, 0]) - 200) <= 2
    floats = rgb.as_float()
    assert floats.min() >= -1 and floats.max() <= 1


def test_transparent_pixels_become_white(tmp_path):
    image = np.zeros((4, 4, 4), dtype=np.uint8)  # black and fully transparent
    Image.fromarray(image, mode="RGBA").save(tmp_path / "clear.png")
    loaded = load_folder(tmp_path, 4, 3).images
    assert (loaded == 255).all()


def test_resize_keeps_the_centre(tmp_path):
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 255  # white centre square, black sides
    Image.fromarray(wide).save(tmp_path / "wide.png")
    loaded = load_folder(tmp_path, 10, 3).images[0]
    assert loaded.float().mean() > 240  # the crop is the centre, not a squashed whole


def test_corrupt_files_are_skipped_or_stop_with_strict(tmp_path):
    _write(tmp_path / "good.png", (8, 8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    truncated = _write(tmp_path / "cut.jpg", (64, 64), value=77, fmt="JPEG").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(truncated[: len(truncated) // 2])
    loaded = load_folder(tmp_path, 8, 3)
    assert [Path(n).name for n in loaded.names] == ["good.png"]
    assert sorted(Path(p).name for p, _ in loaded.skipped) == ["broken.png", "cut.jpg"]
    with pytest.raises(ImageFolderError, match="broken.png.*drop --strict"):
        load_folder(tmp_path, 8, 3, strict=True)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "holds no images"),
        (lambda d: (d.mkdir(), (d / "a.txt").write_text("x")), "holds no images"),
        (lambda d: d.write_text("a file"), "is a file"),
        (lambda d: (d.mkdir(), (d / "a.png").write_bytes(b"nope")), "none of its 1 image files"),
    ],
)
def test_unusable_folders_name_the_problem(tmp_path, setup, message):
    folder = tmp_path / "data"
    setup(folder)
    with pytest.raises(ImageFolderError, match=message) as error:
        load_folder(folder, 8, 3, flag="--unlabeled")
    assert "--unlabeled" in str(error.value) and "\n" not in str(error.value)


def test_captions_from_metadata_jsonl(tmp_path):
    _write(tmp_path / "a.png", (8, 8))
    _write(tmp_path / "sub" / "b.png", (8, 8))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "one"}) + "\n\n")
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "two"}) + "\n")
    assert read_captions(tmp_path) == {"a.png": "one", "sub/b.png": "two"}
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(ImageFolderError, match="line 1 is not a JSON object with file_name and text"):
        read_captions(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "zzz.png", "text": "x"}\n')
    with pytest.raises(ImageFolderError, match="names zzz.png, which is not in the folder"):
        read_captions(tmp_path)


def test_fingerprint_follows_names_and_sizes(tmp_path):
    a = _write(tmp_path / "a.png", (8, 8))
    first = fingerprint([a], tmp_path)
    assert fingerprint([a], tmp_path) == first
    _write(tmp_path / "a.png", (64, 48))  # another image under the same name
    assert fingerprint([a], tmp_path) != first
    b = _write(tmp_path / "b.png", (64, 48))
    assert fingerprint([b], tmp_path) != fingerprint([a], tmp_path)  # same bytes, another name
