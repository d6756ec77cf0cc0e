"""The exponential moving average of a model's trainable weights (what a run saves)."""

from __future__ import annotations

import copy

import torch


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """The EMA of ``model``: a frozen copy in which only the trainable parameters are copied; the
    frozen ones (a LoRA model's base) are shared with the model, not held twice."""
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, memo=shared).requires_grad_(False)


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def update_ema(
    ema: torch.nn.Module, model: torch.nn.Module, decay: float, names: list[str] | None = None
) -> None:
    """ema <- decay * ema + (1 - decay) * model, over ``names`` (default: every parameter)."""
    ema_params, model_params = dict(ema.named_parameters()), dict(model.named_parameters())
    names = list(model_params) if names is None else names
    torch._foreach_lerp_(
        [ema_params[n] for n in names], [model_params[n].detach() for n in names], 1.0 - decay
    )


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up of the EMA decay, (1 + step) / (10 + step) capped at ``decay``: early weights fade."""
    return min(decay, (1.0 + step) / (10.0 + step))
