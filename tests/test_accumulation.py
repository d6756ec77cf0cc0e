"""Gradient accumulation keeps the objective exact: K micro-batches of B train like one batch of K*B.

A plain ``accelerator.accumulate`` would not: |mean_U l - beta mean_S l| and its sign are not sums
over micro-batches. pudm forms the whole batch's sums first, then backpropagates each micro-batch.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import pudm
from pudm.config import TRAIN_METHODS
from pudm.objectives import KnownSums, SumRecorder, objective

WEIGHTS = "pipeline/unet/diffusion_pytorch_model.safetensors"
RAW = "checkpoints/step_00000004/model.safetensors"


def _config(method: str, batch_size: int, accumulate: int):
    return pudm.preset(
        "digits_even",
        method=method,
        steps=4,
        batch_size=batch_size,
        gradient_accumulation_steps=accumulate,
        log_every=1,
        checkpoint_every=4,
        sample_steps=2,
        grid_size=4,
        filter_epochs=1,
        beta=0.3,  # drives the PU bracket negative: the sign must be the whole batch's
    )


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", TRAIN_METHODS)
def test_two_micro_batches_of_8_train_like_one_batch_of_16(tmp_path, method):
    one = pudm.train(_config(method, 16, 1), tmp_path / "one", show_progress=False)
    two = pudm.train(_config(method, 8, 2), tmp_path / "two", show_progress=False)
    for a, b in zip(_metrics(two), _metrics(one), strict=True):
        for key in ("loss", "bracket", "mean_unlabeled_loss", "mean_sensitive_loss", "corrected_fraction"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["step"])
        assert a["sensitive_per_batch"] == b["sensitive_per_batch"]
        assert a["images_per_second"] > 0
    for path in (RAW, WEIGHTS):
        mine, theirs = load_file(two.path / path), load_file(one.path / path)
        for name in theirs:
            torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=1e-5, msg=f"{path} {name}")


def test_naive_accumulation_would_differ_and_known_sums_do_not():
    """The objective of the whole batch from two halves: per-half objectives averaged are wrong."""
    generator = torch.Generator().manual_seed(0)
    loss = torch.rand(16, generator=generator) * 10
    loss.requires_grad_(True)
    is_sensitive = torch.zeros(16, dtype=torch.bool)
    is_sensitive[[0, 1, 2, 3, 4, 5, 9]] = True  # most S items in the first half
    whole = objective("pu", loss, is_sensitive, beta=0.6)
    (expected,) = torch.autograd.grad(whole.loss, loss)
    halves = [slice(0, 8), slice(8, 16)]
    recorder = SumRecorder()
    for part in halves:
        objective("pu", loss[part].detach(), is_sensitive[part], beta=0.6, reduce=recorder)
    known = KnownSums(recorder.total())
    grads = []
    for part in halves:
        out = objective("pu", loss[part], is_sensitive[part], beta=0.6, reduce=known)
        torch.testing.assert_close(out.loss, whole.loss)
        grads.append(torch.autograd.grad(out.loss, loss)[0])
    torch.testing.assert_close(grads[0] + grads[1], expected)
    naive = sum(
        torch.autograd.grad(objective("pu", loss[p], is_sensitive[p], beta=0.6).loss / 2, loss)[0]
        for p in halves
    )
    assert not torch.allclose(naive, expected, atol=1e-4)


def test_the_flag_and_bad_values(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "pudm", "train", "--out", str(run), "--gradient-accumulation-steps", "0"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "--gradient-accumulation-steps must be > 0, got 0" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not run.exists()
    with pytest.raises(pudm.UsageError, match="--sensitive-per-batch must be in \\[1, batch size 16\\)"):
        config = _config("pu", 8, 2)
        config.data.sensitive_per_batch = 16
        config.validate()


def test_accumulation_under_two_processes_matches_one_process_with_the_whole_batch(tmp_path):
    """2 processes x 2 micro-batches of 4 = one process with batch 16: the sums are formed over
    the micro-batches of every process before any micro-batch backpropagates."""
    from test_distributed import ARGS, _launch, _run

    env, launch = _launch()
    two, one = tmp_path / "two", tmp_path / "one"
    args = [*ARGS, "--method", "pu", "--beta", "0.3"]
    done = _run(
        [
            *launch,
            "train",
            "--out",
            str(two),
            *args,
            "--batch-size",
            "4",
            "--gradient-accumulation-steps",
            "2",
        ],
        env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr, "the launch must really be data-parallel"
    single = _run(
        [sys.executable, "-m", "pudm", "train", "--out", str(one), *args, "--batch-size", "16"], env
    )
    assert single.returncode == 0, single.stderr[-3000:]
    lines = [
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (two, one)
    ]
    for a, b in zip(*lines, strict=True):
        for key in ("loss", "bracket", "mean_unlabeled_loss", "mean_sensitive_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    mine, theirs = (
        load_file(run / "checkpoints" / "step_00000006" / "model.safetensors") for run in (two, one)
    )
    start = load_file(one / "checkpoints" / "step_00000003" / "model.safetensors")
    difference = torch.cat([(mine[k] - theirs[k]).flatten() for k in theirs]).norm()
    moved = torch.cat([(theirs[k] - start[k]).flatten() for k in theirs]).norm()
    assert float(moved) > 0.1 and float(difference / moved) < 0.01


def test_stable_diffusion_accumulates_the_same_way(tmp_path):
    """The latent task shares the step: LoRA on a tiny SD, 2 micro-batches of 2 = one batch of 4."""
    from pudm.cli import main
    from tiny_sd import write_text_image_folder, write_tiny_sd

    write_tiny_sd(tmp_path / "base")
    write_text_image_folder(tmp_path / "U", 8, seed=0)
    write_text_image_folder(tmp_path / "S", 4, seed=1, captions=["a photo of brad pitt"] * 4)
    args = ["sd", "--pretrained", str(tmp_path / "base"), "--unlabeled", str(tmp_path / "U")]
    args += [
        "--sensitive",
        str(tmp_path / "S"),
        "--unlabeled-prompt",
        "a photo of a man",
        "--resolution",
        "16",
    ]
    args += [
        "--steps",
        "3",
        "--log-every",
        "1",
        "--lora-rank",
        "2",
        "--lr",
        "1e-2",
        "--grid-size",
        "0",
        "--quiet",
    ]
    assert main([*args, "--out", str(tmp_path / "one"), "--batch-size", "4"]) == 0
    assert (
        main(
            [*args, "--out", str(tmp_path / "two"), "--batch-size", "2", "--gradient-accumulation-steps", "2"]
        )
        == 0
    )
    lines = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("two", "one")
    ]
    for a, b in zip(*lines, strict=True):
        for key in ("loss", "bracket", "mean_sensitive_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
