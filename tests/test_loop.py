"""The training loop's contracts that a review found unguarded: fp16 loss scaling, strict JSON
metrics, exact cross-process sums, the process count on resume, the EMA, where the grid is sampled,
what the progress bar shows, and that no method but ``oracle`` reads the hidden truth of U."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import pudm.training as training
from conftest import poison_loss, tree_digest
from pudm import runs
from pudm.cli import main
from pudm.config import preset
from pudm.datasets import split_from_config
from pudm.ema import ema_decay_at, make_ema, trainable_names, update_ema
from pudm.objectives import _global_sums, objective
from pudm.processes import make_accelerator
from pudm.ticks import TICK_FIELDS, progress_fields
from pudm.training import Trainer

WEIGHTS = "pipeline/unet/diffusion_pytorch_model.safetensors"
TINY = ["--batch-size", "8", "--log-every", "2", "--quiet", "--sample-steps", "2", "--grid-size", "4"]


def _strict_rows(path) -> list[dict]:
    """metrics.jsonl read as strict JSON: NaN/Infinity tokens are an error, as in jq."""

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _tiny_config(steps: int = 8):
    config = preset("digits_even")
    train = config.train
    train.steps, train.batch_size, train.log_every, train.checkpoint_every = steps, 8, 2, 4
    train.keep_checkpoints = 10
    config.sample.steps, config.sample.grid_size = 2, 4
    return config


def _fp16_accelerator(init_scale: float):
    """accelerate uses no grad scaler on the CPU: inject torch's own, as on a GPU with fp16."""
    accelerator = make_accelerator("fp16")
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return accelerator


def _train_fp16(config, run_dir, init_scale=2.0**16, resume=False):
    config = copy.deepcopy(config)
    config.train.mixed_precision = "fp16"
    accelerator = _fp16_accelerator(init_scale)
    Trainer(config, split_from_config(config), run_dir, accelerator=accelerator, show_progress=False).train(
        resume=resume
    )
    return accelerator.scaler


# -- fp16 ------------------------------------------------------------------------------------------


def test_fp16_nonfinite_loss_is_skipped_not_a_crash(tmp_path, monkeypatch):
    """With a grad scaler, clip_grad_norm_ unscales; a skipped step must still clear that, or the
    next step raises 'unscale_() has already been called'. Overflow steps the scaler skips keep
    their inf grad norm out of the log."""
    poison_loss(monkeypatch, lambda n: n == 5)
    scaler = _train_fp16(_tiny_config(), tmp_path / "run")
    rows = _strict_rows(tmp_path / "run" / "metrics.jsonl")
    assert sum(row["skipped_nonfinite"] for row in rows) == 1
    assert sum(row["skipped_overflow"] for row in rows) >= 1, "2^16 overflows fp16 gradients at first"
    for row in rows:
        assert row["grad_norm"] is None or row["grad_norm"] < float("inf")
    # Every skipped step (overflow or non-finite loss) halved the scale; none grew it.
    skipped = sum(row["skipped_nonfinite"] + row["skipped_overflow"] for row in rows)
    assert scaler.get_scale() == 2.0**16 * 0.5**skipped
    final = runs.load_checkpoint(runs.list_checkpoints(tmp_path / "run")[-1])
    assert final["state"]["scaler"]["scale"] == scaler.get_scale()


