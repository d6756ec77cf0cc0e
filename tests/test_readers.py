"""U, S and test data in the formats users hold: Parquet, save_to_disk folders, WebDataset tar
shards and hub ids, written here in those formats and read through the commands users run."""

import io
import json
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pudm.cli import main
from pudm.readers import Columns, DataSourceError, expand_braces, kind_of, load_images, load_pu, stored_spec

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

FAST = ["--steps", "4", "--batch-size", "8", "--log-every", "2", "--checkpoint-every", "2"]
FAST += ["--warmup-steps", "0", "--sample-steps", "2", "--grid-size", "4", "--quiet", "--image-size", "8"]


def png(value: int, size: int = 12, fmt: str = "PNG") -> bytes:
    """A flat grey image at ``value``: it stays ``value`` whatever the resizing, so a test can tell
    which item landed where."""
    out = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(out, format=fmt)
    return out.getvalue()


def values(found) -> list[int]:
    return found.images[:, 0, 0, 0].tolist()


def write_parquet(path: Path, levels: list[int], captions=None, marks=None, image_column="image") -> Path:
    """Hugging Face datasets' layout: the image column holds ``{bytes, path}`` structs."""
    columns = {image_column: [{"bytes": png(v), "path": f"img{i}.png"} for i, v in enumerate(levels)]}
    if captions is not None:
        columns["text"] = captions
    if marks is not None:
        columns["is_sensitive"] = marks
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def write_saved_dataset(folder: Path, levels: list[int]) -> Path:
    """What ``datasets.Dataset.save_to_disk`` writes: Arrow stream files listed in state.json."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image": [{"bytes": png(v), "path": None} for v in levels], "label": [0] * len(levels)})
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}], "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def shards(folder: Path, levels: list[list[int]], caption: str = "a photo") -> str:
    """One tar per list of levels, ``u-000.tar`` ...; returns the brace pattern naming them."""
    for number, part in enumerate(levels):
        samples = [
            (f"s{number}_{i:03d}", {"png": png(v), "txt": f"{caption} {v}".encode(), "cls": b"0"})
            for i, v in enumerate(part)
        ]
        write_shard(folder / f"u-{number:03d}.tar", samples)
    return str(folder / f"u-{{000..{len(levels) - 1:03d}}}.tar")


def test_brace_patterns_and_what_a_path_is(tmp_path):
    assert expand_braces("u-{000..002}.tar") == ["u-000.tar", "u-001.tar", "u-002.tar"]
    assert expand_braces("{a,b}-{1..2}.parquet") == [
        "a-1.parquet",
        "a-2.parquet",
        "b-1.parquet",
        "b-2.parquet",
    ]
    assert expand_braces("plain.tar") == ["plain.tar"]
    write_parquet(tmp_path / "t.parquet", [10])
    write_saved_dataset(tmp_path / "saved", [10])
    write_shard(tmp_path / "x.tar", [("a", {"png": png(10)})])
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png(10))
    assert kind_of(str(tmp_path / "t.parquet")) == "parquet"
    write_parquet(tmp_path / "tables" / "a.parquet", [10])
    assert kind_of(str(tmp_path / "tables")) == "parquet"  # a folder of Parquet files, no images
    assert kind_of(str(tmp_path / "saved")) == "arrow" and kind_of(str(tmp_path / "x.tar")) == "tar"
    assert kind_of(str(tmp_path / "images")) == "folder" and kind_of("someone/faces") == "hub"
    assert kind_of(str(tmp_path / "u-{0..3}.tar")) == "tar"
    # Stored: local paths absolute, a pattern keeps its braces, a hub id stays an id.
    assert stored_spec("x.tar", tmp_path) == str(tmp_path / "x.tar")
    assert stored_spec("u-{0..3}.tar", tmp_path) == str(tmp_path / "u-{0..3}.tar")
    assert stored_spec("someone/faces", tmp_path) == "someone/faces"


def test_each_format_gives_the_same_images_in_order(tmp_path):
    levels = [10, 60, 110, 160, 210]
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, v in enumerate(levels):
        (folder / f"{i}.png").write_bytes(png(v))
    sources = {
        "folder": str(folder),
        "parquet": str(write_parquet(tmp_path / "u.parquet", levels)),
        "arrow": str(write_saved_dataset(tmp_path / "saved", levels)),
        "tar": shards(tmp_path / "tars", [levels[:2], levels[2:]]),
    }
    for kind, spec in sources.items():
        found = load_images(spec, 8, 3)
        assert found.kind == kind and found.images.shape == (5, 3, 8, 8) and found.images.dtype == torch.uint8
        assert values(found) == levels, kind
    assert load_images(sources["tar"], 8, 1).images.shape == (5, 1, 8, 8)
    # A changed item changes the fingerprint (a resumed run refuses changed data).
    before = load_images(sources["parquet"], 8, 3).fingerprint
    write_parquet(tmp_path / "u.parquet", [10, 60, 110, 160, 211])
    assert load_images(sources["parquet"], 8, 3).fingerprint != before


def test_a_parquet_image_column_may_hold_paths_or_bytes(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(png(40))
    table = pa.table({"picture": ["pics/a.png", None], "raw": [png(90), png(140)]})
    pq.write_table(table, tmp_path / "t.parquet")
    assert values(load_images(str(tmp_path / "t.parquet"), 8, 3, columns=Columns(image="raw"))) == [90, 140]
    found = load_images(str(tmp_path / "t.parquet"), 8, 3, columns=Columns(image="picture"))
    assert values(found) == [40] and found.skipped[0][0] == "t.parquet:1"


def test_a_missing_column_is_named_in_one_line(tmp_path, capsys):
    u = write_parquet(tmp_path / "u.parquet", [10] * 10, image_column="img")
    s = write_parquet(tmp_path / "s.parquet", [200] * 6)
    out = tmp_path / "run"
    argv = ["train", "--unlabeled", str(u), "--sensitive", str(s), "--out", str(out), *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and "no column 'image'" in err and "img" in err and "--image-column" in err
    )
    assert not out.exists()
    assert main([*argv, "--image-column", "img"]) == 2  # S has no column "img"
    assert "s.parquet has no column 'img'" in capsys.readouterr().err
    assert main([*argv, "--label-column", "nope", "--image-column", "img"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err


def test_a_corrupt_image_in_a_shard_is_skipped_or_refused(tmp_path, capsys):
    samples = [(f"k{i}", {"png": png(20 + i)}) for i in range(10)] + [("bad", {"png": b"\x89PNG broken"})]
    write_shard(tmp_path / "u-0.tar", samples)
    write_shard(tmp_path / "u-1.tar", [(f"m{i}", {"jpg": png(30 + i, fmt="JPEG")}) for i in range(6)])
    s = write_parquet(tmp_path / "s.parquet", [220] * 6)
    argv = ["train", "--unlabeled", str(tmp_path / "u-{0..1}.tar"), "--sensitive", str(s), *FAST]
    ok = tmp_path / "ok"
    assert main([*argv, "--out", str(ok)]) == 0
    assert "--unlabeled: skipped 1 unreadable image(s), e.g. u-0.tar:bad" in capsys.readouterr().err
    assert json.loads((ok / "summary.json").read_text())["data"]["unlabeled"] == 16
    strict = tmp_path / "strict"
    assert main([*argv, "--out", str(strict), "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "u-0.tar:bad" in err and "--strict" in err and not strict.exists()
    # A damaged shard and a missing one are named, one line each.
    (tmp_path / "u-1.tar").write_bytes((tmp_path / "u-1.tar").read_bytes()[:700])
    assert main([*argv, "--out", str(strict)]) == 2
    assert "u-1.tar" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--unlabeled",
                str(tmp_path / "u-{0..5}.tar"),
                "--sensitive",
                str(s),
                "--out",
                str(strict),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "u-2.tar does not exist" in err


@pytest.mark.parametrize("kind", ["parquet", "arrow", "tar"])
def test_train_and_estimate_prior_read_each_format_beside_a_folder(tmp_path, kind, capsys):
    """U in one format, S in an image folder (S and U may come from different sources)."""
    levels = [60] * 20 + [220] * 4
    if kind == "parquet":
        u = str(write_parquet(tmp_path / "u" / "part-0.parquet", levels[:12]).parent)
        write_parquet(tmp_path / "u" / "part-1.parquet", levels[12:])
    elif kind == "arrow":
        u = str(write_saved_dataset(tmp_path / "u", levels))
    else:
        u = shards(tmp_path / "tars", [levels[:12], levels[12:]])
    s = tmp_path / "S"
    s.mkdir()
    for i in range(12):
        (s / f"{i}.png").write_bytes(png(220))
    out = tmp_path / "run"
    assert main(["train", "--unlabeled", u, "--sensitive", str(s), "--out", str(out), *FAST]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["unlabeled_dir"] == u  # stored as given (absolute), pattern and all
    assert json.loads((out / "summary.json").read_text())["data"]["unlabeled"] == 24
    capsys.readouterr()
    assert (
        main(
            [
                "estimate-prior",
                "--unlabeled",
                u,
                "--sensitive",
                str(s),
                "--image-size",
                "8",
                "--epochs",
                "2",
                "--json",
            ]
        )
        == 0
    )
    assert 0.0 <= json.loads(capsys.readouterr().out)["beta"] < 1.0


def test_a_label_column_splits_one_table_into_u_and_s(tmp_path):
    levels = [10, 20, 30, 40, 200, 210]
    marks = [0, 0, 1, 0, 1, 0]
    table = write_parquet(tmp_path / "all.parquet", levels, marks=marks)
    u, s = load_pu(str(table), None, 8, 3, columns=Columns(label="is_sensitive"))
    assert values(u) == [10, 20, 40, 210] and values(s) == [30, 200]
    assert u.names == ["all.parquet:0", "all.parquet:1", "all.parquet:3", "all.parquet:5"]
    bad = write_parquet(tmp_path / "bad.parquet", levels, marks=["yes", "no", "no", "no", "no", "no"])
    with pytest.raises(DataSourceError, match="1 / true"):
        load_pu(str(bad), None, 8, 3, columns=Columns(label="is_sensitive"))
    out = tmp_path / "run"
    argv = ["train", "--unlabeled", str(table), "--label-column", "is_sensitive", "--out", str(out), *FAST]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())["data"]
    assert (summary["unlabeled"], summary["sensitive"]) == (4, 2)
    with pytest.raises(DataSourceError, match="not both"):  # the marked rows would go nowhere
        load_pu(str(table), str(table), 8, 3, columns=Columns(label="is_sensitive"))


def test_a_hub_id_goes_through_load_dataset(tmp_path, monkeypatch, capsys):
    """No network here: a stand-in ``datasets`` module returns what ``load_dataset`` returns (a
    Dataset whose arrow format gives a pyarrow Table); the real download is not tested."""
    monkeypatch.chdir(tmp_path)
    asked = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: (asked.append((name, split)), _Formatted(_hub_table()))[1]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    found = load_images("someone/faces", 8, 3)
    assert asked == [("someone/faces", "train")] and found.kind == "hub" and values(found) == [50, 70]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    assert main(["estimate-prior", "--unlabeled", "someone/faces", "--sensitive", "other/set"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install datasets" in err and "someone/faces" in err


class _Formatted:
    """What load_dataset returns, as far as pudm uses it: ``with_format("arrow")[:]`` is a Table."""

    def __init__(self, table):
        self.table = table

    def with_format(self, kind):
        assert kind == "arrow"
        return _Rows(self.table)


class _Rows:
    def __init__(self, table):
        self.table = table

    def __getitem__(self, key):
        assert key == slice(None)
        return self.table


def _hub_table():
    return pa.table({"image": [{"bytes": png(v), "path": None} for v in (50, 70)]})


def test_sd_reads_captions_from_a_table_and_from_shards(tmp_path):
    from pudm.sd import SDDataConfig, SDError, load_text_images

    u = write_parquet(tmp_path / "u.parquet", [10, 20, 30], captions=["a man", "a man", "a woman"])
    s = shards(tmp_path / "s", [[200, 210]], caption="brad")
    data = load_text_images(SDDataConfig(unlabeled=str(u), sensitive=s, resolution=8), need_sensitive=True)
    assert data.num_unlabeled == 3 and data.num_sensitive == 2
    assert [data.captions[i] for i in data.unlabeled_caption] == ["a man", "a man", "a woman"]
    assert [data.captions[i] for i in data.sensitive_caption] == ["brad 200", "brad 210"]
    uncaptioned = write_parquet(tmp_path / "plain.parquet", [10, 20])
    with pytest.raises(SDError, match="has no caption"):
        load_text_images(SDDataConfig(unlabeled=str(uncaptioned), resolution=8), need_sensitive=False)
    prompted = SDDataConfig(unlabeled=str(uncaptioned), unlabeled_prompt="a photo", resolution=8)
    assert load_text_images(prompted, need_sensitive=False).captions == ["a photo"]


def test_brace_edge_cases_and_missing_paths_are_not_hub_ids(tmp_path):
    assert expand_braces("{a,{b,c}}.tar") == ["a.tar", "b.tar", "c.tar"]
    assert expand_braces("u-{1..010}.tar")[:2] == ["u-001.tar", "u-002.tar"]
    assert expand_braces("u-{3..1}.tar") == ["u-3.tar", "u-2.tar", "u-1.tar"]
    for bad in ("u-{}.tar", "u-{0..2.tar", "u-{x}.tar"):
        with pytest.raises(DataSourceError):
            expand_braces(bad)
    with pytest.raises(DataSourceError, match="does not exist"):
        kind_of("data/u-000.tar")  # a missing shard, not a hub id
    (tmp_path / "data").mkdir()
    assert stored_spec("data/u", tmp_path) == str(tmp_path / "data" / "u")  # a local folder's child


def test_a_relative_source_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_parquet(tmp_path / "u.parquet", [60] * 20 + [220] * 4)
    (tmp_path / "S").mkdir()
    for i in range(6):
        (tmp_path / "S" / f"{i}.png").write_bytes(png(220))
    assert main(["train", "--unlabeled", "u.parquet", "--sensitive", "S", "--out", "run", *FAST]) == 0
    data = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert (data["unlabeled_dir"], data["sensitive_dir"]) == (
        str(tmp_path / "u.parquet"),
        str(tmp_path / "S"),
    )


def test_damaged_or_foreign_tables_and_shards_are_one_line(tmp_path, capsys):
    dict_folder = tmp_path / "dict"
    write_saved_dataset(dict_folder / "train", [10, 20])
    (dict_folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert values(load_images(str(dict_folder), 8, 3)) == [10, 20]  # a DatasetDict gives its train split
    (dict_folder / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    with pytest.raises(DataSourceError, match="without a train split"):
        load_images(str(dict_folder), 8, 3)
    broken = write_saved_dataset(tmp_path / "broken", [10])
    (broken / "state.json").write_text("{not json")
    with pytest.raises(DataSourceError, match="not a readable save_to_disk folder"):
        load_images(str(broken), 8, 3)
    pq.write_table(pa.table({"image": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(DataSourceError, match="holds int64, not images"):
        load_images(str(tmp_path / "ints.parquet"), 8, 3)
    write_shard(
        tmp_path / "apart.tar", [("a", {"png": png(1)}), ("b", {"png": png(2)}), ("a", {"txt": b"x"})]
    )
    with pytest.raises(DataSourceError, match="holds sample a twice"):
        load_images(str(tmp_path / "apart.tar"), 8, 3)
    s = write_parquet(tmp_path / "s.parquet", [220] * 6)
    out = tmp_path / "run"
    assert main(["train", "--unlabeled", str(broken), "--sensitive", str(s), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "save the data set again" in err and not out.exists()
