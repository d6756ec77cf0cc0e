"""The Python API reproduces the command line bit for bit (its documented example runs in test_docs)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import pudm
from pudm.cli import main

WEIGHTS = "pipeline/unet/diffusion_pytorch_model.safetensors"
TIMING = ("steps_per_second", "images_per_second")


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_api_train_and_sample_reproduce_the_command_line_bit_for_bit(tmp_path):
    cli_run, api_run = tmp_path / "cli", tmp_path / "api"
    flags = ["--method", "pu", "--steps", "6", "--batch-size", "8", "--log-every", "2"]
    flags += ["--sample-steps", "2", "--grid-size", "4", "--quiet"]
    assert main(["train", "--out", str(cli_run), *flags]) == 0
    assert (
        main(["sample", str(cli_run), "--num", "8", "--steps", "2", "--out", str(tmp_path / "cli.npz")]) == 0
    )

    config = pudm.preset("digits_even")
    config.train.method, config.train.steps, config.train.batch_size = "pu", 6, 8
    config.train.log_every, config.sample.steps, config.sample.grid_size = 2, 2, 4
    run = pudm.train(config, api_run, show_progress=False)
    images = pudm.sample(run, num=8, steps=2)

    assert json.loads((api_run / "config.json").read_text()) == json.loads(
        (cli_run / "config.json").read_text()
    )
    assert _metrics(api_run) == _metrics(cli_run)
    mine, theirs = load_file(api_run / WEIGHTS), load_file(cli_run / WEIGHTS)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert np.array_equal(images, np.load(tmp_path / "cli.npz")["images"])
    assert (api_run / "samples.png").read_bytes() == (cli_run / "samples.png").read_bytes()


def test_run_folder_rules_and_typed_errors(tmp_path):
    config = pudm.preset("digits_even")
    config.train.steps, config.train.batch_size, config.sample.grid_size = 2, 8, 4
    config.sample.steps = 2
    run = pudm.train(config, tmp_path / "run", show_progress=False)
    assert run.complete and repr(run).endswith("complete)")
    with pytest.raises(pudm.UsageError, match="already holds a run"):
        pudm.train(config, tmp_path / "run")
    # Resuming a complete run returns it untouched; another config is refused.
    assert pudm.train(None, tmp_path / "run", resume=True).complete
    other = pudm.preset("digits_even")
    with pytest.raises(pudm.UsageError, match="other settings"):
        pudm.train(other, tmp_path / "run", resume=True)
    with pytest.raises(pudm.UsageError, match="unknown preset"):
        pudm.preset("imagenet")
    with pytest.raises(pudm.UsageError, match="brings its own data"):
        pudm.preset("digits_even", unlabeled=tmp_path)
    with pytest.raises(pudm.UsageError, match="--num must be > 0"):
        pudm.sample(run, num=0)


def test_the_library_is_silent_unless_logging_is_configured(tmp_path, capsys):
    config = pudm.preset("digits_even")
    config.train.steps, config.train.batch_size, config.sample.grid_size = 2, 8, 4
    config.sample.steps = 2
    pudm.train(config, tmp_path / "run", show_progress=False)
    pudm.sample(tmp_path / "run", num=4, steps=2, show_progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_settings_by_flag_name_match_the_flags_and_resume_checks_them(tmp_path):
    config = pudm.preset(
        "digits_even", method="pu", steps=2, batch_size=8, sample_steps=2, grid_size=4, lr=5e-4
    )
    assert (config.train.method, config.train.steps, config.sample.steps) == ("pu", 2, 2)
    assert config.train.learning_rate == 5e-4  # the flag's name (--lr), not the field's
    given = ["--method", "pu", "--steps", "2", "--batch-size", "8", "--sample-steps", "2", "--grid-size", "4"]
    assert main(["train", "--out", str(tmp_path / "cli"), *given, "--lr", "5e-4", "--quiet"]) == 0
    stored = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert stored == config.to_dict()
    with pytest.raises(pudm.UsageError, match="unknown setting 'stepz'"):
        pudm.preset("digits_even", stepz=3)
    assert pudm.resume_config(tmp_path / "cli", method="pu", steps=2).to_dict() == stored
    with pytest.raises(pudm.UsageError, match="was trained with --steps 2, not 3"):
        pudm.resume_config(tmp_path / "cli", steps=3)
    with pytest.raises(pudm.UsageError, match="not auto: drop --beta"):
        pudm.resume_config(tmp_path / "cli", beta="auto")
    with pytest.raises(pudm.UsageError, match="holds no run"):
        pudm.resume_config(tmp_path / "nothing")


def test_sd_config_applies_the_paper_defaults_that_follow_from_the_settings(tmp_path):
    (tmp_path / "U").mkdir()
    config = pudm.sd_config(
        pretrained="some/hub-id", unlabeled=tmp_path / "U", method="unsupervised", sampler="dpm"
    )
    assert config.train.learning_rate == 1e-4 and config.sample.steps == 20 and config.model.epochs == 1000
    assert config.data.unlabeled == str((tmp_path / "U").resolve())
    pu = pudm.sd_config(pretrained="some/hub-id", unlabeled=str(tmp_path / "U"), sensitive=tmp_path, steps=5)
    assert pu.train.learning_rate == 1e-5 and pu.model.epochs is None and pu.train.steps == 5
    with pytest.raises(pudm.UsageError, match="give --steps or --epochs, not both"):
        pudm.sd_config(pretrained="x", unlabeled=tmp_path, steps=5, epochs=2)


def test_a_pu_model_with_the_epsilon_loss_never_defaults_to_a_deterministic_sampler(tmp_path, caplog):
    """Such a model broke DDIM (README, "Defaults across samplers"): pudm does not make a
    deterministic sampler its default, and says so when one is asked for."""
    import logging

    assert pudm.preset("MNIST_even", method="unsupervised").sample.sampler == "ddim"  # the paper's
    config = pudm.preset("MNIST_even", method="pu")
    assert (config.sample.sampler, config.sample.steps) == ("dpm-sde", 10)
    assert pudm.preset("MNIST_even", method="pu", sample_steps=25).sample.steps == 25
    assert pudm.preset("MNIST_even", method="pu", prediction_type="v_prediction").sample.sampler == "ddim"
    assert pudm.preset("MNIST_even", method="pu", sampler="dpm").sample.sampler == "dpm"  # asked for

    config = pudm.preset(
        "digits_even", method="pu", prediction_type="epsilon", sampler="ddim", steps=4, batch_size=8
    )
    config.sample.steps, config.sample.grid_size = 2, 4
    with caplog.at_level(logging.WARNING, logger="pudm"):
        run = pudm.train(config, tmp_path / "run", show_progress=False)
    assert "break the deterministic ddim sampler" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pudm"):
        pudm.sample(run, num=2, steps=2, sampler="dpm-sde")
        assert "break the deterministic" not in caplog.text
        pudm.sample(run, num=2, steps=2)  # the run's own ddim
    assert "break the deterministic ddim sampler" in caplog.text
