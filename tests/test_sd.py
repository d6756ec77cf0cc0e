"""pudm sd on a tiny random Stable Diffusion built from configs: every method, full and LoRA,
the saved results loaded by diffusers alone, latents and caching, resume, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from conftest import tree_digest
from pudm.cli import main
from tiny_sd import write_text_image_folder, write_tiny_sd

U_PROMPT = "a photo of a middle aged man"
S_PROMPT = "a photo of brad pitt"
FAST = ["--resolution", "16", "--batch-size", "4", "--steps", "4", "--log-every", "2"]
FAST += ["--checkpoint-every", "2", "--sample-steps", "2", "--grid-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    write_tiny_sd(root / "base")
    write_text_image_folder(root / "U", 10, seed=0)
    write_text_image_folder(root / "S", 6, seed=1, captions=[S_PROMPT] * 6)
    return root


def base_args(world: Path) -> list[str]:
    """pudm sd on the tiny pipeline, U and S of the fixture (positions: 2 pretrained, 4 U, 6 S)."""
    return ["sd", "--pretrained", str(world / "base"), "--unlabeled", str(world / "U")] + [
        "--sensitive",
        str(world / "S"),
        "--unlabeled-prompt",
        U_PROMPT,
    ]


def sd(world: Path, out: Path, *extra: str) -> int:
    return main([*base_args(world), "--out", str(out), *FAST, *extra])


def generate(pipeline: StableDiffusionPipeline, prompt: str = U_PROMPT) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipeline(
        prompt, num_inference_steps=2, height=16, width=16, generator=generator, output_type="np"
    ).images


@pytest.mark.parametrize("method", ["unsupervised", "supervised", "pu"])
def test_full_fine_tuning_saves_a_pipeline_diffusers_loads(world, tmp_path, method):
    out = tmp_path / method
    assert sd(world, out, "--method", method) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    if method == "unsupervised":
        assert all(m["sensitive_per_batch"] == 0 for m in metrics)  # S is not drawn
    else:
        assert sum(m["sensitive_per_batch"] for m in metrics) > 0
    if method == "pu":
        # The PU bracket mean_U l - beta mean_S l is what trains (h(l) = -log(1 - exp(-l)) is ~0 at
        # the l of a latent: hundreds).
        for m in metrics:
            bracket = m["mean_unlabeled_loss"] - 0.2 * m["mean_sensitive_loss"]
            assert m["bracket"] == pytest.approx(bracket, rel=1e-4)
            assert m["risk"] == pytest.approx(m["positive_risk"] + abs(bracket), rel=1e-4)

    tuned = StableDiffusionPipeline.from_pretrained(out / "pipeline", use_safetensors=True)
    base = StableDiffusionPipeline.from_pretrained(world / "base", use_safetensors=True)
    changed = [
        name
        for name, value in tuned.unet.state_dict().items()
        if not torch.equal(value, base.unet.state_dict()[name])
    ]
    assert len(changed) > 10  # the UNet learned
    for part in ("vae", "text_encoder"):  # frozen parts saved as they were
        mine, theirs = getattr(tuned, part).state_dict(), getattr(base, part).state_dict()
        assert all(torch.equal(mine[name], theirs[name]) for name in theirs)
    image = generate(tuned)
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    assert (out / "samples.png").is_file() and (out / "summary.json").is_file()


def test_lora_trains_adapters_only_and_loads_with_load_lora_weights(world, tmp_path):
    out = tmp_path / "lora"
    assert sd(world, out, "--lora-rank", "4", "--lr", "1e-2") == 0
    lora_file = out / "lora" / "pytorch_lora_weights.safetensors"
    weights = load_file(lora_file)
    assert weights and all("lora" in name for name in weights)
    assert all(name.startswith("unet.") for name in weights)
    # Checkpoints hold the trainable adapters only, not the frozen UNet.
    checkpoint = sorted((out / "checkpoints").iterdir())[-1]
    trained = load_file(checkpoint / "model.safetensors")
    assert trained and all("lora" in name for name in trained)

    base = StableDiffusionPipeline.from_pretrained(world / "base", use_safetensors=True)
    before = generate(base)
    base.load_lora_weights(out / "lora")
    after = generate(base)
    assert after.shape == (1, 16, 16, 3)
    assert not np.allclose(before, after)  # the adapters change what the pipeline draws


def test_pudm_sample_and_evaluate_with_a_folder_classifier(world, tmp_path):
    out = tmp_path / "run"
    assert sd(world, out, "--lora-rank", "2", "--sample-prompt", U_PROMPT, "--sample-prompt", S_PROMPT) == 0
    grid, array = tmp_path / "s.png", tmp_path / "s.npz"
    assert (
        main(
            ["sample", str(out), "--prompt", S_PROMPT, "--num", "3", "--out", str(grid), "--out", str(array)]
        )
        == 0
    )
    images = np.load(array)["images"]
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8 and grid.is_file()

    classifier = tmp_path / "clf"
    args = ["classifier", "train", "--normal", str(world / "U"), "--sensitive", str(world / "S")]
    assert main([*args, "--image-size", "16", "--epochs", "2", "--out", str(classifier)]) == 0
    info = json.loads((classifier / "config.json").read_text())
    assert info["source"] == "folders" and info["normal_classes"] == [0] and info["num_classes"] == 2
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--classifier",
                str(classifier),
                "--num",
                "4",
                "--reference",
                str(world / "U"),
            ]
        )
        == 0
    )
    result = json.loads((out / "eval.json").read_text())
    assert result["num_samples"] == 4 and result["prompt"] == U_PROMPT
    histogram = result["class_histogram"]
    assert sum(histogram) == 4
    # The folder classifier's normal class is 0: the rate is its share of the histogram.
    assert result["non_sensitive_rate"] == pytest.approx(histogram[0] / 4)
    assert np.isfinite(result["fid_classifier"]) and result["fid_classifier"] >= 0


def _trainer(world: Path, tmp_path: Path, cache: bool):
    from pudm.cli import _sd_config, build_parser
    from pudm.sd import load_text_images
    from pudm.sd_task import SDTrainer

    args = build_parser().parse_args(
        [*base_args(world), "--out", str(tmp_path), *FAST] + ([] if cache else ["--no-cache"])
    )
    config = _sd_config(args)
    data = load_text_images(config.data, need_sensitive=True)
    trainer = SDTrainer(config, data, tmp_path, show_progress=False)
    trainer._build()
    trainer.task.prepare(trainer.accelerator, tmp_path)
    return trainer, data


def test_latents_are_scaled_vae_draws_and_caching_changes_nothing(world, tmp_path):
    cached, data = _trainer(world, tmp_path / "a", cache=True)
    uncached, _ = _trainer(world, tmp_path / "b", cache=False)
    batches = cached.task.batches(cached.accelerator)
    fetch_cached, num_u, num_s = batches.fetch, batches.num_unlabeled, batches.num_sensitive
    fetch_uncached = uncached.task.batches(uncached.accelerator).fetch
    assert (num_u, num_s, batches.weights) == (10, 6, None)
    index = torch.tensor([0, 3, 11, 13])  # two U items, two S items
    latents, is_sensitive, conditioning = fetch_cached(index, step=5)
    again, _, conditioning_again = fetch_uncached(index, step=5)
    assert is_sensitive.tolist() == [False, False, True, True]
    assert latents.shape == (4, 4, 8, 8)
    torch.testing.assert_close(latents, again, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        conditioning["encoder_hidden_states"], conditioning_again["encoder_hidden_states"]
    )
    # By hand: the VAE posterior of the pixels, the step's draw, the VAE's scaling factor.
    vae = cached.vae
    pixels = torch.cat([data.unlabeled.images, data.sensitive.images])[index].float() / 127.5 - 1.0
    posterior = vae.encode(pixels).latent_dist
    draw = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed((0 * 1_000_003 + 5) * 64 + 1))
    expected = (posterior.mean + posterior.std * draw) * vae.config.scaling_factor
    assert vae.config.scaling_factor != 1.0
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    # U items carry U's caption embedding, S items S's (from metadata.jsonl).
    embeddings = conditioning["encoder_hidden_states"]
    assert torch.equal(embeddings[0], embeddings[1]) and torch.equal(embeddings[2], embeddings[3])
    assert not torch.equal(embeddings[0], embeddings[2])
    assert data.captions == [U_PROMPT, S_PROMPT]
    # A step of a different seed draws differently.
    other, *_ = fetch_cached(index, step=6)
    assert not torch.allclose(other, latents)


def test_interrupted_run_resumes_to_the_same_weights(world, tmp_path, monkeypatch):
    import pudm.training as training

    reference = tmp_path / "reference"
    assert sd(world, reference, "--lora-rank", "2", "--ema", "--grid-size", "0") == 0

    class StopAfterTwo(training.StopRequest):
        calls = 0

        @property
        def requested(self):
            StopAfterTwo.calls += 1
            return StopAfterTwo.calls >= 2

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(training, "StopRequest", StopAfterTwo)
    out = tmp_path / "stopped"
    assert sd(world, out, "--lora-rank", "2", "--ema", "--grid-size", "0") == 130
    assert not (out / "lora").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
    monkeypatch.undo()
    assert main(["sd", "--resume", "--out", str(out), "--quiet"]) == 0
    mine = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    theirs = load_file(reference / "lora" / "pytorch_lora_weights.safetensors")
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[name], theirs[name]) for name in theirs)
    lines = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == [2, 4]


def test_bf16_lora_step_keeps_adapters_in_float32(world, tmp_path):
    out = tmp_path / "bf16"
    assert sd(world, out, "--lora-rank", "2", "--mixed-precision", "bf16", "--grid-size", "0") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["mixed_precision"] == "bf16"
    checkpoint = sorted((out / "checkpoints").iterdir())[-1]
    adapters = load_file(checkpoint / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in adapters.values())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) for m in metrics)


def test_epochs_set_the_steps_and_the_paper_defaults_hold(world, tmp_path):
    from pudm.cli import _sd_config, build_parser

    out = tmp_path / "epochs"
    args = [*base_args(world), "--out", str(out), "--resolution", "16", "--batch-size", "4"]
    assert main([*args, "--epochs", "2", "--lora-rank", "2", "--grid-size", "0", "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["steps"] == 2 * 4  # 16 items, batch 4: 4 steps an epoch
    defaults = _sd_config(build_parser().parse_args(args[:-4] + ["--out", str(tmp_path / "x")]))
    assert defaults.train.batch_size == 16 and defaults.train.learning_rate == 1e-5
    assert defaults.train.beta == 0.2 and defaults.data.resolution == 512 and defaults.model.epochs == 1000
    other = _sd_config(build_parser().parse_args([*args, "--method", "supervised"]))
    assert other.train.learning_rate == 1e-4


def test_metadata_captions_and_corrupt_files(world, tmp_path, capsys):
    folder = write_text_image_folder(tmp_path / "U", 6, captions=[f"a photo of man {i}" for i in range(6)])
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image either, and ignored")
    base = ["sd", "--pretrained", str(world / "base"), "--unlabeled", str(folder), "--method", "unsupervised"]
    out = tmp_path / "run"
    assert main([*base, "--out", str(out), *FAST, "--grid-size", "0"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image" in err and "broken.png" in err
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["data"]["captions"]) == 6 and summary["data"]["unlabeled"] == 6
    assert main([*base, "--out", str(tmp_path / "strict"), *FAST, "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.png" in err and "--strict" in err


def _one_line_error(capsys, argv: list[str], *expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err


def test_bad_input_is_one_line_and_touches_nothing(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert sd(world, run, "--lora-rank", "2", "--grid-size", "0") == 0
    capsys.readouterr()
    before = tree_digest(run)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    new = tmp_path / "new"
    base = base_args(world)
    cases = [
        ([*base, "--out", str(new), "--beta", "1.5"], "--beta must be in [0, 1)"),
        ([*base, "--out", str(new), "--resolution", "20"], "multiple of 8"),
        ([*base, "--out", str(new), "--method", "oracle"], "unknown method"),
        ([*base, "--out", str(new), "--steps", "3", "--epochs", "2"], "--steps or --epochs"),
        ([*base[:2], str(tmp_path / "nowhere"), *base[3:], "--out", str(new)], "does not exist"),
        (
            [*base[:2], str(world / "U"), *base[3:], "--out", str(new)],
            "is not a diffusers Stable Diffusion folder",
        ),
        (
            [*base[:4], str(tmp_path / "missing"), *base[5:], "--out", str(new)],
            "--unlabeled",
            "does not exist",
        ),
        ([*base[:6], str(empty), *base[7:], "--out", str(new)], "--sensitive", "holds no images"),
        ([*base[:-2], "--out", str(new)], "has no caption", "--unlabeled-prompt"),
        ([*base, "--out", str(run)], "already holds a run"),
        ([*base, "--out", str(run), "--resume", "--lora-rank", "4"], "--lora-rank 2, not 4"),
        (["sd", "--resume", "--out", str(run), "--lora-rank", "4"], "--lora-rank 2, not 4"),
        (["sd", "--resume", "--out", str(empty)], "holds no pudm sd run"),
        (["sample", str(run), "--out", str(tmp_path / "x.gif")], ".png"),
    ]
    for argv, *expected in cases:
        _one_line_error(capsys, argv, *expected)
    assert not new.exists() or not any(new.iterdir())
    assert tree_digest(run) == before


def test_resume_refuses_changed_data(world, tmp_path, capsys):
    import shutil

    data = tmp_path / "U"
    shutil.copytree(world / "U", data)
    out = tmp_path / "run"
    base = ["sd", "--pretrained", str(world / "base"), "--unlabeled", str(data), "--method", "unsupervised"]
    base += ["--unlabeled-prompt", U_PROMPT]
    assert main([*base, "--out", str(out), *FAST, "--grid-size", "0"]) == 0
    capsys.readouterr()
    before = tree_digest(out)
    write_text_image_folder(data / "more", 2, seed=5)
    _one_line_error(capsys, ["sd", "--resume", "--out", str(out)], "changed since")
    assert tree_digest(out) == before


def test_a_hub_id_that_cannot_be_fetched_is_one_line(world, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    argv = ["sd", "--pretrained", "someone/not-a-cached-pipeline", "--unlabeled", str(world / "U")]
    argv += ["--sensitive", str(world / "S"), "--unlabeled-prompt", U_PROMPT, "--out", str(out), *FAST]
    _one_line_error(
        capsys, argv, "could not be downloaded", "huggingface-cli download someone/not-a-cached-pipeline"
    )
    assert not out.exists()


def test_pickled_weights_are_refused(world, tmp_path, capsys):
    import shutil

    base = tmp_path / "pickled"
    shutil.copytree(world / "base", base)
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), base / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    out = tmp_path / "run"
    argv = ["sd", "--pretrained", str(base), "--unlabeled", str(world / "U"), "--sensitive", str(world / "S")]
    _one_line_error(
        capsys,
        [*argv, "--unlabeled-prompt", U_PROMPT, "--out", str(out), *FAST],
        "the UNet could not be loaded",
    )
    assert not out.exists()


def test_pu_bounded_and_warm_start_on_latents(world, tmp_path):
    """pu-bounded with t0 = 0 is the paper's objective on latents, step for step; a warm start
    trains the unsupervised objective first (the logged bracket is then mean_U l)."""
    assert sd(world, tmp_path / "pu", "--method", "pu") == 0
    assert sd(world, tmp_path / "bounded", "--method", "pu-bounded", "--pu-min-timestep", "0") == 0
    pu, bounded = (
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("pu", "bounded")
    )
    for a, b in zip(pu, bounded, strict=True):
        for key in ("loss", "bracket", "mean_unlabeled_loss", "mean_sensitive_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert sd(world, tmp_path / "warm", "--method", "pu", "--warm-start-steps", "2") == 0
    warm = [json.loads(line) for line in (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()]
    assert [m["bracket"] == m["mean_unlabeled_loss"] for m in warm] == [True, False]
    assert warm[0]["loss"] == pytest.approx(warm[0]["mean_unlabeled_loss"], rel=1e-6)
    assert warm[1]["loss"] != pytest.approx(warm[1]["mean_unlabeled_loss"], rel=1e-3)


def test_a_warm_start_longer_than_the_epochs_is_one_line(world, tmp_path, capsys):
    out = tmp_path / "warm"
    args = [*base_args(world), "--out", str(out), "--resolution", "16", "--batch-size", "4", "--epochs", "1"]
    assert main([*args, "--warm-start-steps", "100", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--warm-start-steps must be in [0, --steps" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_lora_and_full_runs_carry_a_model_card(world, tmp_path):
    lora = tmp_path / "lora"
    assert main([*base_args(world), "--out", str(lora), *FAST, "--lora-rank", "2"]) == 0
    card = (lora / "lora" / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "- lora" in card and "| LoRA rank | 2 |" in card
    assert (
        "| S (labeled sensitive) | 6 |" in card and "| U (unlabeled, may hide sensitive items) | 10 |" in card
    )
    assert "load_lora_weights" in card
    full = tmp_path / "full"
    assert main([*base_args(world), "--out", str(full), *FAST]) == 0
    card = (full / "pipeline" / "README.md").read_text()
    assert "LoRA" not in card and "| method | pu |" in card and "not proven impossible" in card
