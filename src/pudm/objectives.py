"""Training objectives for positive-unlabeled (PU) diffusion models.

Every objective here is a pure function of a *per-sample* denoising error ``l(x)`` and a boolean
mask that says which items of the batch come from the labeled sensitive set S (the rest come from
the unlabeled set U). The denoising error is the squared error of the noise prediction summed over
all dimensions of one sample::

    l(x) = || eps_theta(x_t, t) - eps ||^2,      x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps

which is a one-sample estimate of the negative ELBO up to constants. Reading ``exp(-l(x))`` as the
probability that ``x`` is normal gives a binary classifier whose loss is ``l`` on normal items and

    h(l) = -log(1 - exp(-l))

on sensitive items (Takahashi et al., "Positive-Unlabeled Diffusion Models for Preventing Sensitive
Data Generation", ICLR 2025). Since U is the mixture ``beta p_S + (1 - beta) p_N``, the normal risk
is ``(1 - beta) E_N[l] = E_U[l] - beta E_S[l]`` and the PU objective is::

    beta * mean_S h(l)  +  | mean_U l  -  beta * mean_S l |

The absolute value follows absPU (Hammoudeh & Lowd, 2020); ``correction="nn"`` follows nnPU (Kiryo
et al., 2017): when the bracket is negative, the quantity backpropagated is its negation.

Beyond the paper: ``pu-bounded`` applies the PU terms at high noise levels only, and ``weighted``
trains on U with a per-item weight, the estimated chance that the item is normal (a soft filter).
Both are described in :func:`objective`.

This module imports only torch, so it can be reused by any training loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("unsupervised", "supervised", "pu", "pu-bounded", "weighted")
CORRECTIONS = ("abs", "nn")

# l is clamped away from 0 before h(l) = -log(1 - exp(-l)), which is +inf at l = 0.
_MIN_LOSS = 1e-6
# An S item's h(l) counts as "live" (it still carries a gradient worth the name) above this.
LIVE_SCORE = 1e-6


@dataclass(frozen=True)
class ObjectiveOutput:
    """What a training step backpropagates and what it logs.

    Attributes:
        loss: scalar to backpropagate.
        risk: the value of the objective (for nnPU this differs from ``loss`` when the correction
            fires: nnPU reports the clamped risk but backpropagates the negated bracket).
        positive_risk: ``beta * mean_S h(l)``, the sensitive-as-sensitive term (0 for unsupervised).
        negative_risk: the normal-risk estimate (the bracket ``mean_U l - beta mean_S l`` for pu).
        mean_unlabeled_loss: ``mean_U l``.
        mean_sensitive_loss: ``mean_S l``.
        corrected: whether the absPU/nnPU correction fired (the bracket was negative).
        num_unlabeled: items from U in the batch (the global batch under data parallelism).
        num_sensitive: items from S in the batch (the global batch under data parallelism).
        live_sensitive_fraction: share of the batch's S items whose h(l) is above 1e-6 (0 when
            there is no S item). With l summed over dimensions, h(l) is exactly 0 in float32 once
            l > ~104, and ``supervised``'s S term and ``pu``'s positive risk are then dead.
    """

    loss: torch.Tensor
    risk: torch.Tensor
    positive_risk: torch.Tensor
    negative_risk: torch.Tensor
    mean_unlabeled_loss: torch.Tensor
    mean_sensitive_loss: torch.Tensor
    corrected: torch.Tensor
    num_unlabeled: torch.Tensor
    num_sensitive: torch.Tensor
    live_sensitive_fraction: torch.Tensor

    def log_dict(self) -> dict[str, float]:
        """Host-side floats for logging. Synchronises with the device: call at log ticks only."""
        return {
            "loss": float(self.loss.detach()),
            "risk": float(self.risk.detach()),
            "positive_risk": float(self.positive_risk.detach()),
            "negative_risk": float(self.negative_risk.detach()),
            "mean_unlabeled_loss": float(self.mean_unlabeled_loss.detach()),
            "mean_sensitive_loss": float(self.mean_sensitive_loss.detach()),
            "corrected": float(self.corrected.detach()),
            "num_unlabeled": int(self.num_unlabeled),
            "num_sensitive": int(self.num_sensitive),
            "live_sensitive_fraction": float(self.live_sensitive_fraction.detach()),
        }


def sensitive_score(per_sample_loss: torch.Tensor) -> torch.Tensor:
    """h(l) = -log(1 - exp(-l)), computed stably with l clamped above 0.

    h is the negative log-probability of "sensitive" under the classifier p(normal|x) = exp(-l).
    It is positive, decreases in l and tends to 0 as l grows, so minimising it raises l without the
    unbounded run-away of plain gradient ascent.
    """
    loss = per_sample_loss.clamp_min(_MIN_LOSS)
    # log(1 - exp(-l)) in two branches (Maechler 2012, "log1mexp"): -log(-expm1(-l)) is exact for
    # small l; for l > log 2, log1p(-exp(-l)) keeps the tiny value that 1 - exp(-l) would round away.
    small = loss <= math.log(2.0)
    near_zero = -torch.log(-torch.expm1(-loss.where(small, torch.ones_like(loss))))
    far = -torch.log1p(-torch.exp(-loss.where(~small, torch.ones_like(loss))))
    return torch.where(small, near_zero, far)


class CrossProcessSum:
    """Sums a tensor over the processes of a ``torch.distributed`` group (one all-reduce).

    The objective calls it once per step on a small vector of per-process sums and counts, so that
    the means, the bracket and its sign are those of the *global* batch.
    """

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("CrossProcessSum needs an initialised torch.distributed process group")
        self._dist = dist
        self.group = group
        self.world_size = dist.get_world_size(group)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        total = values.detach().clone()
        self._dist.all_reduce(total, op=self._dist.ReduceOp.SUM, group=self.group)
        return total


class SumRecorder:
    """A ``reduce`` that records each call's sums and changes nothing: the first pass of gradient
    accumulation, a forward pass over every micro-batch to learn the whole batch's sums."""

    world_size = 1

    def __init__(self):
        self.sums: list[torch.Tensor] = []

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        self.sums.append(values.detach().clone())
        return values.detach()

    def total(self) -> torch.Tensor:
        return torch.stack(self.sums).sum(0)


