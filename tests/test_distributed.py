"""Data-parallel training: N processes with batch B must train exactly like one with batch N*B.

Two CPU processes over gloo, once at the level of the objective (torch.distributed alone) and once
end to end through ``accelerate launch --multi_gpu --num_processes 2`` and the real command line.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from pudm.objectives import CrossProcessSum, objective

WORLD = 2
FEATURES = 5

# (method, correction, beta): the last one drives the PU bracket negative, so the sign that picks
# the correction must be the global batch's.
CASES = [
    ("unsupervised", "abs", 0.1),
    ("supervised", "abs", 0.1),
    ("pu", "abs", 0.1),
    ("pu", "nn", 0.1),
    ("pu", "abs", 0.9),
    ("pu", "nn", 0.9),
    ("pu-bounded", "abs", 0.1),
    ("pu-bounded", "nn", 0.9),
    ("weighted", "abs", 0.1),
]


def _extras(method: str, block: slice) -> dict[str, torch.Tensor]:
    """The per-item inputs of the methods beyond the paper, cut like the batch."""
    if method == "weighted":
        return {"weights": torch.linspace(0.0, 1.0, 12)[block]}
    if method == "pu-bounded":
        return {"high_noise": (torch.arange(12) % 3 != 1)[block]}
    return {}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A global batch of 12 items; rank 0's block holds 5 S items of 6, rank 1's holds 1 of 6, so
    per-process means differ from global ones."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(12, FEATURES, generator=generator)
    inputs[[0, 1, 2, 3, 4, 8]] *= 2  # S items: larger loss, so beta 0.9 makes the bracket negative
    is_sensitive = torch.zeros(12, dtype=torch.bool)
    is_sensitive[[0, 1, 2, 3, 4, 8]] = True
    return inputs, is_sensitive


def _loss_and_grad(inputs, is_sensitive, case, reduce=None, block=slice(0, 12)):
    method, correction, beta = case
    weight = torch.linspace(0.5, 1.5, FEATURES).requires_grad_(True)
    per_sample = (inputs * weight).pow(2).sum(1)
    out = objective(
        method,
        per_sample,
        is_sensitive,
        beta=beta,
        correction=correction,
        reduce=reduce,
        **_extras(method, block),
    )
    out.loss.backward()
    return out, weight.grad


def _worker(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    inputs, is_sensitive = _batch()
    block = slice(rank * 6, (rank + 1) * 6)
    rows = []
    for case in CASES:
        out, grad = _loss_and_grad(
            inputs[block], is_sensitive[block], case, reduce=CrossProcessSum(), block=block
        )
        dist.all_reduce(grad)  # what DistributedDataParallel does: average the gradients
        grad /= WORLD
        rows.append(
            {
                "loss": float(out.loss.detach()),
                "risk": float(out.risk.detach()),
                "bracket": float(out.negative_risk.detach()),
                "corrected": bool(out.corrected),
                "num_sensitive": int(out.num_sensitive),
                "grad": grad.tolist(),
            }
        )
    Path(results, f"rank{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def test_objective_over_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    mp.start_processes(
        _worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    inputs, is_sensitive = _batch()
    for index, case in enumerate(CASES):
        reference, reference_grad = _loss_and_grad(inputs, is_sensitive, case)
        for rank in range(WORLD):
            row = json.loads((tmp_path / f"rank{rank}.json").read_text())[index]
            assert row["loss"] == pytest.approx(float(reference.loss.detach()), rel=1e-6), (case, rank)
            assert row["risk"] == pytest.approx(float(reference.risk.detach()), rel=1e-6), (case, rank)
            assert row["bracket"] == pytest.approx(
                float(reference.negative_risk.detach()), rel=1e-6, abs=1e-6
            )
            assert row["corrected"] == bool(reference.corrected), (case, rank)
            assert row["num_sensitive"] == 6
            torch.testing.assert_close(torch.tensor(row["grad"]), reference_grad, rtol=1e-5, atol=1e-6)
    # The cases really exercise both signs of the bracket.
    corrected = [bool(_loss_and_grad(inputs, is_sensitive, case)[0].corrected) for case in CASES]
    assert corrected == [False, False, False, False, True, True, False, True, False]


def test_per_process_means_would_differ():
    """Guard for the test above: averaging per-process objectives is not the global objective
    here, so the equality above can only hold because the counts are all-reduced."""
    inputs, is_sensitive = _batch()
    case = ("pu", "abs", 0.1)
    whole = _loss_and_grad(inputs, is_sensitive, case)[0].loss
    halves = [_loss_and_grad(inputs[b], is_sensitive[b], case)[0].loss for b in (slice(0, 6), slice(6, 12))]
    assert abs(float(sum(halves).detach() / 2) - float(whole.detach())) > 1e-2 * abs(float(whole.detach()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _launch() -> tuple[dict[str, str], list[str]]:
    """The environment and the command prefix of a 2-process CPU launch of pudm."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "pudm"]
    return env, launch


# No warm-up and a constant real lr (1e-3): every step moves the weights by ~1e-3 each, so a wrong
# gradient shows far above the tolerance below.
ARGS = ["--steps", "6", "--log-every", "2", "--checkpoint-every", "3", "--quiet", "--warmup-steps", "0"]
ARGS += ["--sample-steps", "4", "--grid-size", "8", "--beta", "0.1", "--ema-decay", "0.5"]
ARGS += ["--lr-schedule", "constant"]


def _unet(run: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run / "pipeline" / "unet").glob("*.safetensors")))


