"""Run folder mechanics: atomic writes, checkpoint rotation, refusing unreadable checkpoints."""

import pytest
import torch

from pudm import runs


def save(run_dir, step, keep=2, value=1.0):
    return runs.save_checkpoint(
        run_dir,
        step,
        model_state={"w": torch.full((2,), value)},
        ema_state={"w": torch.full((2,), value / 2)},
        trainer_state={"optimizer": {"state": {}, "param_groups": []}},
        config={"preset": "x"},
        keep=keep,
    )


def test_checkpoints_rotate_and_round_trip(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step, value=float(step))
    names = [p.name for p in runs.list_checkpoints(tmp_path)]
    assert names == ["step_00000020", "step_00000030"]
    loaded = runs.load_checkpoint(runs.list_checkpoints(tmp_path)[-1])
    assert loaded["state"]["step"] == 30
    assert torch.equal(loaded["model"]["w"], torch.full((2,), 30.0))


def test_temporary_folders_are_never_taken_for_checkpoints(tmp_path):
    save(tmp_path, 5)
    (tmp_path / "checkpoints" / ".step_00000010.tmp-123").mkdir()
    (tmp_path / "checkpoints" / "step_junk").mkdir()
    assert [p.name for p in runs.list_checkpoints(tmp_path)] == ["step_00000005"]


def test_failed_directory_write_keeps_the_previous_version(tmp_path):
    target = tmp_path / "pipeline"
    runs.atomic_write_dir(target, lambda tmp: (tmp / "a.txt").write_text("old"))

    def broken(tmp):
        (tmp / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        runs.atomic_write_dir(target, broken)
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"], "no temporary folder left behind"


@pytest.mark.parametrize("part", ["model.safetensors", "state.pt"])
def test_tampered_or_truncated_checkpoint_is_refused(tmp_path, part):
    path = save(tmp_path, 7)
    data = (path / part).read_bytes()
    (path / part).write_bytes(data[: len(data) // 2])
    with pytest.raises(runs.RunError, match="cannot be read"):
        runs.load_checkpoint(path)


def test_pickled_code_in_state_is_refused(tmp_path):
    path = save(tmp_path, 7)
    torch.save({"step": 7, "payload": runs.RunError("x")}, path / "state.pt")  # an arbitrary object
    with pytest.raises(runs.RunError, match="cannot be read"):
        runs.load_checkpoint(path)


def test_truncate_metrics_drops_later_and_cut_lines(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    runs.truncate_metrics(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
