"""GPU memory of one Stable Diffusion 1.4 fine-tuning step, estimated without weights or a GPU.

The three SD 1.4 models (UNet2DConditionModel, AutoencoderKL, CLIP ViT-L/14 text encoder) are built
at full size from their configurations (written below, copied from CompVis/stable-diffusion-v1-4) on
the ``meta`` device, so nothing is allocated and nothing is downloaded. Per configuration (LoRA of
rank R or full UNet fine-tuning, gradient checkpointing on or off) the estimate adds up:

* weights: UNet base in ``--dtype`` for LoRA (as diffusers' ``train_text_to_image_lora.py`` does,
  with the adapters cast back to fp32), fp32 UNet for full fine-tuning (``train_text_to_image.py``
  with mixed precision); VAE and text encoder frozen in ``--dtype``. The LoRA adapters are added
  with peft (``unet.add_adapter``, to_q/to_k/to_v/to_out.0) and their trainable parameters counted.
* gradients (fp32) and AdamW's two fp32 moments of the trainable parameters; an fp32 EMA copy
  with ``--ema``.
* activations saved for backward: one UNet forward on meta tensors (plus the fp32 MSE loss) runs
  under ``torch.autograd.graph.saved_tensors_hooks``, whose pack hook adds up the bytes of every
  saved tensor. Meta tensors have no data pointer, so tensors are de-duplicated by the identity of
  their storage (``untyped_storage()._cdata``, the address of the StorageImpl, which views share);
  a storage is counted once at its full size, and storages of parameters and buffers are left out
  (they are weights, counted above). References are kept until the end so no address is reused.
* autocast: meta tensors are not autocast, so a ``TorchFunctionMode`` emulates CUDA autocast:
  linear/conv/matmul/attention run in the half dtype (for full fine-tuning the fp32 weights are
  cast, and those half copies are saved for backward as under real autocast), group_norm,
  layer_norm, softmax and the loss run in fp32, everything else in the dtype of its inputs.
* attention: on meta (as on CPU) ``scaled_dot_product_attention`` takes the math path, which saves
  the B x heads x 4096 x 4096 probability matrix at 512 px. A GPU with flash / memory-efficient
  SDPA saves only q, k, v, out and the fp32 logsumexp, so attention is routed through a stand-in
  autograd Function that saves exactly those (``--attention math`` shows the math path instead).
* gradient checkpointing: diffusers checkpoints each ResnetBlock2D and BasicTransformerBlock with
  non-reentrant ``torch.utils.checkpoint``, which works on meta (for the plain model, forward and the
  recomputing backward both run; no backward is run here: the recomputation would not see the
  autocast emulation below, and only the forward's saved tensors are needed). Its internal hooks
  hide the segment's saved tensors from ours, and the segment inputs it keeps are held by a
  closure, not saved, so a wrapper passed to ``enable_gradient_checkpointing`` counts those inputs
  and, from a measuring forward of the segment, the largest segment's saved bytes: the backward
  recomputes one segment at a time, so that much comes on top while it runs.
* backward working set: two times the largest single saved tensor (incoming and outgoing
  activation gradient of the op being differentiated).
* phases: the training peak is taken as weights + optimizer + EMA + gradients + saved activations
  + recomputation + working set, an upper bound since gradients are allocated while activations
  are being freed. The VAE encode and the text encoder run before, without grad, in ``--dtype``;
  their peak of live tensors is measured by a ``TorchDispatchMode`` that tracks live meta storages
  (freed through weakref finalizers) and is reported as its own phase (caching latents and text
  embeddings removes it). The AdamW step (foreach, the CUDA default) briefly holds about one more
  fp32 copy of the trainable parameters. The reported total is the largest of the three phases.

Not included: the CUDA context and cuBLAS/cuDNN workspaces (about 0.5-1 GiB outside
``max_memory_allocated``) and allocator fragmentation; the "fits 24 GB" column therefore asks
for 1 GiB of headroom below 24 GiB.

    python benchmarks/sd_memory.py --resolution 512 --batch-size 16 --lora-rank 4
    python benchmarks/sd_memory.py --resolution 512 --batch-size 1 --lora-rank 4 --dtype bf16 --ema
    python benchmarks/sd_memory.py --batch-size 4 --measure      # on a CUDA machine: measured peaks too
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import CLIPTextConfig, CLIPTextModel

GIB = 1024**3
HEADROOM_GIB = 1.0  # CUDA context, library workspaces, fragmentation
CARD_GIB = 24.0

# CompVis/stable-diffusion-v1-4, unet/config.json
UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
# vae/config.json
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
# text_encoder/config.json (openai/clip-vit-large-patch14 text tower)
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
TEXT_LEN = 77
VAE_SCALE = 0.18215
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def build_unet(device: str | torch.device) -> UNet2DConditionModel:
    with torch.device(device):
        return UNet2DConditionModel(**UNET_CONFIG)


def build_vae(device: str | torch.device) -> AutoencoderKL:
    with torch.device(device):
        return AutoencoderKL(**VAE_CONFIG)


def build_text_encoder(device: str | torch.device) -> CLIPTextModel:
    config = CLIPTextConfig(**TEXT_CONFIG)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        return CLIPTextModel(config)


def add_lora(unet: UNet2DConditionModel, rank: int) -> None:
    """diffusers' LoRA recipe: freeze the UNet, add the adapters, keep the adapters trainable."""
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )


