"""The contract every registered method passes (a new method is one module + one registry line,
and these tests run it): what it declares, what reaches the objective, and that nothing but the
methods that say so reads the hidden truth of U."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import pudm.training as training
from conftest import tree_digest
from pudm import methods
from pudm.config import BETA_METHODS, S_OBJECTIVE_METHODS, TRAIN_METHODS, preset
from pudm.data import PUSplit
from pudm.objectives import METHODS as OBJECTIVES
from pudm.ticks import TICK_FIELDS
from pudm.training import Trainer

ALL = list(methods.REGISTRY)
WEIGHTS = "pipeline/unet/diffusion_pytorch_model.safetensors"


def test_the_registry_is_the_one_list_of_methods():
    assert ALL == list(TRAIN_METHODS) and len(set(ALL)) == len(ALL)
    assert set(S_OBJECTIVE_METHODS) == {m for m in ALL if methods.get(m).draws_sensitive}
    assert set(BETA_METHODS) == {m for m in ALL if methods.get(m).uses_beta}
    for name, method in methods.REGISTRY.items():
        assert method.name == name and method.summary
        assert method.objective in OBJECTIVES, name
        assert set(method.progress) <= set(TICK_FIELDS), name
        if method.trains_like is not None:
            assert methods.get(method.trains_like).objective == method.objective
    assert [m for m in ALL if methods.get(m).reads_hidden_truth] == ["oracle"]
    with pytest.raises(pudm_usage_error(), match="unknown method 'magic'"):
        methods.get("magic")


def pudm_usage_error():
    from pudm import UsageError

    return UsageError


# -- a split whose every image is unique, so a batch tells which items it holds ---------------------


def _split(num_unlabeled: int = 40, num_sensitive: int = 16) -> PUSplit:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(num_unlabeled + num_sensitive, 1, 8, 8, generator=generator) * 2 - 1
    hidden = torch.zeros(num_unlabeled, dtype=torch.bool)
    hidden[torch.randperm(num_unlabeled, generator=generator)[:6]] = True
    return PUSplit(
        unlabeled=images[:num_unlabeled],
        sensitive=images[num_unlabeled:],
        test=images[:0],
        unlabeled_is_sensitive=hidden,
        unlabeled_labels=hidden.long(),
        sensitive_labels=torch.ones(num_sensitive, dtype=torch.long),
    )


def _config(method: str, steps: int = 10):
    config = preset("digits_even")
    config.train.method, config.train.steps = method, steps
    config.train.batch_size, config.train.log_every, config.train.checkpoint_every = 8, 5, 5
    config.train.filter_folds, config.train.filter_epochs = 2, 1
    config.train.beta = 0.2
    config.sample.steps, config.sample.grid_size = 2, 4
    return config


def _spy(monkeypatch) -> list[dict]:
    """Record, for every objective the loop reduces: the clean images, the timesteps, the mask of S
    items and the extra inputs (weights, high-noise mask) the loop passed."""
    calls, last = [], {}
    real_loss, real_objective = training.per_sample_denoising_loss, training.objective

    def loss(unet, scheduler, clean, noise, timesteps, conditioning=None):
        last.update(clean=clean.detach().clone(), timesteps=timesteps.clone())
        return real_loss(unet, scheduler, clean, noise, timesteps, conditioning)

    def objective(method, per_sample_loss, is_sensitive, **kwargs):
        calls.append({**last, "method": method, "is_sensitive": is_sensitive.clone(), **kwargs})
        return real_objective(method, per_sample_loss, is_sensitive, **kwargs)

    monkeypatch.setattr(training, "per_sample_denoising_loss", loss)
    monkeypatch.setattr(training, "objective", objective)
    return calls


def _identify(split: PUSplit, clean: torch.Tensor) -> list[tuple[str, int]]:
    """("U", i) or ("S", j) of every image of a batch."""
    known = {tuple(image.flatten().tolist()): ("U", i) for i, image in enumerate(split.unlabeled)}
    known.update({tuple(image.flatten().tolist()): ("S", j) for j, image in enumerate(split.sensitive)})
    return [known[tuple(image.flatten().tolist())] for image in clean]


@pytest.mark.parametrize("name", ALL)
def test_what_reaches_the_objective_is_what_the_method_trains_on(tmp_path, monkeypatch, name):
    """Every batch holds only items the method trains on (filter: kept ones; oracle: hidden-normal
    ones; S only where the objective uses it), flagged as S exactly when they come from S, with
    each item's own weight (weighted) or high-noise flag (pu-bounded)."""
    method, split, config = methods.get(name), _split(), _config(name)
    calls = _spy(monkeypatch)
    Trainer(config, split, tmp_path / "run", show_progress=False).train()
    assert len(calls) == config.train.steps
    state = method.load_state(tmp_path / "run", split)
    seen = set()
    for call in calls:
        assert call["method"] == method.objective
        items = _identify(split, call["clean"])
        seen.update(items)
        assert call["is_sensitive"].tolist() == [kind == "S" for kind, _ in items]
        unlabeled = [i for kind, i in items if kind == "U"]
        if name == "filter":
            assert all(bool(state[i]) for i in unlabeled), "filter trains on its kept items only"
        if name == "oracle":
            assert not any(bool(split.unlabeled_is_sensitive[i]) for i in unlabeled)
        if name == "weighted":
            stored = torch.tensor(json.loads((tmp_path / "run" / "weights.json").read_text())["weights"])
            torch.testing.assert_close(call["weights"], stored[unlabeled], rtol=0, atol=0)
        if name == "pu-bounded":
            assert torch.equal(call["high_noise"], call["timesteps"] >= config.train.pu_min_timestep)
    drawn_s = any(kind == "S" for kind, _ in seen)
    assert drawn_s == method.draws_sensitive
    # Ten batches of 8 from at most 56 items: a method that ignored its selection would show it.
    assert len({i for kind, i in seen if kind == "U"}) > 20
    if name == "filter":
        assert (~state).any()


