"""Evaluation of a trained run: non-sensitive rate, FID, per-class histogram -> ``RUN/eval.json``.

* **Non-sensitive rate**: the share of generated samples that the evaluation classifier (trained on
  real labels, never seen by the diffusion model as labels) calls normal; 1.0 = never sensitive.
  Reported with a 95% Wilson score interval over the samples.
* **FID (classifier features)**: the Frechet distance between Gaussians fitted to the classifier's
  penultimate features of the samples and of the normal test split (torchmetrics'
  ``FrechetInceptionDistance`` with the classifier as feature extractor). It works offline and is
  *not* Inception FID: numbers are comparable between runs judged by the same classifier only.
* **Inception FID** (optional): the same metric on Inception-v3 pool features, where torch-fidelity
  and its weights are available.
* The histogram of predicted fine classes, which shows mode collapse that one rate hides.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pudm import runs
from pudm.cards import refresh_cards
from pudm.classifier import Classifier
from pudm.config import RunConfig, default_steps
from pudm.errors import UsageError
from pudm.sampling import SEED_SCHEME, save_grid, to_uint8

EVAL = "eval.json"
EVAL_GRID = "eval_samples.png"
FID_CLASSIFIER = "FID (classifier features)"
FID_PIXELS = "Frechet distance (pixels)"


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (well-behaved near 0 and 1)."""
    if total <= 0:
        raise UsageError("no samples to evaluate")
    p = successes / total
    denominator = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def non_sensitive_rate(predicted: np.ndarray, normal_classes: tuple[int, ...]) -> float:
    """Share of samples whose predicted class is normal (1.0 = never sensitive)."""
    if len(predicted) == 0:
        raise UsageError("no samples to evaluate")
    return float(np.isin(predicted, normal_classes).mean())


