"""Runs that survive kills, non-finite losses that never reach the weights, results that repeat."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import poison_loss
from pudm import runs
from pudm.cli import main

TINY = ["--batch-size", "8", "--log-every", "2", "--quiet", "--sample-steps", "2", "--grid-size", "4"]
WEIGHTS = "pipeline/unet/diffusion_pytorch_model.safetensors"
TIMING = ("steps_per_second", "images_per_second")


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", "--out", str(out), "--steps", "30", "--checkpoint-every", "1", *TINY]) == 0
    return out


def test_same_seed_same_config_repeats_exactly(tmp_path, reference_run):
    again = tmp_path / "again"
    assert main(["train", "--out", str(again), "--steps", "30", "--checkpoint-every", "1", *TINY]) == 0
    assert _metrics(again) == _metrics(reference_run), "identical loss trace"
    assert _same_weights(again, reference_run)
    assert (again / "samples.png").read_bytes() == (reference_run / "samples.png").read_bytes()
    other = tmp_path / "other-seed"
    assert main(["train", "--out", str(other), "--steps", "30", "--seed", "1", *TINY]) == 0
    assert _metrics(other) != _metrics(reference_run), "the seed matters"


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_result(tmp_path, reference_run):
    """SIGKILL the real command at random moments (with a checkpoint every step, many kills land
    while one is being written); every checkpoint left behind must load, and --resume must finish
    with the weights of the run that was never killed."""
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "pudm", "train", "--out", str(out), "--steps", "30"]
    command += ["--checkpoint-every", "1", "--keep-checkpoints", "2", *TINY]
    rng = random.Random(1234)
    kills = 0
    for _ in range(8):
        resume = ["--resume"] if runs.holds_run(out) else []
        process = subprocess.Popen([*command, *resume], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait for training to be under way (imports take seconds), then a random extra moment.
        start_step = _last_checkpoint_step(out)
        deadline = time.time() + 120
        while _last_checkpoint_step(out) <= start_step and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        for checkpoint in runs.list_checkpoints(out):
            loaded = runs.load_checkpoint(checkpoint)  # never corrupt: raises if it were
            assert loaded["state"]["step"] == int(checkpoint.name.split("_")[1])
        assert len(runs.list_checkpoints(out)) <= 2
        if runs.is_complete(out):
            break
    assert kills >= 3, "the run finished before it could be killed: make it longer"
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert runs.is_complete(out)
    # One metrics line per tick; a tick cut by a kill averages only the steps after the resume,
    # so the lines themselves may differ from the reference. The weights may not.
    assert [row["step"] for row in _metrics(out)] == list(range(2, 31, 2))
    assert _same_weights(out, reference_run)
    final, reference = runs.list_checkpoints(out)[-1], runs.list_checkpoints(reference_run)[-1]
    assert final.name == reference.name == "step_00000030"
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            runs.load_checkpoint(final)["model"].values(),
            runs.load_checkpoint(reference)["model"].values(),
            strict=True,
        )
    ), "raw weights too, not only EMA"
    leftovers = [p.name for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if p.name.startswith(".")]
    assert leftovers == [], "temporary files of killed writers are cleaned up on resume"


def _last_checkpoint_step(out: Path) -> int:
    checkpoints = runs.list_checkpoints(out)
    return int(checkpoints[-1].name.split("_")[1]) if checkpoints else 0


def test_temporaries_of_a_killed_writer_are_removed_or_restored(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step_00000004.tmp-99").mkdir(parents=True)
    (run / ".metrics.jsonl.tmp-99").write_text("half")
    (run / ".pipeline.old-99").mkdir()  # killed between the two renames: pipeline/ is missing
    (run / ".pipeline.old-99" / "model_index.json").write_text("{}")
    (run / "checkpoints" / "step_00000002").mkdir()
    (run / "checkpoints" / ".step_00000001.trash-99").mkdir()  # killed while rotating it out
    removed = runs.remove_temporaries(run)
    assert sorted(p.name for p in removed) == [
        ".metrics.jsonl.tmp-99",
        ".step_00000001.trash-99",
        ".step_00000004.tmp-99",
    ]
    assert (run / "pipeline" / "model_index.json").is_file()
    assert (run / "checkpoints" / "step_00000002").is_dir()


def test_a_nonfinite_loss_skips_the_step_and_is_logged(tmp_path, monkeypatch):
    poison_loss(monkeypatch, lambda n: n == 3)
    out = tmp_path / "nan-once"
    assert main(["train", "--out", str(out), "--steps", "6", "--checkpoint-every", "3", *TINY]) == 0
    rows = _metrics(out)
    assert [row["skipped_nonfinite"] for row in rows] == [0, 1, 0]
    assert all(row["loss"] == row["loss"] for row in rows), "the skipped loss is not averaged in"
    weights = load_file(out / WEIGHTS)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_repeated_nonfinite_losses_stop_with_a_checkpoint_of_the_last_good_state(
    tmp_path, monkeypatch, capsys
):
    poison_loss(monkeypatch, lambda n: n >= 5)
    out = tmp_path / "nan-always"
    code = main(["train", "--out", str(out), "--steps", "40", "--checkpoint-every", "100", *TINY])
    assert code == 1
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert "not finite for 5 steps in a row" in err and "--lr" in err and "Traceback" not in err
    (checkpoint,) = runs.list_checkpoints(out)
    state = runs.load_checkpoint(checkpoint)
    assert state["state"]["step"] == 9  # 4 good steps, 5 skipped
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not runs.is_complete(out)


def test_a_tampered_checkpoint_is_refused(tmp_path, reference_run, capsys):
    import shutil

    run = tmp_path / "tampered"
    shutil.copytree(reference_run, run)
    for name in ("summary.json",):
        (run / name).unlink()
    last = runs.list_checkpoints(run)[-1]
    state = last / "state.pt"
    state.write_bytes(state.read_bytes()[:100] + b"tampered" + state.read_bytes()[108:])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot be read" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before, "nothing was touched"


def _one_line_exit_2(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err, err
    # One line names the problem and the fix (a resume may print its one-line banner first).
    (line,) = [line for line in err.splitlines() if "error:" in line]
    return line


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--sampler", "magic", "--out", "{tmp}/r"], "invalid choice: 'magic'"),
        (["sample", "{tmp}/r", "--sampler", "magic", "--out", "{tmp}/x.png"], "invalid choice: 'magic'"),
        (["evaluate", "{tmp}/r", "--classifier", "{tmp}/c", "--sampler", "x"], "invalid choice: 'x'"),
        (["estimate-prior", "--preset", "imagenet"], "unknown preset"),
        (["estimate-prior", "--num-sensitive", "5000"], "sensitive items"),
        (["benchmark", "--betas", "0.1,x", "--out", "{tmp}/b"], "argument --betas: --beta takes a number"),
        (["train", "--beta", "lots", "--out", "{tmp}/r"], "--beta takes a number in [0, 1) or auto"),
        (["train", "--out", "{tmp}/file/run"], "not writable"),
        (["classifier", "train", "--out", "{tmp}/file"], "is a file"),
        (["benchmark", "--out", "{tmp}/file", "--seeds", "0", "--methods", "pu"], "is a file"),
    ],
)
def test_bad_input_matrix_one_line_exit_2_nothing_written(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("keep")
    before = sorted(p.name for p in tmp_path.iterdir())
    err = _one_line_exit_2([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "file").read_text() == "keep"


def test_a_checkpoint_from_another_config_is_refused(tmp_path, reference_run, capsys):
    import shutil

    run = tmp_path / "other"
    assert (
        main(["train", "--out", str(run), "--steps", "4", "--seed", "3", "--checkpoint-every", "2", *TINY])
        == 0
    )
    capsys.readouterr()
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(reference_run / "checkpoints", run / "checkpoints")  # another run's checkpoints
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    err = _one_line_exit_2(["train", "--out", str(run), "--resume", "--quiet"], capsys)
    assert "written by another configuration" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
