"""Model presets and the per-sample denoising error."""

import pytest
import torch

from pudm.config import ModelConfig, preset
from pudm.models import build_noise_scheduler, build_unet, model_preset
from pudm.training import per_sample_denoising_loss


def test_paper_preset_is_the_papers_unet():
    unet = build_unet(model_preset("paper"), image_size=32, channels=3)
    assert tuple(unet.config.block_out_channels) == (128, 128, 256, 512)
    assert unet.config.layers_per_block == 2
    assert unet.config.down_block_types[2] == "AttnDownBlock2D"
    assert unet.config.up_block_types[1] == "AttnUpBlock2D"
    assert sum(p.numel() for p in unet.parameters()) > 30_000_000


def test_small_preset_is_small_and_digits_use_v_prediction():
    unet = build_unet(model_preset("small"), image_size=8, channels=1)
    assert sum(p.numel() for p in unet.parameters()) < 2_000_000
    assert preset("digits_even").model.prediction_type == "v_prediction"
    assert ModelConfig().prediction_type == "epsilon", "the paper's loss stays the library default"
    assert preset("MNIST_even").model.prediction_type == "epsilon", "the paper presets keep the paper's"


def test_folder_preset_uses_v_prediction_unless_told_otherwise():
    """Folder defaults: the v loss (PU with the epsilon loss broke deterministic samplers)."""
    from pudm.settings import preset as with_settings

    assert preset("folders").model.prediction_type == "v_prediction"
    told = with_settings("folders", unlabeled="U", sensitive="S", prediction_type="epsilon")
    assert told.model.prediction_type == "epsilon"


def test_image_size_must_fit_the_unet_depth():
    with pytest.raises(ValueError, match="divisible by 8"):
        build_unet(model_preset("paper"), image_size=12, channels=1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_per_sample_loss_is_a_sum_over_dimensions(prediction_type):
    config = ModelConfig(prediction_type=prediction_type)
    scheduler = build_noise_scheduler(config)

    class Constant(torch.nn.Module):  # predicts zero: l is then the squared norm of the target
        def forward(self, sample, timesteps):
            return type("Out", (), {"sample": torch.zeros_like(sample)})()

    clean = torch.randn(3, 1, 4, 4)
    noise = torch.randn(3, 1, 4, 4)
    timesteps = torch.tensor([0, 500, 999])
    loss = per_sample_denoising_loss(Constant(), scheduler, clean, noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    else:
        abar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        target = abar.sqrt() * noise - (1 - abar).sqrt() * clean
    assert loss.shape == (3,)
    assert torch.allclose(loss, target.pow(2).sum((1, 2, 3)), rtol=1e-5)


def test_loss_is_float32_under_bf16_autocast():
    unet = build_unet(model_preset("small"), image_size=8, channels=1)
    scheduler = build_noise_scheduler(ModelConfig())
    clean, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    timesteps = torch.tensor([1, 10, 100, 999])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unet(clean, timesteps).sample.dtype == torch.bfloat16, "autocast reaches the UNet"
        loss = per_sample_denoising_loss(unet, scheduler, clean, noise, timesteps)
    assert loss.dtype == torch.float32
    reference = per_sample_denoising_loss(unet, scheduler, clean, noise, timesteps)
    assert torch.allclose(loss, reference, rtol=0.05), "bf16 forward, float32 reduction: close"


def test_no_two_sampling_seeds_share_a_batch_of_noise():
    """Batch i of seed s once drew from seed s + i: seed 0's second batch was seed 1's first.
    Every (seed, stream, batch) now has a stream of its own; a call still repeats exactly."""
    import numpy as np

    from pudm.config import preset
    from pudm.models import build_noise_scheduler, build_unet
    from pudm.sampling import generate, sample_seed

    config = preset("digits_even")
    torch.manual_seed(0)
    unet = build_unet(config.model, image_size=8, channels=1).eval()
    schedule = build_noise_scheduler(config.model).config

    def draw(seed, stream=0):
        return generate(
            unet, schedule, num=2, steps=2, seed=seed, batch_size=1, stream=stream, show_progress=False
        )

    first, second = draw(0), draw(1)
    assert not np.array_equal(first[1], second[0]), "seed 0's batch 1 is not seed 1's batch 0"
    assert not np.array_equal(draw(0, stream=1)[0], first[0]), "a rejection round draws anew"
    assert np.array_equal(draw(0), first), "the same call, the same images"
    seeds = {
        sample_seed(seed, stream, batch) for seed in range(20) for stream in range(3) for batch in range(20)
    }
    assert len(seeds) == 20 * 3 * 20 and all(0 <= s < 2**63 for s in seeds)
