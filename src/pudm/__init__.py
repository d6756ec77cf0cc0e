"""pudm: positive-unlabeled diffusion models.

Train or fine-tune a diffusion model on unlabeled data U that secretly holds some sensitive items,
plus a small labeled sensitive set S, so that it generates normal data only (Takahashi et al.,
ICLR 2025).
"""

from pudm.api import (
    Run,
    benchmark,
    customize,
    estimate_beta,
    evaluate,
    load_config,
    preset,
    read_config_file,
    resume_config,
    sample,
    sd_config,
    train,
    train_classifier,
    train_sd,
)
from pudm.audit import audit
from pudm.errors import UsageError
from pudm.objectives import CrossProcessSum, ObjectiveOutput, objective, sensitive_score

__version__ = "0.1.0"
__all__ = [
    "CrossProcessSum",
    "ObjectiveOutput",
    "Run",
    "UsageError",
    "__version__",
    "audit",
    "benchmark",
    "estimate_beta",
    "customize",
    "evaluate",
    "load_config",
    "read_config_file",
    "objective",
    "preset",
    "resume_config",
    "sample",
    "sd_config",
    "sensitive_score",
    "train",
    "train_classifier",
    "train_sd",
]