@pytest.mark.parametrize(
    "method, extra",
    [
        ("pu", []),
        ("pu", ["--sensitive-per-batch", "4"]),  # a global count: 2 per process, 4 in the one batch
        ("pu-bounded", []),
        ("weighted", []),
        ("filter", []),
    ],
)
def test_accelerate_launch_two_processes_matches_one_process_with_twice_the_batch(tmp_path, method, extra):
    env, launch = _launch()
    two, one = tmp_path / "two", tmp_path / "one"
    args = [*ARGS, "--method", method, "--filter-epochs", "1", *extra]
    done = _run([*launch, "train", "--out", str(two), *args, "--batch-size", "8"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr, "the launch must really be data-parallel"
    assert done.stdout.count("done: pipeline") == 1, "only the main process reports"
    single = _run(
        [sys.executable, "-m", "pudm", "train", "--out", str(one), *args, "--batch-size", "16"], env
    )
    assert single.returncode == 0, single.stderr[-3000:]

    def metrics(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    # Logged once (by the main process), with the global batch's terms.
    assert [m["step"] for m in metrics(two)] == [2, 4, 6]
    for a, b in zip(metrics(two), metrics(one), strict=True):
        for key in ("loss", "bracket", "mean_unlabeled_loss", "mean_sensitive_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
        assert a["sensitive_per_batch"] == pytest.approx(b["sensitive_per_batch"])
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    # A fitted state is fitted once, by the main process, and the same as one process fits.
    for state in ("weights.json", "filter.json"):
        if (one / state).exists():
            assert json.loads((two / state).read_text()) == json.loads((one / state).read_text()), state
    # Weights: Adam turns the rounding noise of near-zero gradients into whole steps of a few
    # elements, so they are compared as one vector, relative to how far training moved them
    # between the last two checkpoints (measured: 0.002; per-process means instead of the global
    # batch's: 1.5).
    start = load_file(one / "checkpoints" / "step_00000003" / "model.safetensors")
    for name, (mine, theirs) in {
        "raw": [load_file(run / "checkpoints" / "step_00000006" / "model.safetensors") for run in (two, one)],
        "ema": [_unet(two), _unet(one)],
    }.items():
        difference = torch.cat([(mine[k] - theirs[k]).flatten() for k in theirs]).norm()
        moved = torch.cat([(theirs[k] - start[k]).flatten() for k in theirs]).norm()
        assert float(moved) > 0.1, "the comparison needs weights that moved"
        assert float(difference / moved) < 0.01, name


def test_pudm_sd_lora_two_processes_matches_one_process(tmp_path):
    """The Stable Diffusion trainer shares the loop: DDP over peft adapters, latents and text
    conditioning cut per process, equals one process with the global batch."""
    from tiny_sd import write_text_image_folder, write_tiny_sd

    write_tiny_sd(tmp_path / "base")
    write_text_image_folder(tmp_path / "U", 12, seed=0)
    write_text_image_folder(tmp_path / "S", 4, seed=1, captions=["a photo of brad pitt"] * 4)
    env, launch = _launch()
    args = ["sd", "--pretrained", str(tmp_path / "base"), "--unlabeled", str(tmp_path / "U")]
    args += ["--sensitive", str(tmp_path / "S"), "--unlabeled-prompt", "a photo of a middle aged man"]
    args += ["--resolution", "16", "--steps", "4", "--log-every", "2", "--lora-rank", "2", "--lr", "1e-2"]
    args += ["--grid-size", "0", "--quiet"]
    two, one = tmp_path / "two", tmp_path / "one"
    done = _run([*launch, *args, "--out", str(two), "--batch-size", "2"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr, "the launch must really be data-parallel"
    single = _run([sys.executable, "-m", "pudm", *args, "--out", str(one), "--batch-size", "4"], env)
    assert single.returncode == 0, single.stderr[-3000:]
    lines = [
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (two, one)
    ]
    assert [m["step"] for m in lines[0]] == [2, 4]
    for a, b in zip(*lines, strict=True):
        for key in ("loss", "bracket", "mean_unlabeled_loss", "mean_sensitive_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    mine = load_file(two / "lora" / "pytorch_lora_weights.safetensors")
    theirs = load_file(one / "lora" / "pytorch_lora_weights.safetensors")
    for name, value in theirs.items():
        torch.testing.assert_close(mine[name], value, rtol=0, atol=1e-4)


FAILING_FIT = """
import sys
from accelerate import PartialState
from pudm import methods
from pudm.cli import main

def fit(self, config, split, device="cpu"):
    if PartialState().is_main_process:
        raise OSError("disk full (planted)")
    raise AssertionError("only the main process fits")

methods.get("weighted").__class__.fit = fit
sys.exit(main(sys.argv[1:]))
"""


def test_a_failing_fit_on_the_main_process_stops_every_process_instead_of_hanging(tmp_path):
    """The other processes wait for the main one's state: its failure must reach them (a
    collective), or they would wait at a barrier until the launcher's timeout."""
    script = tmp_path / "failing_fit.py"
    script.write_text(FAILING_FIT)
    env, launch = _launch()
    launch = [*launch[: launch.index("-m")], str(script)]
    run = tmp_path / "run"
    args = [*ARGS, "--method", "weighted", "--filter-epochs", "1", "--batch-size", "8"]
    done = _run([*launch, "train", "--out", str(run), *args], env)
    assert done.returncode != 0
    assert "disk full (planted)" in done.stderr
    assert "the main process failed to fit the state" in done.stderr, "the other process must say why"
    assert not (run / "weights.json").exists(), "no state half-written"
