"""Runs that survive kills, non-finite losses that never reach the weights, results that repeat."""

import json
import signal
import subprocess
import sys
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


# 12 steps, a metrics line every 3, a checkpoint every 2 (not a multiple: a resume lands inside a
# tick), two checkpoints kept (so rotation happens).
KILL_ARGS = ["--steps", "12", "--log-every", "3", "--checkpoint-every", "2", "--keep-checkpoints", "2"]
KILL_ARGS += ["--batch-size", "8", "--quiet", "--sample-steps", "2", "--grid-size", "4"]
# (point, which occurrence of it in that process): each kill lands after some progress.
KILLS = [
    ("metrics-line", 1),  # half the step-3 line on disk; the last checkpoint is step 2
    ("checkpoint-model", 2),  # resumed at 2: checkpoint 4 complete, checkpoint 6 half-written
    ("checkpoint-state", 2),
    ("checkpoint-rename", 1),  # a complete checkpoint under its temporary name
    ("checkpoint-rotate", 1),  # an old checkpoint renamed to its trash name, not deleted
    ("optimizer-step", 3),  # inside a step: gradients computed, no update
    ("ema-update", 2),  # inside a step: weights updated, EMA not
    ("resume-truncate", 1),  # a resume killed before it drops the metrics past its checkpoint
    ("pipeline", 1),  # the end: the pipeline in its temporary folder
    ("summary", 1),  # the end: all but summary.json
]


def _killable(out: Path, point: str, nth: int) -> subprocess.CompletedProcess:
    driver = Path(__file__).with_name("killpoint.py")
    resume = ["--resume"] if runs.holds_run(out) else []
    command = [sys.executable, str(driver), point, str(nth), "train", "--out", str(out), *KILL_ARGS, *resume]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_a_kill_at_every_phase_of_steps_checkpoints_and_resumes_then_resume_is_exact(tmp_path):
    """SIGKILL a run at each chosen phase in turn (killpoint.py), resuming after each: every
    checkpoint left behind loads, and the run ends with exactly the weights (EMA and raw) and the
    metrics lines of a run that was never killed. Every process runs alike (one intra-op thread):
    CPU kernels round differently with another thread count, so a comparison across thread
    counts would say nothing about resuming."""
    reference = tmp_path / "reference"
    assert _killable(reference, "none", 0).returncode == 0
    out = tmp_path / "killed"
    for point, nth in KILLS:
        done = _killable(out, point, nth)
        assert done.returncode == -signal.SIGKILL, (point, done.returncode, done.stderr[-2000:])
        for checkpoint in runs.list_checkpoints(out):
            loaded = runs.load_checkpoint(checkpoint)  # never corrupt: raises if it were
            assert loaded["state"]["step"] == int(checkpoint.name.split("_")[1])
        assert not runs.is_complete(out), point
    assert _killable(out, "none", 0).returncode == 0
    assert runs.is_complete(out)
    assert _metrics(out) == _metrics(reference), "the same lines, a resumed tick included"
    assert _same_weights(out, reference)
    final, expected = runs.list_checkpoints(out)[-1], runs.list_checkpoints(reference)[-1]
    assert final.name == expected.name == "step_00000012"
    mine, theirs = runs.load_checkpoint(final), runs.load_checkpoint(expected)
    for part in ("model", "ema"):
        assert all(torch.equal(mine[part][k], theirs[part][k]) for k in theirs[part]), part
    leftovers = [p.name for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if p.name.startswith(".")]
    assert leftovers == [], "temporary files of killed writers are cleaned up on resume"


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