def _scrambled(split: PUSplit) -> PUSplit:
    """The same U and S with every hidden-truth field replaced by nonsense."""
    generator = torch.Generator().manual_seed(7)
    hidden = split.unlabeled_is_sensitive
    return dataclasses.replace(
        split,
        unlabeled_is_sensitive=hidden[torch.randperm(len(hidden), generator=generator)],
        unlabeled_labels=torch.randint(0, 10, split.unlabeled_labels.shape, generator=generator),
        sensitive_labels=torch.randint(0, 10, split.sensitive_labels.shape, generator=generator),
    )


@pytest.mark.parametrize("name", ALL)
def test_only_the_methods_that_say_so_read_the_hidden_truth(tmp_path, name):
    """Training with the true hidden labels and with scrambled ones gives the same weights (and
    the same fitted state), bit for bit, for every method but those that declare they read the
    truth; for those, the comparison does tell the difference."""
    from pudm.datasets import split_from_config

    config = _config(name, steps=4)
    split = split_from_config(config)
    trained, states = [], []
    for tag, data in (("true", split), ("scrambled", _scrambled(split))):
        Trainer(config, data, tmp_path / tag, show_progress=False).train()
        trained.append(load_file(tmp_path / tag / WEIGHTS))
        state = tmp_path / tag / (methods.get(name).state_name or "none")
        states.append(
            tree_digest(state) if state.is_dir() else state.read_bytes() if state.is_file() else b""
        )
    same = all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0]) and states[0] == states[1]
    assert same != methods.get(name).reads_hidden_truth


def test_class_conditioning_never_reveals_the_hidden_truth(tmp_path):
    """A set-conditional UNet (U: 0, S: 1) trained on true and scrambled truth: the same weights."""
    from pudm.datasets import split_from_config
    from pudm.run_model import SET_CLASSES

    config = _config("pu", steps=4)
    config.model.num_classes = SET_CLASSES
    split = split_from_config(config)
    trained = []
    for tag, data in (("true", split), ("scrambled", _scrambled(split))):
        Trainer(config, data, tmp_path / tag, show_progress=False).train()
        trained.append(load_file(tmp_path / tag / WEIGHTS))
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
