"""--report-to: experiment trackers through accelerate mirror metrics.jsonl and get the grid."""

import importlib.util
import json

import pytest

from pudm.cli import main

TINY = ["--steps", "4", "--batch-size", "8", "--log-every", "2", "--sample-steps", "2", "--grid-size", "4"]
TINY += ["--quiet"]


def test_tensorboard_event_files_hold_the_loss_scalars_and_the_grid(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (scripts/setup.sh installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--report-to", "tensorboard"]) == 0
    events = sorted((out / "logs" / "pudm").glob("events.out.tfevents.*"))  # hparams: a subfolder
    assert events, "TensorBoard wrote no event file"
    logged = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0}).Reload()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = logged.Scalars("loss")
    assert [event.step for event in loss] == [m["step"] for m in metrics] == [2, 4]
    assert [event.value for event in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert {"bracket", "lr", "grad_norm"} <= set(logged.Tags()["scalars"])
    (image,) = logged.Images("samples")
    assert image.step == 4 and image.width > 0


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_one_line_naming_the_extra(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err
    assert "--report-to wandb: wandb is not installed: pip install 'pudm[wandb]'" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_resumed_run_logs_each_step_once(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (scripts/setup.sh installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert (
        main(["train", "--out", str(out), *TINY, "--report-to", "tensorboard", "--checkpoint-every", "2"])
        == 0
    )
    # As if the run had been killed after step 4 with its last checkpoint at step 2.
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_00000004")
    (out / "summary.json").unlink()
    assert (
        main(
            [
                "train",
                "--out",
                str(out),
                *TINY,
                "--report-to",
                "tensorboard",
                "--checkpoint-every",
                "2",
                "--resume",
            ]
        )
        == 0
    )
    logged = EventAccumulator(str(out / "logs" / "pudm"), size_guidance={"scalars": 0}).Reload()
    steps = [event.step for event in logged.Scalars("loss")]
    assert steps == [2, 4], steps
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [event.value for event in logged.Scalars("loss")] == pytest.approx(
        [m["loss"] for m in metrics], rel=1e-6
    )
