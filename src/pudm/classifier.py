"""Image classifiers: the evaluation classifier and the S-vs-U classifier of the ``filter`` baseline.

Two architectures, one interface (``features(x)`` gives the penultimate activations, ``forward(x)``
the logits):

* ``cnn``: three 3x3 convolutions and a 64-d feature layer, for small images (digits, 8-32 px).
* ``resnet18`` / ``resnet34``: torchvision's ResNet, trained from scratch offline or started from
  ImageNet weights the user has on disk; for 32-96 px images the first convolution is 3x3 stride 1
  and the max-pool is dropped (the usual CIFAR variant). The paper uses a fine-tuned ResNet-34.

A saved classifier is a folder ``model.safetensors`` + ``config.json``; the config records the data
it was trained for (source, image size, channels, normal classes), so an evaluation can refuse a
classifier trained for another preset.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pudm import runs
from pudm.errors import UsageError

ARCHITECTURES = ("cnn", "resnet18", "resnet34")
CLASSIFIER_KIND = "pudm-classifier"


class SmallCNN(nn.Module):
    """conv(32) - conv(64) - pool - conv(128) - global average - linear(64) features - logits."""

    def __init__(self, channels: int, num_classes: int, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, feature_dim),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class ResNetClassifier(nn.Module):
    """torchvision ResNet with a separate head, so its 512-d pooled features are reachable."""

    def __init__(self, arch: str, channels: int, num_classes: int, image_size: int):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        if image_size <= 96:
            net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net
        self.channels = channels
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(arch: str, channels: int, num_classes: int, image_size: int) -> nn.Module:
    if arch == "cnn":
        return SmallCNN(channels, num_classes)
    if arch in ("resnet18", "resnet34"):
        return ResNetClassifier(arch, channels, num_classes, image_size)
    raise UsageError(f"unknown classifier architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def load_backbone_weights(model: nn.Module, path: Path) -> None:
    """Start a ResNet from ImageNet weights on disk (safetensors, or a torch state dict loaded with
    ``weights_only=True``); the first convolution and the classification layer are not copied when
    their shapes differ (the small-image stem, another number of classes)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--weights {path} does not exist: give the path of a ResNet state dict file")
    if not isinstance(model, ResNetClassifier):
        raise UsageError("--weights applies to resnet18/resnet34 only: drop it or choose --arch resnet34")
    try:
        state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same answer
        raise UsageError(f"--weights {path} is not a readable state dict ({error}): check the file") from None
    own = model.net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < len(own) // 2:
        raise UsageError(f"--weights {path} does not match a {type(model.net).__name__}: check the file")
    model.net.load_state_dict(usable, strict=False)


@dataclass
class FitConfig:
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    shift: int = 1  # random translation (pixels) as augmentation; 0 for none