def param_bytes(module: torch.nn.Module, trainable: bool | None = None) -> tuple[int, int]:
    """(count, bytes) of the parameters, all of them or only the (non-)trainable ones."""
    params = [p for p in module.parameters() if trainable is None or p.requires_grad == trainable]
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _storages_of(*modules: torch.nn.Module) -> set[int]:
    keys = set()
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            keys.add(_storage_key(t))
    return keys


# --------------------------------------------------------------------------- meta-device emulation


class _FusedAttention(torch.autograd.Function):
    """Stands in for flash / memory-efficient SDPA: saves q, k, v, out and the fp32 logsumexp only."""

    @staticmethod
    def forward(ctx, q, k, v):  # noqa: D102 - meta shapes only, nothing is computed
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # meta only: shapes of the input gradients
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    if attn_mask is not None or dropout_p:
        raise NotImplementedError("the fused-attention stand-in covers unmasked attention without dropout")
    return _FusedAttention.apply(query, key, value)


_LOW_PRECISION = {
    F.linear,
    F.conv2d,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.baddbmm,
    torch.addmm,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.bmm,
    torch.Tensor.baddbmm,
    F.scaled_dot_product_attention,
}
_FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.mse_loss}


class MetaGpuMode(TorchFunctionMode):
    """CUDA autocast (when ``autocast_dtype`` is set) and flash-style SDPA (when ``fused_attention``).

    Half copies of parameters made by the emulated autocast are remembered (``weight_copies``: storage
    keys, the tensors kept alive) so that the saved bytes they account for can be reported apart.
    """

    def __init__(self, autocast_dtype: torch.dtype | None, fused_attention: bool):
        super().__init__()
        self.autocast_dtype = autocast_dtype
        self.fused_attention = fused_attention
        self.weight_copies: dict[int, torch.Tensor] = {}

    def _cast_one(self, x, dtype: torch.dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype):
            return x
        y = x.to(dtype)
        if isinstance(x, torch.nn.Parameter):
            self.weight_copies[_storage_key(y)] = y
        return y

    def _cast(self, args, kwargs, dtype: torch.dtype):
        return (
            tuple(self._cast_one(x, dtype) for x in args),
            {k: self._cast_one(v, dtype) for k, v in kwargs.items()},
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.autocast_dtype is not None:
            if func in _LOW_PRECISION:
                args, kwargs = self._cast(args, kwargs, self.autocast_dtype)
            elif func in _FP32:
                args, kwargs = self._cast(args, kwargs, torch.float32)
        if self.fused_attention and func is F.scaled_dot_product_attention:
            return _fused_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


class SavedBytes:
    """Bytes of the tensors autograd saves for backward, one count per storage."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.storages: dict[int, int] = {}
        self.largest = 0
        self._keep: list[torch.Tensor] = []  # keeps storages alive so their addresses are not reused

    def add(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key in self.exclude or key in self.storages:
            return
        nbytes = t.untyped_storage().nbytes()
        self.storages[key] = nbytes
        self.largest = max(self.largest, nbytes)
        self._keep.append(t)

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def hooks(self):
        def pack(t):
            self.add(t)
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


class CheckpointAccounting:
    """A ``gradient_checkpointing_func`` for diffusers that runs torch's non-reentrant checkpoint and
    counts what it keeps (the segment inputs) and what recomputing the largest segment saves."""

    def __init__(self, saved: SavedBytes):
        self.saved = saved
        self.segments = 0
        self.largest_segment = 0

    def __call__(self, module, *args):
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        segment = SavedBytes(self.saved.exclude | {_storage_key(t) for t in inputs})
        with segment.hooks():
            module(*args)  # what the backward's recomputation of this segment saves
        self.largest_segment = max(self.largest_segment, segment.total)
        self.segments += 1
        for t in inputs:
            self.saved.add(t)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensors created by the ops run under it (weakref-tracked storages)."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude = exclude
        self.refs: dict[int, int] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key in self.exclude:
            return
        nbytes = t.untyped_storage().nbytes()
        if key not in self.refs:
            self.refs[key] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes


# --------------------------------------------------------------------------- estimate


@dataclass
class Estimate:
    mode: str
    checkpointing: bool
    trainable: int
    weights: int  # UNet + VAE + text encoder (+ LoRA)
    grads: int
    optimizer: int  # AdamW moments (+ EMA)
    activations: int  # saved for backward (+ checkpoint inputs, + the batch tensors)
    weight_copies: int  # of which: half copies of fp32 weights made by autocast
    recompute: int  # largest checkpointed segment, re-saved during backward
    working: int  # backward working set
    encode: int  # VAE encode + text encoder transient, without grad
    step_extra: int  # foreach AdamW temporaries
    segments: int = 0

    @property
    def static(self) -> int:
        return self.weights + self.optimizer

    @property
    def train_peak(self) -> int:
        return self.static + self.grads + self.activations + self.recompute + self.working

    @property
    def total(self) -> int:
        return max(self.train_peak, self.static + self.encode, self.static + self.grads + self.step_extra)


def unet_activations(
    unet: UNet2DConditionModel,
    batch: int,
    resolution: int,
    half: torch.dtype,
    checkpointing: bool,
    fused_attention: bool,
) -> tuple[SavedBytes, CheckpointAccounting | None, int]:
    """Saved-for-backward bytes of one autocast training forward (UNet + fp32 MSE loss) on meta,
    the checkpoint accounting, and the saved bytes that are autocast's half copies of weights."""
    saved = SavedBytes(_storages_of(unet))
    accounting = None
    unet.train()
    if checkpointing:
        accounting = CheckpointAccounting(saved)
        unet.enable_gradient_checkpointing(accounting)
    else:
        unet.disable_gradient_checkpointing()
    side = resolution // 8
    with torch.device("meta"):
        noisy = torch.empty(batch, UNET_CONFIG["in_channels"], side, side, dtype=half)
        target = torch.empty_like(noisy)
        text = torch.empty(batch, TEXT_LEN, UNET_CONFIG["cross_attention_dim"], dtype=half)
        timesteps = torch.zeros(batch, dtype=torch.long)
    mode = MetaGpuMode(half, fused_attention)
    with saved.hooks(), mode:
        pred = unet(noisy, timesteps, text).sample
        loss = F.mse_loss(pred.float(), target.float())
    assert loss.requires_grad, "nothing trainable reached the loss"
    if checkpointing:
        unet.disable_gradient_checkpointing()
    weight_copies = sum(saved.storages.get(key, 0) for key in mode.weight_copies)
    return saved, accounting, weight_copies


def encode_transient(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, batch: int, resolution: int, half: torch.dtype
) -> tuple[int, int]:
    """Peak live bytes of the no-grad VAE encode (with its input batch) and of the text encoder."""
    with torch.device("meta"):
        pixels = torch.empty(batch, 3, resolution, resolution, dtype=half)
        ids = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
    peaks = []
    for run in (lambda: vae.encode(pixels).latent_dist.sample() * VAE_SCALE, lambda: text_encoder(ids)[0]):
        tracker = LiveBytes(_storages_of(vae, text_encoder))
        with torch.no_grad(), MetaGpuMode(None, fused_attention=True), tracker:
            run()
        peaks.append(tracker.peak)
    return peaks[0] + pixels.numel() * pixels.element_size(), peaks[1]


def estimate(args: argparse.Namespace) -> tuple[list[Estimate], int, int]:
    half = HALF[args.dtype]
    vae = build_vae("meta").to(half).requires_grad_(False)
    text_encoder = build_text_encoder("meta").to(half).requires_grad_(False)
    frozen_bytes = param_bytes(vae)[1] + param_bytes(text_encoder)[1]
    vae_peak, text_peak = encode_transient(vae, text_encoder, args.batch_size, args.resolution, half)
    encode = max(vae_peak, text_peak)
    fused = args.attention == "fused"

    rows = []
    for mode in ("lora", "full"):
        unet = build_unet("meta")
        if mode == "lora":
            unet.to(half)
            add_lora(unet, args.lora_rank)
            for p in unet.parameters():  # diffusers' cast_training_params
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            unet.requires_grad_(True)  # fp32 weights, autocast casts them per forward
        trainable = param_bytes(unet, trainable=True)[0]
        weights = param_bytes(unet)[1] + frozen_bytes
        for checkpointing in (False, True):
            saved, accounting, weight_copies = unet_activations(
                unet, args.batch_size, args.resolution, half, checkpointing, fused
            )
            batch_tensors = args.batch_size * (
                3 * UNET_CONFIG["in_channels"] * (args.resolution // 8) ** 2  # latents, noise, noisy latents
                + TEXT_LEN * UNET_CONFIG["cross_attention_dim"]
            )
            rows.append(
                Estimate(
                    mode=f"LoRA r={args.lora_rank}" if mode == "lora" else "full UNet",
                    checkpointing=checkpointing,
                    trainable=trainable,
                    weights=weights,
                    grads=4 * trainable,
                    optimizer=8 * trainable + (4 * trainable if args.ema else 0),
                    activations=saved.total + batch_tensors * torch.finfo(half).bits // 8,
                    weight_copies=weight_copies,
                    recompute=accounting.largest_segment if accounting else 0,
                    working=2 * saved.largest,
                    encode=encode,
                    step_extra=4 * trainable,
                    segments=accounting.segments if accounting else 0,
                )
            )
        del unet
        gc.collect()
    return rows, vae_peak, text_peak


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def print_table(rows: list[Estimate], ema: bool, measured: dict | None = None) -> None:
    header = (
        "| mode | grad ckpt | trainable params | weights | grads | AdamW"
        + (" + EMA" if ema else "")
        + " | saved activations (autocast weight copies) | recompute + working | VAE/text transient"
        + " | **estimate (GiB)** | fits 24 GB |"
    )
    if measured is not None:
        header += " measured peak (GiB) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        fits = "yes" if r.total / GIB + HEADROOM_GIB <= CARD_GIB else "no"
        ckpt = "on" if r.checkpointing else "off"
        line = (
            f"| {r.mode} | {ckpt} | {r.trainable / 1e6:.2f} M | {_gib(r.weights)}"
            f" | {_gib(r.grads)} | {_gib(r.optimizer)} | {_gib(r.activations)} ({_gib(r.weight_copies)})"
            f" | {_gib(r.recompute + r.working)} | {_gib(r.encode)} | **{_gib(r.total)}** | {fits} |"
        )
        if measured is not None:
            m = measured.get((r.mode, r.checkpointing))
            line += f" {m} |"
        print(line)


# --------------------------------------------------------------------------- measurement on a GPU


def _gpu_models(args: argparse.Namespace, mode: str, checkpointing: bool) -> SimpleNamespace:
    """The training setup of diffusers' text-to-image scripts, with random weights, on CUDA."""
    from diffusers import DDPMScheduler

    device, half = torch.device("cuda"), HALF[args.dtype]
    torch.manual_seed(0)
    m = SimpleNamespace(device=device, half=half)
    m.vae = build_vae(device).to(half).requires_grad_(False)
    m.text_encoder = build_text_encoder(device).to(half).requires_grad_(False)
    m.unet = build_unet(device)
    if mode == "lora":
        m.unet.to(half)
        add_lora(m.unet, args.lora_rank)
        for p in m.unet.parameters():  # diffusers' cast_training_params
            if p.requires_grad:
                p.data = p.data.float()
    m.params = [p for p in m.unet.parameters() if p.requires_grad]
    m.optimizer = torch.optim.AdamW(m.params, lr=1e-4)  # foreach, the CUDA default
    m.ema = [p.detach().clone() for p in m.params] if args.ema else None
    if checkpointing:
        m.unet.enable_gradient_checkpointing()
    m.unet.train()
    m.scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return m


def _gpu_step(m: SimpleNamespace, batch: int, resolution: int) -> None:
    pixels = torch.randn(batch, 3, resolution, resolution, device=m.device, dtype=m.half)
    ids = torch.randint(0, TEXT_CONFIG["vocab_size"], (batch, TEXT_LEN), device=m.device)
    with torch.no_grad():
        latents = m.vae.encode(pixels).latent_dist.sample() * VAE_SCALE
        text = m.text_encoder(ids)[0]
    del pixels
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, m.scheduler.config.num_train_timesteps, (batch,), device=m.device)
    noisy = m.scheduler.add_noise(latents, noise, timesteps)
    with torch.autocast("cuda", dtype=m.half):
        pred = m.unet(noisy, timesteps, text).sample
    loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)
    if m.ema is not None:
        torch._foreach_lerp_(m.ema, [p.detach() for p in m.params], 1 - 0.9999)