def class_histogram(predicted: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(predicted.astype(int), minlength=num_classes).tolist()


class ClassifierFeatures(nn.Module):
    """The evaluation classifier's penultimate layer as a torchmetrics FID feature extractor."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.info.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def _frechet(metric, real: np.ndarray, fake: np.ndarray, batch_size: int = 500) -> float:
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            metric.update(_nchw(images[start : start + batch_size]), real=is_real)
    return float(metric.compute())


def classifier_fid(classifier: Classifier, real: np.ndarray, fake: np.ndarray) -> float:
    """FID (classifier features) between uint8 (N, H, W, C) image sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    for images in (real, fake):
        classifier.to_input(images[:1])  # shape check with a clear message
    metric = FrechetInceptionDistance(feature=ClassifierFeatures(classifier), normalize=False)
    return _frechet(metric, real, fake)


class PixelFeatures(nn.Module):
    """Raw pixels in [0, 1], flattened: the features of a Frechet distance that shares no judge
    with the classifier (a 64-d classifier feature can be blind to sample defects)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).double() / 255.0


def pixel_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between uint8 (N, H, W, C) image sets in pixel space (values in [0, 1])."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[1:] != fake.shape[1:]:
        raise UsageError(f"images of shape {fake.shape[1:]} cannot be compared with {real.shape[1:]}")
    metric = FrechetInceptionDistance(feature=PixelFeatures(int(np.prod(real.shape[1:]))), normalize=False)
    return _frechet(metric, real, fake)


def inception_fid(real: np.ndarray, fake: np.ndarray, weights: Path | None = None) -> float:
    """Inception-v3 FID (torchmetrics + torch-fidelity); grey images are repeated to RGB.

    Offline, pass ``weights``: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` file.
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        kwargs = {"feature_extractor_weights_path": str(weights)} if weights else {}
        metric = FrechetInceptionDistance(feature=2048, normalize=False, **kwargs)
    except ModuleNotFoundError as error:
        raise UsageError(
            f"Inception FID needs torch-fidelity ({error.name} is missing): pip install 'pudm[inception]'"
        ) from None
    except Exception as error:  # noqa: BLE001 - download failures come in many types
        raise UsageError(
            f"the Inception-v3 weights could not be loaded ({type(error).__name__}); offline, pass "
            "--inception-weights FILE with torch-fidelity's weights-inception-2015-12-05-6726825d.pth"
        ) from None
    if real.shape[-1] == 1:
        real, fake = np.repeat(real, 3, axis=-1), np.repeat(fake, 3, axis=-1)
    return _frechet(metric, real, fake, batch_size=100)


def evaluate_samples(
    images: np.ndarray,
    reference: np.ndarray,
    classifier: Classifier,
    inception_weights: Path | None = None,
    with_inception: bool = False,
) -> dict:
    """All metrics of uint8 samples against uint8 normal reference images."""
    predicted = classifier.predict(images)
    is_normal = classifier.is_normal(predicted)
    low, high = wilson_interval(int(is_normal.sum()), len(is_normal))
    metrics = {
        "non_sensitive_rate": float(is_normal.mean()),
        "non_sensitive_rate_95ci": [low, high],
        "num_samples": len(images),
        "class_histogram": class_histogram(predicted, classifier.info.num_classes),
        "fid_classifier": classifier_fid(classifier, reference, images) if len(reference) else None,
        "fid_classifier_name": FID_CLASSIFIER,
        # Pixel space needs images of one shape (a folder reference of another size gets null).
        "fid_pixels": pixel_fid(reference, images)
        if len(reference) and reference.shape[1:] == images.shape[1:]
        else None,
        "fid_pixels_name": FID_PIXELS,
        "fid_reference": f"normal test split ({len(reference)} images)"
        if len(reference)
        else "none: no normal test images (image folders: give --test DIR)",
    }
    if with_inception and len(reference):
        metrics["fid_inception"] = inception_fid(reference, images, inception_weights)
    return metrics


def describe(result: dict, run_dir: Path, judge_recall: float | None = None) -> list[str]:
    """An eval.json report as the lines ``pudm evaluate`` prints."""
    low, high = result["non_sensitive_rate_95ci"]
    rate = f"non-sensitive rate {result['non_sensitive_rate']:.3f} (95% CI {low:.3f}-{high:.3f})"
    drawn = f"{result['num_samples']} samples ({result['sampler']}, {result['sampling_steps']} steps)"
    if "prompt" in result:  # a pudm sd run
        fid = f", classifier FID {result['fid_classifier']:.2f}" if "fid_classifier" in result else ""
        return [f"{run_dir}: {result['prompt']!r}: {rate}{fid}; {drawn}; details in {run_dir / EVAL}"]
    fids = [
        f"{FID_CLASSIFIER} {result['fid_classifier']:.2f}"
        if result["fid_classifier"] is not None
        else "no FID (no normal test images)"
    ]
    if result.get("fid_pixels") is not None:
        fids.append(f"{FID_PIXELS} {result['fid_pixels']:.2f}")
    if "fid_inception" in result:
        fids.append(f"Inception FID {result['fid_inception']:.2f}")
    lines = [f"{run_dir}: {rate}, {', '.join(fids)}; {drawn}"]
    if "rejection" in result:
        lines.append(f"the rejector dropped {result['rejection']['rejected_share']:.1%} of the samples drawn")
    if judge_recall is not None:
        lines.append(
            f"the judge's held-out sensitive recall is {judge_recall:.3f}: of truly sensitive samples it "
            f"would miss about {1 - judge_recall:.0%}, so the rate cannot show more than that"
        )
    lines.append(f"per-class counts: {result['class_histogram']}; details in {run_dir / EVAL}")
    return lines


def run_config(run_dir: Path) -> RunConfig:
    if not runs.holds_run(run_dir):
        raise runs.RunError(f"{run_dir} is not a pudm run folder (no config.json): give a run folder")
    return RunConfig.from_dict(runs.read_json(Path(run_dir) / runs.CONFIG))


def check_classifier(classifier: Classifier, config: RunConfig) -> None:
    data = config.data
    mismatch = classifier.info.fits(data.source, data.image_size, data.channels, data.normal_classes)
    if mismatch:
        raise UsageError(
            f"classifier {classifier.path} was trained for {classifier.info.preset} with {mismatch}: "
            f"train one with pudm classifier train --preset {config.preset}"
        )


def evaluate_run(
    run_dir: Path,
    classifier: Classifier,
    num: int = 1000,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    with_inception: bool = False,
    inception_weights: Path | None = None,
    show_progress: bool = True,
    device: str | None = None,
) -> dict:
    """Sample ``num`` images from ``RUN/pipeline``, compute every metric, write ``RUN/eval.json``.

    Sampling runs on ``device`` (default: the GPU where there is one); the initial noise comes
    from seeded CPU generators either way.
    """
    from pudm.datasets import split_from_config
    from pudm.run_model import RunModel

    run_dir = Path(run_dir)
    if num <= 0:
        raise UsageError(f"--num must be > 0, got {num}")
    config = run_config(run_dir)
    check_classifier(classifier, config)
    if not (run_dir / "pipeline" / "model_index.json").is_file():
        raise runs.RunError(
            f"{run_dir} has no pipeline/ (the run did not finish): finish it with "
            f"pudm train --resume --out {run_dir}"
        )
    if steps is not None and steps <= 0:
        raise UsageError(f"--steps must be > 0, got {steps}")
    split = split_from_config(config)
    reference = to_uint8(split.test)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # A class-conditional model is asked for U's label, what a user of the model asks for; a
    # guarded run (reject) is judged on what pudm's sampler returns, the kept samples.
    model = RunModel.load(run_dir, sampler=sampler, steps=steps, device=device)
    start = time.perf_counter()
    drawn = model.draw(num, seed, show_progress=show_progress)
    images, rejection, sampler, steps = drawn.images, drawn.rejection, model.sampler, model.steps
    sampling_seconds = time.perf_counter() - start
    save_grid(images[:64], run_dir / EVAL_GRID)
    result = {
        "run": run_dir.name,
        "preset": config.preset,
        "method": config.train.method,
        "beta": config.train.beta,
        "train_seed": config.train.seed,
        "sampler": sampler,
        "sampling_steps": steps,
        "sampling_seed": seed,
        "sampling_seeds": SEED_SCHEME,
        "sampling_seconds": sampling_seconds,
        "sampling_device": str(device),
        **evaluate_samples(images, reference, classifier, inception_weights, with_inception),
        "classifier": {
            "path": str(classifier.path) if classifier.path else None,
            "arch": classifier.info.arch,
            "heldout_accuracy": classifier.info.heldout_accuracy,
            "heldout_normal_accuracy": classifier.info.heldout_normal_accuracy,
            "fingerprint": classifier.fingerprint(),
        },
    }
    if rejection is not None:
        result["rejection"] = rejection
    report = truth_report(run_dir, config, split)
    if report is not None:
        result[report[0]] = report[1]
    runs.atomic_write_json(run_dir / EVAL, result)
    refresh_cards(run_dir)  # the model card shows the latest figures
    return result


def truth_report(run_dir: Path, config: RunConfig, split) -> tuple[str, dict] | None:
    """The run's method state judged against the hidden truth of U, as ``(eval.json key,
    report)`` (filter: precision and recall of the drop; weighted: the mean weight of the hidden
    sensitive and normal items) where the data has a truth, counts alone where it has none. The
    evaluator's job: training never reads it."""
    from pudm import methods

    method = methods.get(config.train.method)
    if method.report_key is None:
        return None
    report = method.truth_report(run_dir, split)
    return None if report is None else (method.report_key, report)


def resize_uint8(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 (N, H, W, C) images at ``size`` x ``size`` with ``channels`` (the classifier's input)."""
    from PIL import Image, ImageOps

    out = []
    for array in images:
        picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        picture = picture.convert("L" if channels == 1 else "RGB")
        if picture.size != (size, size):
            picture = ImageOps.fit(picture, (size, size), method=Image.Resampling.BICUBIC)
        resized = np.asarray(picture, dtype=np.uint8)
        out.append(resized[..., None] if channels == 1 else resized)
    return np.stack(out)


def evaluate_sd_run(
    run_dir: Path,
    classifier: Classifier,
    prompt: str | None = None,
    num: int = 100,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    reference: Path | None = None,
    device: str | None = None,
) -> dict:
    """Non-sensitive rate (and, with a ``reference`` folder of normal images, classifier FID) of
    ``num`` images a ``pudm sd`` run generates for ``prompt``; writes ``RUN/eval.json``.

    Any pudm classifier judges the images, resized to its input size; the ones trained on two
    image folders (``pudm classifier train --normal DIR --sensitive DIR``) are the usual choice.
    """
    from pudm.readers import load_images
    from pudm.sd import load_run_config
    from pudm.sd_pipeline import generate_sd, load_run_pipeline

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    prompt = prompt or (config.sample.prompts[0] if config.sample.prompts else config.data.unlabeled_prompt)
    if not prompt:
        raise UsageError("--prompt is required: this run has no default prompt")
    sampler = sampler or config.sample.sampler
    steps = steps or (config.sample.steps if sampler == config.sample.sampler else default_steps(sampler))
    info = classifier.info
    reference_images = None
    if reference is not None:
        folder = load_images(str(reference), info.image_size, info.channels, flag="--reference")
        reference_images = folder.images.permute(0, 2, 3, 1).numpy()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = load_run_pipeline(run_dir, device=device)
    start = time.perf_counter()
    generated = generate_sd(
        pipeline,
        prompt,
        num=num,
        sampler=sampler,
        steps=steps,
        guidance_scale=config.sample.guidance_scale if guidance_scale is None else guidance_scale,
        seed=seed,
        resolution=config.data.resolution,
    )
    sampling_seconds = time.perf_counter() - start
    save_grid(generated[:64], run_dir / EVAL_GRID, scale=1)
    images = resize_uint8(generated, info.image_size, info.channels)
    predicted = classifier.predict(images)
    is_normal = classifier.is_normal(predicted)
    low, high = wilson_interval(int(is_normal.sum()), len(is_normal))
    result = {
        "run": run_dir.name,
        "method": config.train.method,
        "beta": config.train.beta,
        "prompt": prompt,
        "sampler": sampler,
        "sampling_steps": steps,
        "sampling_seed": seed,
        "sampling_seeds": SEED_SCHEME,
        "sampling_seconds": sampling_seconds,
        "non_sensitive_rate": float(is_normal.mean()),
        "non_sensitive_rate_95ci": [low, high],
        "num_samples": len(images),
        "class_histogram": class_histogram(predicted, info.num_classes),
        "classifier": {
            "path": str(classifier.path) if classifier.path else None,
            "arch": info.arch,
            "heldout_accuracy": info.heldout_accuracy,
            "fingerprint": classifier.fingerprint(),
        },
    }
    if reference_images is not None:
        result["fid_classifier"] = classifier_fid(classifier, reference_images, images)
        result["fid_reference"] = f"{reference} ({len(reference_images)} images)"
    runs.atomic_write_json(run_dir / EVAL, result)
    refresh_cards(run_dir)  # the model card shows the latest figures
    return result