def _augment(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    if shift <= 0:
        return images
    padded = F.pad(images, (shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()
    size = images.shape[-1]
    return padded[..., dy : dy + size, dx : dx + size]


def fit(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: FitConfig,
    class_weights: torch.Tensor | None = None,
) -> nn.Module:
    """Plain supervised training: AdamW, cosine schedule, cross-entropy, seeded batches."""
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = max(1, math.ceil(len(images) / config.batch_size))
    total = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=total)
    model.train()
    # Dropout draws from the global generator: seed it here (and leave the caller's state alone),
    # so the same config gives the same model whatever ran before in the process.
    devices = [images.device.index or 0] if images.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        for _ in range(config.epochs):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), config.batch_size):
                index = order[start : start + config.batch_size]
                if len(index) < 2:  # batch norm needs two samples
                    continue
                batch = _augment(images[index], config.shift, generator)
                loss = F.cross_entropy(model(batch), labels[index], weight=class_weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return model.eval()


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat(
        [model(images[i : i + batch_size]).softmax(-1) for i in range(0, len(images), batch_size)]
    )


def stratified_holdout(labels: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held out): ``share`` of every class held out, seeded."""
    generator = torch.Generator().manual_seed(seed)
    train, held = [], []
    for value in labels.unique():
        members = torch.nonzero(labels == value).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = max(1, round(share * len(members)))
        held.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


@dataclass
class ClassifierInfo:
    """What a saved classifier is and what data it was trained for."""

    arch: str
    num_classes: int
    channels: int
    image_size: int
    feature_dim: int
    source: str
    normal_classes: tuple[int, ...]
    preset: str
    heldout_accuracy: float
    heldout_normal_accuracy: float
    num_train: int
    num_heldout: int
    epochs: int
    seed: int
    # Held-out recall of every class, and the share of held-out sensitive items called sensitive:
    # a judge that misses sensitive items caps the non-sensitive rate it can report.
    heldout_class_recall: tuple[float, ...] = ()
    heldout_sensitive_recall: float | None = None

    def fits(self, source: str, image_size: int, channels: int, normal_classes) -> str | None:
        """None if the classifier can judge that data; otherwise what differs."""
        wanted = {"source": source, "image_size": image_size, "channels": channels}
        for name, value in wanted.items():
            if getattr(self, name) != value:
                return f"{name} {getattr(self, name)} (the data has {value})"
        if tuple(self.normal_classes) != tuple(normal_classes):
            return f"normal classes {list(self.normal_classes)} (the data has {list(normal_classes)})"
        return None

    def describe(self) -> list[str]:
        """What ``pudm classifier train`` prints: held-out accuracy, recall and per-class recall."""
        recall = (
            f", sensitive recall {self.heldout_sensitive_recall:.3f}"
            if self.heldout_sensitive_recall is not None
            else ""
        )
        lines = [
            f"classifier {self.arch} for {self.preset}: held-out accuracy {self.heldout_accuracy:.3f} "
            f"(normal vs sensitive {self.heldout_normal_accuracy:.3f}{recall}) on {self.num_heldout} images"
        ]
        if self.heldout_class_recall:
            recalls = ", ".join(f"{c}: {r:.3f}" for c, r in enumerate(self.heldout_class_recall))
            lines.append(f"per-class recall: {recalls}")
        return lines


class Classifier:
    """A trained classifier with its description: predicts classes and gives features of uint8 images."""

    def __init__(self, model: nn.Module, info: ClassifierInfo, path: Path | None = None):
        self.model = model.eval()
        self.info = info
        self.path = path

    def to_input(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1], the training range."""
        if images.ndim != 4 or images.shape[1:] != (
            self.info.image_size,
            self.info.image_size,
            self.info.channels,
        ):
            raise UsageError(
                f"images of shape {tuple(images.shape[1:])} do not fit a classifier for "
                f"{self.info.image_size}x{self.info.image_size}x{self.info.channels}: "
                "use a classifier trained for this data"
            )
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def predict(self, images: np.ndarray) -> np.ndarray:
        return predict_proba(self.model, self.to_input(images)).argmax(-1).numpy()

    def is_normal(self, predicted: np.ndarray) -> np.ndarray:
        return np.isin(predicted, self.info.normal_classes)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of uint8 (N, C, H, W) tensors (the torchmetrics FID convention)."""
        return self.model.features(images.float() / 127.5 - 1.0)

    def save(self, path: Path) -> None:
        def write(tmp: Path) -> None:
            save_file(
                {k: v.contiguous() for k, v in self.model.state_dict().items()}, tmp / "model.safetensors"
            )
            (tmp / "config.json").write_text(
                json.dumps({"kind": CLASSIFIER_KIND, **asdict(self.info)}, indent=2), encoding="utf-8"
            )

        runs.atomic_write_dir(Path(path), write)
        self.path = Path(path)

    @classmethod
    def load(cls, path: Path) -> Classifier:
        path = Path(path)
        config_file, weights = path / "config.json", path / "model.safetensors"
        if not config_file.is_file() or not weights.is_file():
            raise UsageError(
                f"--classifier {path} is not a pudm classifier folder (config.json + model.safetensors): "
                "train one with pudm classifier train"
            )
        values = runs.read_json(config_file)
        if values.pop("kind", None) != CLASSIFIER_KIND:
            raise UsageError(f"--classifier {path}: config.json is not a pudm classifier's: check the path")
        try:
            values["normal_classes"] = tuple(values["normal_classes"])
            values["heldout_class_recall"] = tuple(values.get("heldout_class_recall", ()))
            info = ClassifierInfo(**values)
            model = build_classifier(info.arch, info.channels, info.num_classes, info.image_size)
            model.load_state_dict(load_file(weights))
        except Exception as error:  # noqa: BLE001 - a damaged folder gets one answer
            raise UsageError(
                f"--classifier {path} could not be loaded ({type(error).__name__}): train it again"
            ) from None
        return cls(model, info, path)

    def fingerprint(self) -> str:
        """Short hash of the weights: eval.json records which classifier judged the samples."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    arch: str,
    source: str,
    normal_classes: tuple[int, ...],
    preset: str,
    fit_config: FitConfig,
    holdout: float = 0.2,
    weights: Path | None = None,
) -> Classifier:
    """Fit on all but a stratified ``holdout`` share of the labeled data; report accuracy on it."""
    num_classes = int(labels.max()) + 1
    channels, image_size = images.shape[1], images.shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fit_config.seed)
        model = build_classifier(arch, channels, num_classes, image_size)
    if weights is not None:
        load_backbone_weights(model, weights)
    train_index, held_index = stratified_holdout(labels, holdout, fit_config.seed)
    fit(model, images[train_index], labels[train_index], fit_config)
    predicted = predict_proba(model, images[held_index]).argmax(-1)
    truth = labels[held_index]
    normal = torch.tensor(normal_classes)
    class_recall = tuple(
        float((predicted[truth == c] == c).float().mean()) if (truth == c).any() else float("nan")
        for c in range(num_classes)
    )
    held_sensitive = ~torch.isin(truth, normal)
    sensitive_recall = (
        float((~torch.isin(predicted[held_sensitive], normal)).float().mean())
        if held_sensitive.any()
        else None
    )
    info = ClassifierInfo(
        arch=arch,
        num_classes=num_classes,
        channels=channels,
        image_size=image_size,
        feature_dim=model.feature_dim,
        source=source,
        normal_classes=tuple(normal_classes),
        preset=preset,
        heldout_accuracy=float((predicted == truth).float().mean()),
        heldout_normal_accuracy=float(
            (torch.isin(predicted, normal) == torch.isin(truth, normal)).float().mean()
        ),
        num_train=len(train_index),
        num_heldout=len(held_index),
        epochs=fit_config.epochs,
        seed=fit_config.seed,
        heldout_class_recall=class_recall,
        heldout_sensitive_recall=sensitive_recall,
    )
    return Classifier(model, info)


def train_for_config(
    config, arch: str = "cnn", fit_config: FitConfig | None = None, weights: Path | None = None
) -> Classifier:
    """The evaluation classifier of a run configuration's data: every labeled image of its source
    (at the run's image size and channels), a stratified 20% held out to report accuracy."""
    from pudm.datasets import load_source

    data = config.data
    if data.source == "folders":
        raise UsageError(
            "image folders have no class labels: train a folder classifier with "
            "pudm classifier train --normal DIR --sensitive DIR"
        )
    source = load_source(data.source, data.image_size, data.channels, data.data_dir, data.download)
    # Large sources: a seeded random subset of about 1 GiB of float32 images.
    limit = max(1000, (1 << 28) // (data.channels * data.image_size**2))
    images, labels = source.all_images(limit=limit, seed=(fit_config or FitConfig()).seed)
    return train_classifier(
        images,
        labels,
        arch=arch,
        source=data.source,
        normal_classes=tuple(data.normal_classes),
        preset=config.preset,
        fit_config=fit_config or FitConfig(),
        weights=weights,
    )