def measure_step(args: argparse.Namespace, mode: str, checkpointing: bool) -> str:
    """Peak ``max_memory_allocated`` of the second of two real training steps (random weights), GiB."""
    m = None
    try:
        m = _gpu_models(args, mode, checkpointing)
        _gpu_step(m, args.batch_size, args.resolution)  # allocates the AdamW moments
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _gpu_step(m, args.batch_size, args.resolution)
        torch.cuda.synchronize()
        return f"{torch.cuda.max_memory_allocated() / GIB:.2f}"
    except torch.cuda.OutOfMemoryError:
        return "OOM"
    finally:
        del m
        gc.collect()
        torch.cuda.empty_cache()


def measure(args: argparse.Namespace, rows: list[Estimate]) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("--measure needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    measured = {}
    for r in rows:
        mode = "lora" if r.mode.startswith("LoRA") else "full"
        start = time.perf_counter()
        measured[(r.mode, r.checkpointing)] = measure_step(args, mode, r.checkpointing)
        print(
            f"measured {r.mode}, checkpointing {'on' if r.checkpointing else 'off'}: "
            f"{measured[(r.mode, r.checkpointing)]} GiB ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return measured


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(HALF), default="fp16", help="frozen weights and autocast")
    parser.add_argument("--ema", action="store_true", help="an fp32 EMA copy of the trainable parameters")
    parser.add_argument(
        "--attention",
        choices=("fused", "math"),
        default="fused",
        help="fused: flash/memory-efficient SDPA as on a GPU (default); math: the materialised softmax",
    )
    parser.add_argument("--measure", action="store_true", help="also measure real steps on the CUDA GPU")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on .to(half)
    if args.resolution % 64:
        parser.error("--resolution must be a multiple of 64")

    rows, vae_peak, text_peak = estimate(args)
    side = args.resolution // 8
    measured = measure(args, rows) if args.measure else None

    print(
        f"\nSD 1.4 fine-tuning step, {args.resolution} px (latents {side}x{side}),"
        f" batch {args.batch_size}, {args.dtype} frozen weights + autocast, AdamW"
        + (", EMA" if args.ema else "")
        + f", attention: {'flash/memory-efficient SDPA' if args.attention == 'fused' else 'math SDPA'}\n"
    )
    print_table(rows, args.ema, measured)
    print(
        f"\nAll sizes in GiB. Transient without grad: VAE encode {_gib(vae_peak)} GiB (with the pixel batch),"
        f" text encoder {_gib(text_peak)} GiB; cached latents/embeddings remove them."
        f" Checkpointed segments per forward: {rows[1].segments}."
        f"\nestimate = max(training peak, static + VAE encode, static + grads + AdamW foreach temporaries);"
        f" training peak = weights + optimizer + grads + saved activations + recompute + working set"
        f" (an upper bound: grads are allocated while activations are freed)."
        f"\nfits 24 GB: estimate + {HEADROOM_GIB:.0f} GiB (CUDA context, workspaces, fragmentation)"
        f" <= {CARD_GIB:.0f} GiB."
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
