"""Model cards: a README.md in every saved pipeline (and Stable Diffusion LoRA folder).

Made with huggingface_hub's :class:`~huggingface_hub.ModelCard`: YAML metadata the Hub reads
(library, tags, base model, pipeline tag), then what the model is: method, beta and how it was
chosen, the sizes of U and S, the training steps, the latest ``eval.json`` figures when they
exist, and the limitation every pudm model has. The hidden truth of a labeled split (how many
items of U are sensitive) is never written into a card: it is for the evaluator alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pudm import methods
from pudm.errors import UsageError

CARD = "README.md"

LIMITATION = (
    "Generation of the sensitive data is **suppressed and measured, not proven impossible**. The "
    "non-sensitive rate below is the share of samples an independent classifier calls normal; that "
    "classifier misses some sensitive items, and other prompts, samplers or seeds may draw what it "
    "did not see. Do not rely on this model where a single sensitive sample is unacceptable."
)


def _beta_line(train: dict[str, Any]) -> str:
    if not methods.get(train["method"]).uses_beta:
        return "not used by this method"
    estimate = train.get("beta_estimate")
    if estimate:
        return (
            f"{train['beta']:.3f}, estimated from U and S ({estimate.get('method', 'BBE')}; 95% interval "
            f"{estimate.get('low', float('nan')):.3f}-{estimate.get('high', float('nan')):.3f})"
        )
    return f"{train['beta']} (given)"


def _evaluation_lines(evaluation: dict[str, Any] | None) -> list[str]:
    if not evaluation:
        return [
            "Not evaluated yet: `pudm evaluate RUN --classifier CLF` writes eval.json and updates this card."
        ]
    low, high = evaluation["non_sensitive_rate_95ci"]
    rows = [
        ("non-sensitive rate", f"{evaluation['non_sensitive_rate']:.3f} (95% CI {low:.3f}-{high:.3f})"),
        (
            "samples",
            f"{evaluation['num_samples']} ({evaluation['sampler']}, {evaluation['sampling_steps']} steps)",
        ),
    ]
    for key, name in (
        ("fid_classifier", "FID (classifier features)"),
        ("fid_pixels", "Frechet distance (pixels)"),
        ("fid_inception", "Inception FID"),
    ):
        if evaluation.get(key) is not None:
            rows.append((name, f"{evaluation[key]:.2f}"))
    if evaluation.get("prompt"):
        rows.append(("prompt", repr(evaluation["prompt"])))
    lines = ["From the run's `eval.json`:", "", "| measure | value |", "|---|---|"]
    return lines + [f"| {name} | {value} |" for name, value in rows]


def _audit_lines(audit: dict[str, Any] | None) -> list[str]:
    if not audit:
        return [
            "Not audited yet: `pudm audit RUN` estimates from U and S alone how many samples look like S."
        ]
    if audit.get("sensitive_share") is None:
        return [f"Audited without labels (`pudm audit`): no estimate ({audit['warnings'][0]})."]
    interval = audit.get("interval")
    said = "no interval" if interval is None else "95% interval [{:.1%}, {:.1%}]".format(*interval)
    line = (
        f"Audited without labels (`pudm audit`, from U and S alone): about {audit['sensitive_share']:.1%} of "
        f"{audit['num_samples']} samples look like S, {said}."
    )
    return [line, *(f"Warning: {warning}" for warning in audit.get("warnings", []))]


def model_card(
    config: dict[str, Any],
    data: dict[str, Any],
    evaluation: dict[str, Any] | None = None,
    audit: dict[str, Any] | None = None,
):
    """The card of a run: ``config`` as config.json holds it, ``data`` the sizes of U and S, and the
    latest ``eval.json`` and ``audit.json``."""
    from huggingface_hub import ModelCard, ModelCardData

    train, model = config["train"], config["model"]
    stable_diffusion = config.get("kind") == "sd"
    base = model.get("pretrained")
    method = train["method"]
    card_data = ModelCardData(
        library_name="diffusers",
        tags=["pudm", "positive-unlabeled", "diffusion", method]
        + (["lora"] if model.get("lora_rank") else []),
        base_model=base if base and not Path(base).exists() else None,
        pipeline_tag="text-to-image" if stable_diffusion else "unconditional-image-generation",
    )
    sizes = {
        "U (unlabeled, may hide sensitive items)": data.get("unlabeled"),
        "S (labeled sensitive)": data.get("sensitive"),
    }
    rows = [
        ("method", method),
        ("beta (share of sensitive items in U)", _beta_line(train)),
        *((name, value) for name, value in sizes.items() if value is not None),
        ("training steps", train["steps"]),
        ("batch size", train["batch_size"] * train.get("gradient_accumulation_steps", 1)),
        ("learning rate", train["learning_rate"]),
        ("base model", base or "none (trained from scratch)"),
    ]
    if not stable_diffusion:
        rows.insert(0, ("preset", config.get("preset")))
        rows.append(("prediction type", model.get("prediction_type")))
    if model.get("lora_rank"):
        rows.append(("LoRA rank", model["lora_rank"]))
    load = (
        'pipe = StableDiffusionPipeline.from_pretrained("BASE")\npipe.load_lora_weights("THIS_FOLDER")'
        if model.get("lora_rank")
        else 'pipe = DiffusionPipeline.from_pretrained("THIS_FOLDER")'
    )
    text = "\n".join(
        [
            f"# A pudm `{method}` diffusion model",
            "",
            "Trained with pudm (positive-unlabeled diffusion models) on unlabeled data U that may hide "
            "sensitive items, plus a small labeled set S of sensitive items, so that it generates "
            "normal data only.",
            "",
            "## Training",
            "",
            "| setting | value |",
            "|---|---|",
            *(f"| {name} | {value} |" for name, value in rows),
            "",
            "## Evaluation",
            "",
            *_evaluation_lines(evaluation),
            "",
            *_audit_lines(audit),
            "",
            "## Limitations",
            "",
            LIMITATION,
            *(["", note] if (note := methods.get(method).card_note) else []),
            "",
            "## Use",
            "",
            "```python",
            "from diffusers import DiffusionPipeline, StableDiffusionPipeline",
            load,
            "```",
            "",
        ]
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{text}")


def write_card(
    folder: Path, config: dict[str, Any], data: dict[str, Any], evaluation=None, audit=None
) -> None:
    """``folder/README.md``, via a temporary file."""
    path = Path(folder) / CARD
    tmp = path.with_name(f".{CARD}.tmp")
    tmp.write_text(str(model_card(config, data, evaluation, audit)), encoding="utf-8")
    tmp.replace(path)


def card_folders(run_dir: Path) -> list[Path]:
    """The saved model folders of a run that carry a card: pipeline/ and lora/."""
    return [run_dir / name for name in ("pipeline", "lora") if (run_dir / name).is_dir()]


def refresh_cards(run_dir: Path) -> None:
    """Rewrite the cards of a finished run from its config.json, summary.json, eval.json and
    audit.json."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.json").is_file():
        return
    config = json.loads((run_dir / "config.json").read_text())
    data = json.loads((run_dir / "summary.json").read_text()).get("data", {})
    evaluation, audit = (
        json.loads((run_dir / name).read_text()) if (run_dir / name).is_file() else None
        for name in ("eval.json", "audit.json")
    )
    for folder in card_folders(run_dir):
        write_card(folder, config, data, evaluation, audit)


def check_hub(repo_id: str) -> None:
    """``--push-to-hub``: the Hub is reachable and a token is there, checked before any training."""
    import os

    from huggingface_hub import HfApi

    where = f"--push-to-hub {repo_id}"
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UsageError(f"{where}: give a repository id of the form NAME/MODEL")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UsageError(
            f"{where}: the Hub is off here (HF_HUB_OFFLINE): drop the flag, upload the folder later"
        )
    try:
        HfApi().whoami()
    except Exception as error:  # no network, no token, a bad token: nothing has been trained yet
        raise UsageError(
            f"{where}: cannot use the Hub ({type(error).__name__}): log in (hf auth login) and check the "
            "connection, or drop the flag"
        ) from None


def push(run_dir: Path, repo_id: str) -> str:
    """Upload the run's saved model folder (pipeline/ or lora/, with its card) to ``repo_id``."""
    from huggingface_hub import HfApi

    folders = card_folders(Path(run_dir))
    if not folders:
        raise UsageError(f"--push-to-hub {repo_id}: {run_dir} has no saved model to upload")
    folder = folders[0]
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, private=True)  # a model of sensitive data: the owner opens it
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="pudm: upload the trained model")
    return f"https://huggingface.co/{repo_id}"
