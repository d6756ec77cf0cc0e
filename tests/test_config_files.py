"""`pudm train --config FILE` (TOML or a run's config.json), flags over the file, --print-config."""

import json
from pathlib import Path

import pytest

import pudm
from pudm.cli import main

TINY = ["--batch-size", "8", "--log-every", "2", "--sample-steps", "2", "--grid-size", "4", "--quiet"]


def _toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_toml_file_sets_what_it_names_and_flags_override_it(tmp_path):
    file = _toml(
        tmp_path / "run.toml",
        'preset = "digits_odd"\n[train]\nmethod = "unsupervised"\nsteps = 4\nbeta = 0\nseed = 5\n'
        "[data]\nnum_sensitive = 40\n",
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(file), "--seed", "7", "--out", str(out), *TINY]) == 0
    stored = json.loads((out / "config.json").read_text())
    assert stored["preset"] == "digits_odd" and stored["data"]["normal_classes"] == [1, 3, 5, 7, 9]
    assert stored["train"]["method"] == "unsupervised" and stored["train"]["steps"] == 4
    assert stored["data"]["num_sensitive"] == 40
    assert stored["train"]["seed"] == 7  # the flag, over the file's 5
    assert stored["train"]["beta"] == 0.0 and isinstance(stored["train"]["beta"], float)
    # What the file does not name is the preset's.
    expected = pudm.preset("digits_odd").to_dict()
    assert stored["sample"]["sampler"] == expected["sample"]["sampler"]
    assert stored["model"] == expected["model"]


