"""Quick evaluation: how often generated samples are sensitive, by an independent classifier.

The classifier never touches the diffusion model: for digits it is an RBF support-vector machine
fitted on the real labels of scikit-learn's digits (about 99% accurate in cross-validation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class DigitsClassifier:
    """A 10-class digit classifier on 8x8 grey images with values 0..16."""

    model: object
    cv_accuracy: float

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class labels of uint8 images (N, H, W, C): grey-scaled and resized to 8x8 first."""
        return self.model.predict(to_digits_features(images))


def to_digits_features(images: np.ndarray) -> np.ndarray:
    grey = torch.from_numpy(images).float().mean(-1)[:, None] / 255.0
    if grey.shape[-1] != 8 or grey.shape[-2] != 8:
        grey = F.interpolate(grey, size=(8, 8), mode="area")
    return (grey[:, 0] * 16.0).reshape(len(grey), 64).numpy()


def fit_digits_classifier(seed: int = 0) -> DigitsClassifier:
    """Fit the SVC on all 1,797 labeled digits; report 5-fold cross-validated accuracy."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import SVC

    digits = load_digits()
    model = SVC(gamma=0.001, C=10.0, random_state=seed)
    accuracy = float(cross_val_score(model, digits.data, digits.target, cv=5).mean())
    model.fit(digits.data, digits.target)
    return DigitsClassifier(model=model, cv_accuracy=accuracy)


def non_sensitive_rate(predicted: np.ndarray, normal_classes: tuple[int, ...]) -> float:
    """Share of samples whose predicted class is normal (1.0 = never sensitive)."""
    if len(predicted) == 0:
        raise ValueError("no samples to evaluate")
    return float(np.isin(predicted, normal_classes).mean())


def class_histogram(predicted: np.ndarray, num_classes: int = 10) -> list[int]:
    return np.bincount(predicted.astype(int), minlength=num_classes).tolist()