def test_fp16_resume_continues_at_the_stored_loss_scale(tmp_path, monkeypatch):
    """Without the scaler's state in the checkpoint a resumed fp16 run restarts at the initial
    scale and no longer matches the uninterrupted run."""
    config = _tiny_config()
    poison_loss(monkeypatch, lambda n: n in (3, 6))  # steps 3 and 6 back the scale off
    whole = _train_fp16(config, tmp_path / "whole", init_scale=256.0)
    # Resume a copy from its step-4 checkpoint with a fresh scaler, which starts at 256 again.
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole", run)
    for name in ("summary.json", "pipeline", "samples.png"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for checkpoint in runs.list_checkpoints(run)[1:]:
        runs.remove_dir(checkpoint)
    assert [c.name for c in runs.list_checkpoints(run)] == ["step_00000004"]
    monkeypatch.undo()
    poison_loss(monkeypatch, lambda n: n == 2)  # the resumed run's second step is step 6
    resumed = _train_fp16(config, run, init_scale=256.0, resume=True)
    assert resumed.get_scale() == whole.get_scale() < 256.0
    mine = runs.load_checkpoint(runs.list_checkpoints(run)[-1])
    theirs = runs.load_checkpoint(runs.list_checkpoints(tmp_path / "whole")[-1])
    assert mine["state"]["scaler"] == theirs["state"]["scaler"]
    for name, value in theirs["model"].items():
        assert torch.equal(mine["model"][name], value), name


def test_metrics_are_strict_json_when_a_whole_tick_is_skipped(tmp_path, monkeypatch):
    poison_loss(monkeypatch, lambda n: n in (3, 4))  # steps 3 and 4: the second tick has no value
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "6", *TINY]) == 0
    rows = _strict_rows(out / "metrics.jsonl")
    assert rows[1]["skipped_nonfinite"] == 2 and rows[1]["loss"] is None and rows[1]["bracket"] is None
    assert rows[0]["loss"] is not None and rows[2]["loss"] is not None


# -- data parallel ---------------------------------------------------------------------------------


class _Reduced:
    """A stand-in for CrossProcessSum that returns a fixed 'all-reduced' value."""

    world_size = 2

    def __init__(self, total: torch.Tensor):
        self.total = total

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return self.total.clone()


def test_global_sums_are_exactly_the_reduced_value_with_local_gradients():
    generator = torch.Generator().manual_seed(0)
    # Non-negative sums as the objective forms them: each process's share of the global sum.
    total = torch.rand(10_000, generator=generator) * 1000
    local = (total * torch.rand(10_000, generator=generator)).requires_grad_(True)
    naive = local.detach() + (total - local.detach())
    assert (naive != total).any(), "guard: local + (global - local) rounds for some of these values"
    summed = _global_sums(local, _Reduced(total))
    # Bit for bit: every process then takes the same branch (sign, correction, finite check).
    assert torch.equal(summed.detach(), total)
    weights = torch.rand(10_000, generator=generator)
    (summed * weights).sum().backward()
    assert torch.equal(local.grad, weights), "the gradient flows to this process's own items"


def test_every_process_takes_the_branch_of_the_global_bracket():
    """Two 'processes' that hold different local sums but the same reduced sums must agree on
    the objective's value and its correction, bit for bit."""
    generator = torch.Generator().manual_seed(1)
    losses = torch.rand(2, 8, generator=generator) * 100
    is_sensitive = torch.tensor([[True, False] * 4, [False] * 8])
    parts = []
    for rank in range(2):
        loss, sensitive = losses[rank], is_sensitive[rank]
        parts.append(
            torch.stack(
                [
                    loss[~sensitive].sum(),
                    loss[sensitive].sum(),
                    torch.zeros(()),
                    (~sensitive).sum().float(),
                    sensitive.sum().float(),
                    torch.tensor(8.0),
                    torch.zeros(()),
                ]
            )
        )
    # Choose beta so that the global bracket is as close to 0 as float32 allows.
    mean_u = (parts[0][0] + parts[1][0]) / (parts[0][3] + parts[1][3])
    mean_s = (parts[0][1] + parts[1][1]) / (parts[0][4] + parts[1][4])
    beta = float(mean_u / mean_s)
    total = parts[0] + parts[1]
    outs = [
        objective("pu", losses[rank], is_sensitive[rank], beta=min(beta, 0.999), reduce=_Reduced(total))
        for rank in range(2)
    ]
    assert torch.equal(outs[0].negative_risk, outs[1].negative_risk)
    assert bool(outs[0].corrected) == bool(outs[1].corrected)
    assert torch.equal(outs[0].risk, outs[1].risk)


