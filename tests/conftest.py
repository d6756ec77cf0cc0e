import hashlib
from pathlib import Path

import torch

# Two cores: keep intra-op threads bounded so test timings stay predictable.
torch.set_num_threads(2)


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``: equal digests mean nothing was written or changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def poison_loss(monkeypatch, bad_calls) -> None:
    """Make the per-sample loss NaN on the given (1-based) calls of the training step."""
    import pudm.training as training

    real = training.per_sample_denoising_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if bad_calls(calls["n"]) else value

    monkeypatch.setattr(training, "per_sample_denoising_loss", loss)
