"""The real command line, end to end: train a few steps, resume, sample, load with diffusers."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tree_digest
from pudm.cli import main

TINY = ["--steps", "6", "--batch-size", "16", "--checkpoint-every", "3", "--log-every", "2", "--quiet"]
TINY += ["--sample-steps", "4", "--grid-size", "8"]


def train(out: Path, *extra: str) -> int:
    return main(["train", "--out", str(out), *TINY, *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "pu"
    assert train(out, "--method", "pu", "--beta", "0.1") == 0
    return out


def test_train_writes_a_complete_run(finished_run):
    run = finished_run
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["method"] == "pu" and config["train"]["steps"] == 6
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6]
    for key in (
        "bracket",
        "positive_risk",
        "mean_unlabeled_loss",
        "mean_sensitive_loss",
        "corrected_fraction",
    ):
        assert np.isfinite(lines[-1][key])
    assert lines[-1]["mean_sensitive_loss"] > 0, "pu batches hold S items"
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step_00000003", "step_00000006"]
    assert (run / "samples.png").stat().st_size > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["unlabeled"] == 825 and summary["data"]["sensitive"] == 300


def test_saved_pipeline_loads_and_samples_with_diffusers_alone(finished_run):
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(finished_run / "pipeline")
    assert type(pipeline).__name__ == "DDPMPipeline"
    images = pipeline(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    assert (finished_run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_resume_after_interruption_gives_the_same_weights(tmp_path, finished_run):
    """Keep only what a run killed after step 4 leaves behind, resume, compare with the full run."""
    run = tmp_path / "resumed"
    assert train(run, "--method", "pu", "--beta", "0.1", "--keep-checkpoints", "5") == 0
    for name in ("pipeline", "samples.png", "summary.json", "checkpoints/step_00000006"):
        path = run / name
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + '\n{"step": 6, "lo')  # cut mid-line
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    weights = "pipeline/unet/diffusion_pytorch_model.safetensors"
    resumed, full = load_file(run / weights), load_file(finished_run / weights)
    assert resumed.keys() == full.keys()
    assert all(torch.equal(resumed[k], full[k]) for k in full)


def test_resume_of_a_finished_run_changes_nothing(finished_run, capsys):
    before = tree_digest(finished_run)
    assert main(["train", "--out", str(finished_run), "--resume", "--quiet"]) == 0
    assert "complete" in capsys.readouterr().out
    assert tree_digest(finished_run) == before


@pytest.mark.parametrize("method", ["unsupervised", "supervised", "oracle"])
def test_every_method_trains(tmp_path, method):
    assert train(tmp_path / method, "--method", method) == 0
    last = json.loads((tmp_path / method / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(last["loss"])
    if method in ("unsupervised", "oracle"):
        assert last["sensitive_per_batch"] == 0, "methods that ignore S draw batches from U alone"
    summary = json.loads((tmp_path / method / "summary.json").read_text())
    assert summary["steps"] == 6


def test_nn_correction_and_fixed_sensitive_per_batch(tmp_path):
    out = tmp_path / "nn"
    assert train(out, "--correction", "nn", "--sensitive-per-batch", "5") == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(line["sensitive_per_batch"] == 5 for line in lines)


@pytest.mark.parametrize("precision", ["bf16"])
def test_mixed_precision_run_trains_and_records_its_precision(tmp_path, finished_run, precision):
    out = tmp_path / precision
    assert train(out, "--method", "pu", "--mixed-precision", precision) == 0
    assert json.loads((out / "config.json").read_text())["train"]["mixed_precision"] == precision
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(line["loss"]) for line in lines)
    # Same seed and data as the float32 run: the same loss up to bf16 rounding, but not bit-equal.
    reference = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] == pytest.approx(reference[0]["loss"], rel=0.05)
    assert lines[0]["loss"] != reference[0]["loss"], "autocast was not applied"
    # The process-wide accelerate state follows each run's precision: float32 again afterwards.
    assert train(tmp_path / "fp32", "--method", "pu") == 0


def test_overwrite_replaces_a_run(tmp_path, finished_run):
    out = tmp_path / "run"
    assert train(out, "--seed", "1") == 0
    (out / "stray.txt").write_text("old")
    assert train(out, "--seed", "2", "--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == 2
    assert not (out / "stray.txt").exists()


def test_sample_writes_png_and_npz_deterministically(tmp_path, finished_run):
    png, npz, again = tmp_path / "grid.png", tmp_path / "a.npz", tmp_path / "b.npz"
    assert (
        main(
            ["sample", str(finished_run), "--num", "10", "--steps", "4", "--out", str(png), "--out", str(npz)]
        )
        == 0
    )
    # --sample-steps is the name every command uses; --steps stays as its alias.
    assert (
        main(
            [
                "sample",
                str(finished_run / "pipeline"),
                "--num",
                "10",
                "--sample-steps",
                "4",
                "--out",
                str(again),
            ]
        )
        == 0
    )
    # A copied pipeline in a folder of its own (pipeline/ but no config.json) is a bare pipeline.
    bare = tmp_path / "copied"
    shutil.copytree(finished_run / "pipeline", bare / "pipeline")
    assert main(["sample", str(bare), "--num", "10", "--steps", "4", "--out", str(tmp_path / "c.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "c.npz")["images"], np.load(again)["images"])
    images = np.load(npz)["images"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    assert np.array_equal(images, np.load(again)["images"])
    assert png.stat().st_size > 0
    assert (
        main(
            ["sample", str(finished_run), "--num", "4", "--sampler", "dpm", "--steps", "5", "--out", str(png)]
        )
        == 0
    )


BAD_TRAIN = [
    (["--preset", "imagenet"], "unknown preset"),
    (["--method", "ascent"], "unknown method"),
    (["--beta", "1.0"], "--beta must be in [0, 1)"),
    (["--beta", "-0.1"], "--beta must be in [0, 1)"),
    (["--steps", "0"], "--steps must be > 0"),
    (["--num-sensitive", "0"], "--num-sensitive must be > 0"),
    (["--num-sensitive", "5000"], "sensitive items"),
    (["--sensitive-per-batch", "16"], "--sensitive-per-batch"),
    (["--image-size", "10"], "divisible by 4"),
]


@pytest.mark.parametrize("extra,message", BAD_TRAIN)
def test_bad_train_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "new"
    assert train(out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_existing_run_is_never_clobbered(finished_run, capsys, tmp_path):
    before = tree_digest(finished_run)
    assert train(finished_run) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--out", str(finished_run), "--resume", "--beta", "0.3", "--quiet"]) == 2
    assert "--beta" in capsys.readouterr().err
    assert tree_digest(finished_run) == before
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "cat.jpg").write_bytes(b"x")
    assert train(stranger, "--overwrite") == 2
    assert "not a pudm run" in capsys.readouterr().err
    assert (stranger / "cat.jpg").read_bytes() == b"x"


def test_resume_of_a_run_killed_before_its_first_checkpoint(tmp_path, finished_run):
    run = tmp_path / "early"
    run.mkdir()
    (run / "config.json").write_text((finished_run / "config.json").read_text())
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n')
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    weights = "pipeline/unet/diffusion_pytorch_model.safetensors"
    resumed, full = load_file(run / weights), load_file(finished_run / weights)
    assert all(torch.equal(resumed[k], full[k]) for k in full)


def test_resume_without_checkpoint_or_run(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--num", "0"], "--num must be > 0"),
        (["--sample-steps", "0"], "--sample-steps must be > 0"),
        (["--steps", "0"], "--sample-steps must be > 0"),
        (["--out", "x.jpg"], ".png"),
    ],
)
def test_bad_sample_input(finished_run, tmp_path, capsys, args, message):
    full = ["sample", str(finished_run), *args]
    if "--out" not in args:
        full += ["--out", str(tmp_path / "x.png")]
    assert main(full) == 2
    assert message in capsys.readouterr().err


def test_sample_from_unfinished_run(tmp_path, capsys):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main(["sample", str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_console_entry_point_help_and_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pudm", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("train", "sample", "classifier", "evaluate", "benchmark", "demo"):
        assert command in result.stdout
    from pudm import __version__

    result = subprocess.run([sys.executable, "-m", "pudm", "--version"], capture_output=True, text=True)
    assert (result.returncode, result.stdout.strip()) == (0, f"pudm {__version__}")
    result = subprocess.run(
        [sys.executable, "-m", "pudm", "train", "--beta", "2", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["pudm train: error: --beta must be in [0, 1), got 2.0"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, signum):
    from pudm import runs

    out = tmp_path / "long"
    command = [sys.executable, "-m", "pudm", "train", "--out", str(out), "--steps", "100000"]
    command += ["--batch-size", "8", "--log-every", "2", "--checkpoint-every", "100000", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "--resume" in err and "Traceback" not in err
    (checkpoint,) = runs.list_checkpoints(out)
    step = runs.load_checkpoint(checkpoint)["state"]["step"]
    assert 4 <= step < 100000


def test_a_defect_keeps_its_traceback_while_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """Only pudm's own UsageError becomes 'error: ...' with exit 2; a ValueError from inside a
    library is a defect: it propagates (traceback, exit 1) instead of posing as bad input."""
    import pudm.datasets

    def broken(*args, **kwargs):
        raise ValueError("something inside torch went wrong")

    monkeypatch.setattr(pudm.datasets, "split_from_config", broken)
    with pytest.raises(ValueError, match="inside torch"):
        main(["train", "--out", str(tmp_path / "run"), "--steps", "2", "--quiet"])
    from pudm import UsageError

    def user_error(*args, **kwargs):
        raise UsageError("--unlabeled x does not exist: check the path")

    monkeypatch.setattr(pudm.datasets, "split_from_config", user_error)
    assert main(["train", "--out", str(tmp_path / "run2"), "--steps", "2", "--quiet"]) == 2
    assert (
        capsys.readouterr().err.strip() == "pudm train: error: --unlabeled x does not exist: check the path"
    )