def test_train_again_like_a_run_with_one_change(tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["train", "--method", "pu", "--steps", "2", "--out", str(first), *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(first / "config.json"), "--seed", "3", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((first / "config.json").read_text())
    assert printed["train"].pop("seed") == 3 and stored["train"].pop("seed") == 0
    assert printed == stored


def test_print_config_is_what_the_run_stores_and_writes_nothing(tmp_path, capsys):
    flags = ["--method", "filter", "--steps", "2", "--lr", "5e-4", *TINY]
    assert main(["train", "--print-config", *flags]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--print-config", *flags]) == 0
    assert not out.exists()
    capsys.readouterr()
    assert main(["train", "--out", str(out), *flags]) == 0
    assert json.loads((out / "config.json").read_text()) == printed


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[train]\nstepz = 4\n", "unknown key train.stepz"),
        ("[train]\nsteps = '4'\n", "train.steps must be int, got '4'"),
        ("[train]\nbeta = 1.5\n", "--beta must be in [0, 1), got 1.5 (key train.beta)"),
        ("[train]\nbatch_size = true\n", "train.batch_size must be int, got True"),
        ("[trian]\nsteps = 4\n", "unknown key 'trian'"),
        ('preset = "imagenet"\n', "unknown preset 'imagenet'"),
        ("train = 3\n", "train must be a table"),
        ("[train\nsteps = 4\n", "not valid TOML"),
        ('kind = "sd"\n[train]\nsteps = 4\n', "pudm train cannot use it"),
        ("[model]\nblock_out_channels = [32, 64, 64, 128, 128]\n", "image size 8 cannot be halved 4 times"),
    ],
)
def test_a_bad_config_file_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, text, expected):
    file = _toml(tmp_path / "bad.toml", text)
    out = tmp_path / "run"
    assert main(["train", "--config", str(file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert f"--config {file}" in err
    assert not out.exists()


def test_config_conflicts_are_one_line_errors(tmp_path, capsys):
    file = _toml(tmp_path / "ok.toml", "[train]\nsteps = 2\n")
    cases = [
        (["--config", str(tmp_path / "missing.toml")], "no such file"),
        (["--config", str(file), "--preset", "digits_odd"], "--config names its own preset"),
        (["--config", str(file), "--resume"], "drop --config"),
    ]
    for extra, expected in cases:
        assert main(["train", *extra, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert main(["train", "--config", str(file)]) == 2
    assert "required: --out" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_load_config_is_the_api_of_the_same(tmp_path):
    file = _toml(tmp_path / "run.toml", "[train]\nmethod = 'weighted'\nsteps = 9\n")
    config = pudm.load_config(file)
    assert (config.preset, config.train.method, config.train.steps) == ("digits_even", "weighted", 9)
    with pytest.raises(pudm.UsageError, match="unknown key train.epochs"):
        pudm.load_config(_toml(tmp_path / "bad.toml", "[train]\nepochs = 2\n"))


def test_paths_in_a_file_are_the_files_and_folder_flags_need_a_folders_preset(tmp_path, capsys):
    (tmp_path / "conf").mkdir()
    file = _toml(
        tmp_path / "conf" / "run.toml",
        'preset = "folders"\n[data]\nunlabeled_dir = "U"\nsensitive_dir = "../S"\n',
    )
    config = pudm.read_config_file(file)
    assert config.data.unlabeled_dir == str((tmp_path / "conf" / "U").resolve())
    assert config.data.sensitive_dir == str((tmp_path / "S").resolve())
    digits = _toml(tmp_path / "digits.toml", "[train]\nsteps = 2\n")
    assert (
        main(["train", "--config", str(digits), "--unlabeled", str(tmp_path), "--out", str(tmp_path / "r")])
        == 2
    )
    assert "brings its own data" in capsys.readouterr().err
    assert main(["train", "--resume", "--print-config"]) == 2
    assert "required: --out" in capsys.readouterr().err
    bad = _toml(tmp_path / "bad.toml", '[model]\nblock_out_channels = [32, "x", 64]\n')
    with pytest.raises(pudm.UsageError, match="block_out_channels must be a list of int"):
        pudm.read_config_file(bad)


def test_a_beta_given_over_a_run_config_drops_that_runs_estimate(tmp_path):
    stored = pudm.preset("digits_even").to_dict()
    stored["train"]["beta"] = 0.08
    stored["train"]["beta_estimate"] = {"beta": 0.08, "low": 0.05, "high": 0.12, "method": "bbe"}
    file = tmp_path / "config.json"
    file.write_text(json.dumps(stored))
    assert pudm.load_config(file).train.beta_estimate["low"] == 0.05  # like that run: its estimate
    again = pudm.load_config(file, beta=0.3)
    assert again.train.beta == 0.3 and again.train.beta_estimate is None


def test_a_config_files_sampler_survives_and_the_cli_and_the_api_resolve_it_alike(tmp_path, capsys):
    """A file that names a sampler keeps it (a derived default yields to it); a file that names
    none gets the derived default, and --print-config says which is which. pudm.load_config gives
    the same config as pudm train --config; a run's config.json trains again exactly like the run."""
    pu_epsilon = 'preset = "digits_even"\n[model]\nprediction_type = "epsilon"\n[train]\nmethod = "pu"\n'
    chosen = _toml(tmp_path / "ddim.toml", pu_epsilon + '[sample]\nsampler = "ddim"\nsteps = 50\n')
    assert main(["train", "--config", str(chosen), "--print-config"]) == 0
    out = capsys.readouterr()
    printed = json.loads(out.out)
    assert (printed["sample"]["sampler"], printed["sample"]["steps"]) == ("ddim", 50)
    assert 'sample.sampler = "ddim"  (file ddim.toml)' in out.err
    assert pudm.load_config(chosen).to_dict() == printed
    # The paper's MNIST preset samples with DDIM 50 and trains with the epsilon loss.
    silent = _toml(tmp_path / "none.toml", 'preset = "MNIST_even"\n[train]\nmethod = "pu"\n')
    assert main(["train", "--config", str(silent), "--print-config"]) == 0
    out = capsys.readouterr()
    printed = json.loads(out.out)
    assert (printed["sample"]["sampler"], printed["sample"]["steps"]) == ("dpm-sde", 10)
    assert 'sample.sampler = "dpm-sde"  (derived: pu with the epsilon loss' in out.err
    assert pudm.load_config(silent).to_dict() == printed
    # A sampler given by a flag brings its own default steps, unless the steps are given too.
    assert main(["train", "--sampler", "ddpm", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["sample"] == {
        "grid_size": 64,
        "sampler": "ddpm",
        "steps": 1000,
    }
    # "Train again like that run": a run's config.json keeps every value, the sampler included.
    stored = pudm.preset("digits_even", method="pu", prediction_type="epsilon", sampler="ddim").to_dict()
    assert (stored["sample"]["sampler"], stored["sample"]["steps"]) == ("ddim", 50)
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert pudm.load_config(tmp_path / "config.json").to_dict() == stored
    assert main(["train", "--config", str(tmp_path / "config.json"), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == stored
