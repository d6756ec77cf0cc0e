"""pudm train beyond the digits preset: image folders, fine-tuning a pretrained pipeline, and a
class-conditional UNet, each through the same commands as the digits preset."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, UNet2DModel
from PIL import Image
from safetensors.torch import load_file

from conftest import tree_digest
from pudm.cli import main

FAST = [
    "--steps",
    "4",
    "--batch-size",
    "8",
    "--log-every",
    "2",
    "--checkpoint-every",
    "2",
    "--warmup-steps",
    "0",
]
FAST += ["--sample-steps", "2", "--grid-size", "4", "--quiet"]


def _folder(path: Path, count: int, value: int, seed: int = 0, mixed: bool = False) -> Path:
    """``count`` noisy images around grey level ``value``; ``mixed``: sizes, modes, nesting vary."""
    rng = np.random.RandomState(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = (8 + 3 * (i % 4), 8 + 2 * (i % 3)) if mixed else (8, 8)
        pixels = np.clip(value + rng.randint(-20, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        picture = Image.fromarray(pixels)
        if mixed and i % 2:
            picture = picture.convert("L")
        target = (
            path
            / ("sub" if mixed and i % 3 == 0 else "")
            / f"img{i:03d}.{'jpg' if mixed and i % 5 == 0 else 'png'}"
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    _folder(root / "U", 24, 60, seed=0, mixed=True)
    _folder(root / "U" / "hidden", 3, 220, seed=1)  # a few sensitive-looking items inside U
    _folder(root / "S", 12, 220, seed=2)
    _folder(root / "T", 12, 60, seed=3)
    return root


def _grey(folders: Path, out: Path, *extra: str) -> list[str]:
    argv = ["train", "--unlabeled", str(folders / "U"), "--sensitive", str(folders / "S")]
    return [*argv, "--image-size", "8", "--channels", "1", "--out", str(out), *FAST, *extra]


def test_image_folders_train_sample_and_evaluate_like_a_preset(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_grey(folders, out, "--test", str(folders / "T"), "--method", "pu", "--beta", "0.1")) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "folders" and config["data"]["source"] == "folders"
    assert config["data"]["unlabeled_dir"] == str((folders / "U").resolve())
    summary = json.loads((out / "summary.json").read_text())["data"]
    assert summary["unlabeled"] == 27 and summary["sensitive"] == 12 and summary["test"] == 12
    assert summary["unlabeled_sensitive"] is None  # folders carry no hidden truth
    assert main(["sample", str(out), "--num", "3", "--out", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (3, 8, 8, 1)

    classifier = tmp_path / "clf"
    argv = ["classifier", "train", "--normal", str(folders / "T"), "--sensitive", str(folders / "S")]
    assert (
        main([*argv, "--image-size", "8", "--channels", "1", "--epochs", "3", "--out", str(classifier)]) == 0
    )
    assert main(["evaluate", str(out), "--classifier", str(classifier), "--num", "20", "--quiet"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["num_samples"] == 20 and np.isfinite(result["fid_classifier"])

    # Without a test folder there is no FID reference: evaluation says so instead of failing.
    bare = tmp_path / "bare"
    assert main(_grey(folders, bare, "--method", "unsupervised")) == 0
    capsys.readouterr()
    assert main(["evaluate", str(bare), "--classifier", str(classifier), "--num", "10", "--quiet"]) == 0
    assert "no FID" in capsys.readouterr().out
    assert json.loads((bare / "eval.json").read_text())["fid_classifier"] is None


def test_corrupt_files_in_a_training_folder(folders, tmp_path, capsys):
    import shutil

    data = tmp_path / "U"
    shutil.copytree(folders / "U", data)
    (data / "zz-broken.png").write_bytes(b"\x89PNG broken")
    (data / "notes.md").write_text("ignored: not an image")
    argv = ["train", "--unlabeled", str(data), "--sensitive", str(folders / "S"), "--image-size", "8"]
    assert main([*argv, "--out", str(tmp_path / "ok"), *FAST]) == 0
    assert "--unlabeled: skipped 1 unreadable image(s)" in capsys.readouterr().err
    out = tmp_path / "strict"
    assert main([*argv, "--out", str(out), *FAST, "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zz-broken.png" in err and not out.exists()


def test_image_folder_bad_input_is_one_line(folders, tmp_path, capsys):
    done = tmp_path / "done"
    assert main(_grey(folders, done, "--method", "unsupervised")) == 0
    capsys.readouterr()
    before = tree_digest(done)
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("x")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"nope")
    new = tmp_path / "new"
    u, s = str(folders / "U"), str(folders / "S")
    cases = [
        (
            ["train", "--unlabeled", str(tmp_path / "missing"), "--sensitive", s],
            "--unlabeled",
            "does not exist",
        ),
        (["train", "--unlabeled", u, "--sensitive", str(empty)], "--sensitive", "holds no images"),
        (["train", "--unlabeled", str(texts), "--sensitive", s], "holds no images"),
        (["train", "--unlabeled", str(broken), "--sensitive", s], "none of its 1 image files"),
        (["train", "--unlabeled", u], "--sensitive"),
        (["train", "--unlabeled", u, "--sensitive", s, "--method", "oracle"], "hidden labels"),
        (["train", "--unlabeled", u, "--sensitive", s, "--test", str(empty)], "--test", "holds no images"),
        (["train", "--unlabeled", u, "--sensitive", s, "--image-size", "10"], "halved"),
        (_grey(folders, done), "already holds a run"),
    ]
    for argv, *expected in cases:
        if "--out" not in argv:
            argv = [*argv, "--out", str(new), *FAST]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        for text in expected:
            assert text in err, err
    assert not new.exists() or not any(new.iterdir())
    assert tree_digest(done) == before


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next((folder / "unet").glob("*.safetensors")))


def test_fine_tuning_starts_from_the_pretrained_weights(tmp_path):
    pre = tmp_path / "pre"
    assert main(["train", "--method", "unsupervised", "--out", str(pre), *FAST]) == 0
    # lr ~0 and no EMA averaging: the fine-tuned pipeline is the pretrained one.
    same = tmp_path / "same"
    argv = ["train", "--method", "pu", "--pretrained", str(pre), "--lr", "1e-12", "--ema-decay", "0"]
    assert main([*argv, "--out", str(same), *FAST]) == 0
    mine, theirs = _unet_weights(same / "pipeline"), _unet_weights(pre / "pipeline")
    assert all(torch.allclose(mine[name], theirs[name], atol=1e-6) for name in theirs)
    config = json.loads((same / "config.json").read_text())
    assert config["model"]["pretrained"] == str(pre.resolve())
    assert config["model"]["prediction_type"] == "v_prediction"  # the pretrained schedule's
    assert config["sample"]["sampler"] == "ddim"  # the paper's fine-tuning sampler (steps: --sample-steps)
    # A real learning rate moves the weights away from there.
    moved = tmp_path / "moved"
    assert (
        main(["train", "--method", "pu", "--pretrained", str(pre / "pipeline"), "--out", str(moved), *FAST])
        == 0
    )
    mine = _unet_weights(moved / "pipeline")
    assert any(not torch.allclose(mine[name], theirs[name], atol=1e-6) for name in theirs)
    assert DDPMPipeline.from_pretrained(moved / "pipeline", use_safetensors=True).unet is not None


def test_fine_tuning_a_ddim_pipeline_folder_and_its_errors(tmp_path, capsys):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )
    folder = tmp_path / "ddim"
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(
        folder
    )
    out = tmp_path / "run"
    argv = ["train", "--pretrained", str(folder), "--preset", "digits_odd", "--channels", "3"]
    assert main([*argv, "--out", str(out), *FAST]) == 0  # 8 px digits copied to 3 channels
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["beta_schedule"] == "squaredcos_cap_v2"
    assert config["model"]["block_out_channels"] == [16, 32]
    # Resume of a fine-tuning run keeps its pretrained source; another one is refused.
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--pretrained", str(tmp_path)]) == 2
    assert "fine-tuned from" in capsys.readouterr().err
    for bad, message in (
        (tmp_path / "nothing", "does not exist"),
        (tmp_path, "neither a diffusers pipeline"),
    ):
        assert main(["train", "--pretrained", str(bad), "--out", str(tmp_path / "x"), *FAST]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    argv = ["train", "--pretrained", str(folder), "--image-size", "16", "--channels", "3"]
    assert main([*argv, "--out", str(tmp_path / "y"), *FAST]) == 2
    assert "takes 8 px images with 3 channels" in capsys.readouterr().err


def test_class_conditional_unet_samples_per_class(tmp_path, capsys):
    """Conditioned on the set an item came from (U: class 0, S: class 1), as the paper's captions."""
    out = tmp_path / "cc"
    argv = ["train", "--class-conditional", "--method", "pu", "--out", str(out), *FAST, "--grid-size", "10"]
    assert main(argv) == 0
    unet_config = json.loads((out / "pipeline" / "unet" / "config.json").read_text())
    assert unet_config["num_class_embeds"] == 2
    draws = {}
    for label in ("0", "0", "1", None):
        target = tmp_path / f"c{label}-{len(draws)}.npz"
        given = [] if label is None else ["--class", label]
        assert main(["sample", str(out), "--num", "4", *given, "--out", str(target)]) == 0
        draws[len(draws)] = np.load(target)["images"]
    assert np.array_equal(draws[0], draws[1])  # same class, same seed: same images
    assert not np.array_equal(draws[0], draws[2])  # S's label, same noise: other images
    assert np.array_equal(draws[0], draws[3])  # the default is U's label
    capsys.readouterr()
    assert main(["sample", str(out), "--num", "2", "--class", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "--class must be in 0..1" in capsys.readouterr().err