def test_resume_with_another_process_count_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--steps", "4", "--checkpoint-every", "2", *TINY]
    assert main(argv) == 0
    for name in ("summary.json", "pipeline"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    last = runs.list_checkpoints(out)[-1]
    state = torch.load(last / "state.pt", weights_only=True)
    assert state["world_size"] == 1
    state["world_size"] = 2  # as if written by a 2-process launch
    torch.save(state, last / "state.pt")
    before = tree_digest(out)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert "written by 2 processes" in line and "--num_processes 2" in line and "Traceback" not in err
    assert tree_digest(out) == before


# -- EMA -------------------------------------------------------------------------------------------


def test_one_ema_for_every_model_copies_what_trains_and_shares_what_is_frozen():
    """A LoRA-style model (a frozen base, small trainable parts): the EMA holds the base once."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[0].requires_grad_(False)
    ema = make_ema(model)
    assert ema[0].weight is model[0].weight and ema[0].bias is model[0].bias
    assert ema[1].weight is not model[1].weight and not ema[1].weight.requires_grad
    frozen_before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.fill_(1.0)
        ema[1].weight.fill_(0.0)
    update_ema(ema, model, 0.75, trainable_names(model))
    torch.testing.assert_close(ema[1].weight, torch.full((3, 3), 0.25))
    assert torch.equal(model[0].weight, frozen_before)
    assert trainable_names(model) == ["1.weight", "1.bias"]


def test_ema_moves_toward_the_weights_as_the_decay_says():
    config = _tiny_config()
    trainer = Trainer(config, split_from_config(config), "unused", show_progress=False)
    trainer._build()
    with torch.no_grad():
        for parameter in trainer.unet.parameters():
            parameter.fill_(1.0)
        for parameter in trainer.ema.parameters():
            parameter.fill_(0.0)
    for step, expected in ((0, 1 - 0.1), (10**6, 1 - 0.999)):
        with torch.no_grad():
            for parameter in trainer.ema.parameters():
                parameter.fill_(0.0)
        trainer._update_ema(step)
        for parameter in trainer.ema.parameters():
            torch.testing.assert_close(parameter, torch.full_like(parameter, expected))
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(10**6, 0.999) == 0.999


def _checkpoints(run) -> list[dict]:
    return [runs.load_checkpoint(path) for path in runs.list_checkpoints(run)]


def test_the_ema_follows_the_post_step_weights(tmp_path, monkeypatch):
    """With a checkpoint after every step: EMA_{k+1} = lerp(EMA_k, W_{k+1}, 1 - decay(k)), W_{k+1}
    the weights *after* step k+1's update; a step the fp16 grad scaler skipped (overflow) or the
    non-finite guard skipped leaves the EMA alone."""
    config = _tiny_config(steps=8)
    config.train.checkpoint_every, config.train.log_every = 1, 1
    config.train.keep_checkpoints = 10
    config.train.ema_decay = 0.5
    poison_loss(monkeypatch, lambda n: n == 6)  # step 6: a non-finite loss, skipped
    _train_fp16(config, tmp_path / "run", init_scale=2.0**13)  # steps 1-3 overflow (measured)
    rows = _strict_rows(tmp_path / "run" / "metrics.jsonl")
    assert [row["skipped_overflow"] for row in rows] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert [row["skipped_nonfinite"] for row in rows] == [0, 0, 0, 0, 0, 1, 0, 0]
    skipped = [row["skipped_nonfinite"] + row["skipped_overflow"] > 0 for row in rows]
    states = _checkpoints(tmp_path / "run")
    assert [int(s["state"]["step"]) for s in states] == list(range(1, 9))
    applied = 0
    for before, after, was_skipped in zip(states[:-1], states[1:], skipped[1:], strict=True):
        step = int(before["state"]["step"])  # the step index of the update that made `after`
        for name, ema in after["ema"].items():
            if was_skipped:
                assert torch.equal(ema, before["ema"][name]), (step, name)
                assert torch.equal(after["model"][name], before["model"][name]), (step, name)
                continue
            weight = 1.0 - ema_decay_at(step, 0.5)
            expected = torch.lerp(before["ema"][name], after["model"][name], weight)
            torch.testing.assert_close(ema, expected, rtol=1e-6, atol=1e-7)
        applied += not was_skipped
    assert applied == 4


def _heldout_denoising_loss(unet, noise_scheduler, images: torch.Tensor) -> float:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (len(images),), generator=generator)
    with torch.no_grad():
        loss = training.per_sample_denoising_loss(unet, noise_scheduler, images, noise, timesteps)
    return float(loss.mean())


def test_a_trained_pipeline_denoises_heldout_digits_better_than_its_initialisation(tmp_path):
    """The saved pipeline holds the EMA weights: a frozen EMA would save the random initialisation."""
    from pudm.models import build_noise_scheduler, build_unet, load_pipeline

    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--steps", "150", "--method", "unsupervised", *TINY]
    assert main([*argv, "--batch-size", "32", "--warmup-steps", "10"]) == 0
    config = preset("digits_even")
    split = split_from_config(config)
    noise_scheduler = build_noise_scheduler(config.model)
    torch.manual_seed(config.train.seed)
    initial = build_unet(config.model, image_size=8, channels=1)  # what training started from
    trained = load_pipeline(out / "pipeline").unet
    before = _heldout_denoising_loss(initial, noise_scheduler, split.test)
    after = _heldout_denoising_loss(trained, noise_scheduler, split.test)
    assert after < 0.7 * before, (before, after)


# -- the grid, the progress bar --------------------------------------------------------------------


def test_the_end_of_run_grid_samples_the_ema_where_it_lives(tmp_path, monkeypatch):
    """No CPU copy for sampling: the model sampled is the trainer's EMA, on the accelerator's device."""
    import pudm.sampling as sampling

    seen = {}
    real = sampling.generate

    def spy(unet, *args, **kwargs):
        seen["unet"] = unet
        return real(unet, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate", spy)
    config = _tiny_config(steps=2)
    trainer = Trainer(config, split_from_config(config), tmp_path / "run", show_progress=False)
    trainer.train()
    assert seen["unet"] is trainer.ema
    assert next(seen["unet"].parameters()).device == trainer.accelerator.device
    # ... and the pipeline saved alongside holds the same weights.
    saved = load_file(tmp_path / "run" / WEIGHTS)
    for name, value in trainer.ema.state_dict().items():
        assert torch.equal(saved[name], value.cpu()), name


@pytest.mark.parametrize(
    "method,shown",
    [
        ("unsupervised", {"loss"}),
        ("filter", {"loss"}),
        ("oracle", {"loss"}),
        ("supervised", {"loss", "h_S", "live_S"}),
        ("pu", {"loss", "bracket", "h_S"}),
    ],
)
def test_the_progress_bar_shows_what_the_method_optimises(method, shown):
    means = dict.fromkeys(TICK_FIELDS, 1.0)
    assert set(progress_fields(method, means)) == shown


def test_live_sensitive_fraction_says_when_h_is_dead():
    loss = torch.tensor([1.0, 2.0, 50.0, 200.0, 300.0, 5.0])
    is_sensitive = torch.tensor([True, True, True, True, True, False])
    out = objective("supervised", loss, is_sensitive)
    # h(1) = 0.46, h(2) = 0.15, h(50) = 2e-22, h(200) = 0: two of five S items are live.
    assert float(out.live_sensitive_fraction) == pytest.approx(2 / 5)
    out = objective("pu", loss[5:], is_sensitive[5:])
    assert float(out.live_sensitive_fraction) == 0.0


# -- class conditioning ---------------------------------------------------------------------------


def test_class_conditioning_is_the_set_an_item_came_from(tmp_path):
    """Every U item gets U's label, every S item S's; the hidden class never reaches the UNet."""
    from pudm.run_model import SENSITIVE_LABEL, SET_CLASSES, UNLABELED_LABEL
    from pudm.tasks import PixelTask

    config = _tiny_config(steps=2)
    config.model.num_classes = SET_CLASSES
    task = PixelTask(config, split_from_config(config))
    batches = task.batches(make_accelerator("no"))
    index = torch.arange(batches.num_unlabeled + batches.num_sensitive)
    _, is_sensitive, conditioning = batches.fetch(index, 0)
    labels = conditioning["class_labels"]
    assert labels[: batches.num_unlabeled].eq(UNLABELED_LABEL).all()
    assert labels[batches.num_unlabeled :].eq(SENSITIVE_LABEL).all()
    assert torch.equal(labels.bool(), is_sensitive)


@pytest.mark.parametrize("allow", [True, False])
def test_tf32_follows_the_config_during_the_run_and_is_put_back(tmp_path, monkeypatch, allow):
    seen = []
    real = training.per_sample_denoising_loss

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "per_sample_denoising_loss", spy)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    flag = "--allow-tf32" if allow else "--no-allow-tf32"
    args = ["train", "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "8", "--grid-size", "4"]
    assert main([*args, "--sample-steps", "2", "--quiet", flag]) == 0
    assert seen and set(seen) == {(allow, allow)}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["allow_tf32"] is allow
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