class KnownSums:
    """A ``reduce`` that returns sums known beforehand: those of the whole accumulated batch (and,
    under data parallelism, of every process). Each micro-batch then backpropagates the whole
    batch's objective through its own items, so K micro-batches give the gradient of one batch.
    ``world_size``: the number of processes, for the gradient scaling of :func:`objective`."""

    def __init__(self, total: torch.Tensor, world_size: int = 1):
        self.total, self.world_size = total.detach(), world_size

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        if values.shape != self.total.shape:
            raise ValueError(f"sums of shape {tuple(values.shape)}, known sums {tuple(self.total.shape)}")
        return self.total


def _global_sums(local: torch.Tensor, reduce: CrossProcessSum | None) -> torch.Tensor:
    """The global value of per-process sums whose gradient flows to this process's items only.

    ``global + (local - local.detach())``: forward, exactly the all-reduced sum (the added term
    is exactly zero), so every process holds bit-identical means, bracket, sign and finite check;
    backward, d/d(local). Differentiating any function of the result therefore gives, on each
    process, the global objective's derivative with respect to that process's own items.
    (``local + (global - local)`` would round differently on each process.)
    """
    if reduce is None:
        return local
    return reduce(local) + (local - local.detach())


def objective(
    method: str,
    per_sample_loss: torch.Tensor,
    is_sensitive: torch.Tensor,
    beta: float = 0.1,
    correction: str = "abs",
    reduce: CrossProcessSum | None = None,
    *,
    weights: torch.Tensor | None = None,
    high_noise: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """Reduce a per-sample denoising error to the training objective of ``method``.

    Args:
        method: ``"unsupervised"`` (mean_U l; S ignored), ``"supervised"`` (l on U items, h(l) on
            S items, averaged over the batch: every unlabeled item treated as normal), ``"pu"``
            (``beta mean_S h(l) + |mean_U l - beta mean_S l|``, the paper's), ``"pu-bounded"``
            (the PU objective on the high-noise items only, see below) or ``"weighted"``
            (``sum_U w l / sum_U w``, a soft filter; S ignored).
        per_sample_loss: shape ``(batch,)``, the summed squared noise-prediction error per item.
            Computed in float32 or higher precision for stable results; other dtypes are upcast.
        is_sensitive: shape ``(batch,)`` bool, True for items drawn from the labeled sensitive set S.
        beta: share of sensitive items inside U, in [0, 1). Used by ``pu`` and ``pu-bounded``;
            ``beta=0`` reduces them to ``unsupervised``.
        correction: ``"abs"`` (absPU, the paper's choice) or ``"nn"`` (nnPU) for the PU bracket.
        reduce: under data-parallel training, a :class:`CrossProcessSum`. The counts and sums of
            every process are added up (one all-reduce of seven numbers, thirteen for pu-bounded
            and weighted) before the means, the bracket and its sign are formed, so every process
            reports the objective of the global batch, and the backpropagated loss is scaled so
            that, once the data-parallel wrapper
            *averages* the gradients, N processes with batch B give exactly the gradient of one
            process with batch N*B. ``None``: this batch is the whole batch.
        weights: ``weighted`` only, shape ``(batch,)``: each U item's weight w(x) in [0, 1], the
            estimated chance that it is normal (:func:`pudm.filtering.soft_weights`).
        high_noise: ``pu-bounded`` only, shape ``(batch,)`` bool: the items whose drawn timestep is
            at or above the bound t0.

    ``pu-bounded``: the paper's objective, with the ascent on S kept away from low noise. Raising
    l on S at low noise levels (t < t0) damages the fine detail of every image, normal ones too,
    and breaks deterministic samplers; at high noise it changes what is drawn. So, with U_hi, S_hi
    the items at t >= t0 and U_lo the U items below::

        PU_hi = beta mean_{S_hi} h(l) + | mean_{U_hi} l - beta mean_{S_hi} l |
        risk  = ( sum_{U_lo} l + |U_hi| PU_hi ) / |U|

    that is, every U item below t0 is trained as in ``unsupervised`` and the U items above it
    are replaced by the PU estimate of their normal risk; S items below t0 are not used. ``t0 = 0``
    gives ``pu`` and ``t0 = T`` gives ``unsupervised``, except in a batch with no U item at or
    above t0, where the S terms are weighted by |U_hi| = 0 and S trains nothing. Restricting the
    unlearning signal to where it is harmless echoes SISS (Alberti et al., ICLR 2025,
    arXiv 2503.01034), which reweights the S gradient instead; the bound by noise level and the
    default t0 = 300 come from a one-seed digits trial and are not yet benchmarked.

    Returns:
        ObjectiveOutput with the scalar to backpropagate and the parts worth logging.
    """
    if method not in METHODS:
        raise ValueError(f"unknown objective method {method!r}; choose one of {', '.join(METHODS)}")
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose one of {', '.join(CORRECTIONS)}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    if per_sample_loss.ndim != 1 or per_sample_loss.shape != is_sensitive.shape:
        raise ValueError(
            "per_sample_loss and is_sensitive must both have shape (batch,), got "
            f"{tuple(per_sample_loss.shape)} and {tuple(is_sensitive.shape)}"
        )
    for name, value, wanted in (("weights", weights, "weighted"), ("high_noise", high_noise, "pu-bounded")):
        if value is None and method == wanted:
            raise ValueError(f"method {wanted} needs {name}")
        if value is not None and method != wanted:
            raise ValueError(f"{name} belongs to method {wanted}, not {method}")
        if value is not None and value.shape != per_sample_loss.shape:
            raise ValueError(
                f"{name} must have shape {tuple(per_sample_loss.shape)}, got {tuple(value.shape)}"
            )

    half = (torch.float16, torch.bfloat16)
    loss = per_sample_loss.float() if per_sample_loss.dtype in half else per_sample_loss
    sensitive = is_sensitive.bool()
    unlabeled = ~sensitive
    zeros = torch.zeros_like(loss)
    uses_scores = method in ("supervised", "pu", "pu-bounded")
    scores = sensitive_score(loss) if uses_scores else zeros
    # Logged only: for every method, so a user sees when h(l) is dead before choosing one (the
    # scores already computed are reused; the others compute them here, without a graph).
    logged_scores = scores.detach() if uses_scores else sensitive_score(loss.detach())
    live = sensitive & (logged_scores > LIVE_SCORE)
    # The items of the PU terms: all of them, but for pu-bounded the high-noise ones.
    high = high_noise.bool() if high_noise is not None else torch.ones_like(sensitive)
    pu_unlabeled, pu_sensitive = unlabeled & high, sensitive & high
    weight = weights.to(loss.dtype) if weights is not None else torch.ones_like(loss)

    # Everything the objective needs is a sum over the batch: with several processes these are
    # summed over processes first (counts too), so the objective is the global batch's.
    def total(mask: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        return torch.where(mask, values, zeros).sum() if values is not None else mask.sum().to(loss.dtype)

    # The paper's methods all-reduce seven numbers; pu-bounded and weighted six more.
    values = [
        total(unlabeled, loss),
        total(sensitive, loss),
        total(pu_sensitive, scores),
        total(unlabeled),
        total(sensitive),
        loss.new_tensor(float(loss.numel())),
        total(live),
    ]
    if method in ("pu-bounded", "weighted"):
        values += [
            total(pu_unlabeled, loss),
            total(pu_unlabeled),
            total(pu_sensitive, loss),
            total(pu_sensitive),
            total(unlabeled, weight * loss),
            total(unlabeled, weight),
        ]
    sums = _global_sums(torch.stack(values), reduce).unbind()
    (sum_unlabeled, sum_sensitive, sum_scores, count_unlabeled, count_sensitive, count_all, count_live) = (
        sums[:7]
    )
    if len(sums) > 7:
        (
            sum_pu_unlabeled,
            count_pu_unlabeled,
            sum_pu_sensitive,
            count_pu_sensitive,
            sum_weighted,
            sum_weights,
        ) = sums[7:]
    # Counts clamped to >= 1 so that a batch without items of one kind gives 0, not NaN.
    mean_unlabeled = sum_unlabeled / count_unlabeled.detach().clamp_min(1)
    mean_sensitive = sum_sensitive / count_sensitive.detach().clamp_min(1)
    corrected = torch.zeros((), dtype=torch.bool, device=loss.device)

    if method == "unsupervised":
        positive = loss.new_zeros(())
        negative = risk = to_backpropagate = mean_unlabeled
    elif method == "weighted":
        positive = loss.new_zeros(())
        # A batch whose weights are all 0 trains nothing (0, not NaN).
        negative = risk = to_backpropagate = sum_weighted / sum_weights.detach().clamp_min(1e-12)
    elif method == "supervised":
        # Every unlabeled item is treated as normal; the batch mean weighs each item once.
        batch_size = count_all.detach().clamp_min(1)
        positive = sum_scores / batch_size
        negative = sum_unlabeled / batch_size
        risk = to_backpropagate = positive + negative
    elif method == "pu":
        positive = beta * sum_scores / count_sensitive.detach().clamp_min(1)
        negative = mean_unlabeled - beta * mean_sensitive  # the bracket: (1 - beta) E_N[l]
        corrected = negative.detach() < 0
        risk, to_backpropagate = _pu_risk(positive, negative, corrected, correction)
    else:  # pu-bounded
        count_high = count_pu_unlabeled.detach()
        positive = beta * sum_scores / count_pu_sensitive.detach().clamp_min(1)
        negative = sum_pu_unlabeled / count_high.clamp_min(1) - beta * sum_pu_sensitive / (
            count_pu_sensitive.detach().clamp_min(1)
        )
        corrected = negative.detach() < 0
        pu_risk, pu_step = _pu_risk(positive, negative, corrected, correction)
        low = sum_unlabeled - sum_pu_unlabeled  # the U items below t0, trained as unsupervised
        scale = count_unlabeled.detach().clamp_min(1)
        risk = (low + count_high * pu_risk) / scale
        to_backpropagate = (low + count_high * pu_step) / scale
    if reduce is not None and reduce.world_size > 1:
        # Same value; gradient times N, undoing the data-parallel average over N processes.
        to_backpropagate = to_backpropagate + (reduce.world_size - 1) * (
            to_backpropagate - to_backpropagate.detach()
        )
    count_unlabeled_int = count_unlabeled.detach().round().long()
    count_sensitive_int = count_sensitive.detach().round().long()
    return ObjectiveOutput(
        loss=to_backpropagate,
        risk=risk,
        positive_risk=positive,
        negative_risk=negative,
        mean_unlabeled_loss=mean_unlabeled,
        mean_sensitive_loss=mean_sensitive,
        corrected=corrected,
        num_unlabeled=count_unlabeled_int,
        num_sensitive=count_sensitive_int,
        live_sensitive_fraction=count_live.detach() / count_sensitive.detach().clamp_min(1),
    )


def _pu_risk(
    positive: torch.Tensor, bracket: torch.Tensor, corrected: torch.Tensor, correction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(risk to report, quantity to backpropagate) of ``positive + |bracket|`` (absPU) or nnPU."""
    if correction == "abs":
        risk = positive + bracket.abs()
        return risk, risk
    # nnPU: report max(0, bracket) but, when the bracket is negative, step on -bracket alone to
    # push it back up (Kiryo et al. 2017, Algorithm 1).
    return positive + bracket.clamp_min(0), torch.where(corrected, -bracket, positive + bracket)
