"""Test helpers: a tiny random-weight Stable Diffusion 1.x pipeline and a tiny text-image folder.

Everything is built from configs (no downloads), so the helpers work offline and run in well under a
second on CPU.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Latent channels of SD 1.x and the width shared by the UNet's cross-attention and the text encoder.
LATENT_CHANNELS = 4
CROSS_ATTENTION_DIM = 32
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# A few whole-word merges so typical test prompts tokenize to short sequences.
_MERGE_WORDS = ("a", "photo", "of", "man", "middle", "aged", "brad", "pitt", "woman", "face")


def _word_merges(word: str) -> list[tuple[str, str]]:
    """BPE merges that build ``word + '</w>'`` left to right from its characters."""
    if len(word) < 2:
        return []
    merges: list[tuple[str, str]] = []
    current = word[0]
    for i, ch in enumerate(word[1:], start=1):
        piece = ch + "</w>" if i == len(word) - 1 else ch
        merges.append((current, piece))
        current += piece
    return merges


def _write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """Write a character-level CLIP BPE ``vocab.json`` / ``merges.txt`` plus a few word merges."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens: list[str] = [BOS_TOKEN, EOS_TOKEN]
    tokens += chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in _MERGE_WORDS:
        for pair in _word_merges(word):
            if pair not in merges:
                merges.append(pair)
    for left, right in merges:
        merged = left + right
        if merged not in tokens:
            tokens.append(merged)
    vocab_file = folder / "vocab.json"
    merges_file = folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        encoding="utf-8",
    )
    return vocab_file, merges_file


def _tiny_tokenizer():
    """A tiny ``CLIPTokenizer`` written from scratch (a-z, digits, punctuation, a few whole words).

    Loaded with ``from_pretrained`` on the written folder: in transformers 5 ``CLIPTokenizer(vocab_file,
    merges_file)`` silently ignores the files (the constructor takes in-memory ``vocab``/``merges``).
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, _ = _write_tokenizer_files(Path(tmp))
        vocab_size = len(json.loads(vocab_file.read_text(encoding="utf-8")))
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp,
            unk_token=EOS_TOKEN,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
            model_max_length=77,
        )
    if len(tokenizer) != vocab_size:
        raise RuntimeError("tiny CLIP tokenizer did not load its vocabulary")
    return tokenizer


def write_tiny_sd(path: Path, sample_size: int = 8) -> Path:
    """Save a deterministic random-weight SD 1.x-style ``StableDiffusionPipeline`` to ``path``.

    ``sample_size`` is the latent size; images are ``2 * sample_size`` pixels square (16 by default).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=(2, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=LATENT_CHANNELS,
        sample_size=2 * sample_size,
        scaling_factor=0.18215,
    )
    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=CROSS_ATTENTION_DIM,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=77,
            vocab_size=len(tokenizer),
        )
    )
    # from_config, not the constructor: DDPMScheduler has no ``set_alpha_to_one`` argument, but SD 1.x
    # scheduler configs carry it, and from_config keeps it in the saved config.
    scheduler = DDPMScheduler.from_config(
        {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
        }
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def write_text_image_folder(
    path: Path,
    num: int,
    size: int = 20,
    captions: list[str] | None = None,
    seed: int = 0,
    fmt: str = "png",
) -> Path:
    """Write ``num`` random RGB ``size`` x ``size`` images (``img_000.<fmt>``, ...) into ``path``.

    With ``captions`` (one per image), also write a diffusers imagefolder ``metadata.jsonl``.
    """
    if captions is not None and len(captions) != num:
        raise ValueError(f"got {len(captions)} captions for {num} images")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    names = []
    for i in range(num):
        name = f"img_{i:03d}.{fmt}"
        pixels = rng.randint(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path / name)
        names.append(name)
    if captions is not None:
        with open(path / "metadata.jsonl", "w", encoding="utf-8") as f:
            for name, caption in zip(names, captions, strict=True):
                f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return path
