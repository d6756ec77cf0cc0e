"""The PU objective: values worked out by hand, properties, and one contract for every variant."""

import math

import pytest
import torch

from pudm import objective, sensitive_score

VARIANTS = [("unsupervised", "abs"), ("supervised", "abs"), ("pu", "abs"), ("pu", "nn")]


def h(value: float) -> float:
    return -math.log(1.0 - math.exp(-value))


LOSS = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
MASK = torch.tensor([False, False, True, True])  # U = {1, 2}, S = {3, 4}


def test_sensitive_score_matches_formula_and_is_finite_at_zero():
    values = torch.tensor([0.0, 1e-12, 0.5, 3.0, 50.0], dtype=torch.float64)
    scores = sensitive_score(values)
    assert torch.isfinite(scores).all()
    assert scores[2].item() == pytest.approx(h(0.5))
    assert scores[3].item() == pytest.approx(h(3.0))
    # For large l, h(l) ~ exp(-l): positive and tiny, never 0 by cancellation.
    assert 0 < scores[4].item() == pytest.approx(math.exp(-50.0), rel=1e-6)
    assert scores[0] == scores[1], "l is clamped away from 0"
    assert (scores[1:-1] > scores[2:]).all(), "h decreases in l"


def test_unsupervised_by_hand():
    out = objective("unsupervised", LOSS, MASK)
    assert out.loss.item() == pytest.approx(1.5)  # mean of U losses, S ignored
    assert out.positive_risk.item() == 0.0


def test_supervised_by_hand():
    out = objective("supervised", LOSS, MASK)
    expected = (1.0 + 2.0 + h(3.0) + h(4.0)) / 4
    assert out.loss.item() == pytest.approx(expected)
    assert out.positive_risk.item() == pytest.approx((h(3.0) + h(4.0)) / 4)


def test_pu_abs_by_hand_positive_bracket():
    beta = 0.2
    out = objective("pu", LOSS, MASK, beta=beta)
    bracket = 1.5 - beta * 3.5  # 0.8
    positive = beta * (h(3.0) + h(4.0)) / 2
    assert out.negative_risk.item() == pytest.approx(bracket)
    assert out.positive_risk.item() == pytest.approx(positive)
    assert out.loss.item() == pytest.approx(positive + bracket)
    assert not out.corrected.item()


def test_pu_abs_by_hand_negative_bracket():
    loss = torch.tensor([1.0, 1.0, 20.0, 30.0], dtype=torch.float64)
    beta = 0.5
    out = objective("pu", loss, MASK, beta=beta)
    bracket = 1.0 - beta * 25.0  # -11.5
    positive = beta * (h(20.0) + h(30.0)) / 2
    assert out.corrected.item()
    assert out.loss.item() == pytest.approx(positive + abs(bracket))


def test_pu_nn_backpropagates_negated_bracket_when_corrected():
    loss = torch.tensor([1.0, 1.0, 20.0, 30.0], dtype=torch.float64, requires_grad=True)
    beta = 0.5
    out = objective("pu", loss, MASK, beta=beta, correction="nn")
    assert out.corrected.item()
    assert out.loss.item() == pytest.approx(-(1.0 - beta * 25.0))
    assert out.risk.item() == pytest.approx(beta * (h(20.0) + h(30.0)) / 2)  # bracket clamped to 0
    out.loss.backward()
    # d(-bracket)/dl: -1/|U| on U items, +beta/|S| on S items (the h term is not stepped on).
    assert loss.grad.tolist() == pytest.approx([-0.5, -0.5, 0.25, 0.25])


def test_pu_abs_gradient_flips_sign_of_u_term_when_corrected():
    loss = torch.tensor([1.0, 1.0, 20.0, 30.0], dtype=torch.float64, requires_grad=True)
    objective("pu", loss, MASK, beta=0.5).loss.backward()
    assert loss.grad[0].item() == pytest.approx(-0.5)  # ascent on U past the zero of the bracket


def test_pu_with_beta_zero_equals_unsupervised():
    torch.manual_seed(0)
    loss = torch.rand(32, dtype=torch.float64) * 10
    mask = torch.rand(32) < 0.3
    assert objective("pu", loss, mask, beta=0.0).loss.item() == pytest.approx(
        objective("unsupervised", loss, mask).loss.item()
    )


def test_pu_without_sensitive_items_reduces_to_unlabeled_mean():
    loss = torch.tensor([2.0, 4.0, 6.0])
    out = objective("pu", loss, torch.zeros(3, dtype=torch.bool), beta=0.1)
    assert out.loss.item() == pytest.approx(4.0)
    assert out.num_sensitive.item() == 0


@pytest.mark.parametrize("method,correction", VARIANTS)
@pytest.mark.parametrize("kind", ["no_sensitive", "no_unlabeled", "empty"])
def test_contract_finite_on_degenerate_batches(method, correction, kind):
    size = {"no_sensitive": 4, "no_unlabeled": 4, "empty": 0}[kind]
    loss = torch.rand(size, requires_grad=True)
    mask = torch.full((size,), kind == "no_unlabeled", dtype=torch.bool)
    out = objective(method, loss, mask, beta=0.1, correction=correction)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(loss.grad).all()


@pytest.mark.parametrize("method,correction", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contract_gradients_finite(method, correction, dtype):
    torch.manual_seed(1)
    # Include l = 0 exactly, where h would be infinite without the clamp.
    loss = torch.cat([torch.zeros(2), torch.rand(14) * 100]).to(dtype).requires_grad_()
    mask = torch.arange(16) % 4 == 0
    out = objective(method, loss, mask, beta=0.1, correction=correction)
    assert out.loss.dtype == torch.float32  # reduced in full precision
    out.loss.backward()
    assert torch.isfinite(loss.grad.float()).all()
    assert loss.grad.abs().sum() > 0


@pytest.mark.parametrize("method,correction", VARIANTS)
def test_contract_logged_parts_are_scalars_and_consistent(method, correction):
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = objective(method, loss, MASK, beta=0.1, correction=correction)
    logged = out.log_dict()
    assert logged["num_unlabeled"] == 2 and logged["num_sensitive"] == 2
    assert logged["mean_unlabeled_loss"] == pytest.approx(1.5)
    assert logged["mean_sensitive_loss"] == pytest.approx(3.5)
    if method != "pu" or correction == "abs":
        assert logged["risk"] == pytest.approx(logged["loss"])


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="beta"):
        objective("pu", LOSS, MASK, beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        objective("pu", LOSS, MASK, beta=-0.1)
    with pytest.raises(ValueError, match="unknown objective method"):
        objective("gradient_ascent", LOSS, MASK)
    with pytest.raises(ValueError, match="correction"):
        objective("pu", LOSS, MASK, correction="relu")
    with pytest.raises(ValueError, match="shape"):
        objective("pu", LOSS[:3], MASK)


def _h_prime(loss: torch.Tensor) -> torch.Tensor:
    """dh/dl for h(l) = -log(1 - exp(-l)): -1 / (exp(l) - 1)."""
    return -1.0 / torch.expm1(loss)


@pytest.mark.parametrize("correction", ["abs", "nn"])
@pytest.mark.parametrize("bracket_sign", [1, -1])
def test_pu_gradient_of_every_item_matches_the_closed_form(correction, bracket_sign):
    """d/dl of beta mean_S h(l) + |mean_U l - beta mean_S l| (nnPU: -bracket when it is negative),
    item by item, for both signs of the bracket."""
    generator = torch.Generator().manual_seed(3)
    is_sensitive = torch.tensor([False, True, False, False, True, False, True])
    loss = 0.5 + 2.5 * torch.rand(7, generator=generator, dtype=torch.float64)
    beta = 0.2
    if bracket_sign < 0:
        loss = torch.where(is_sensitive, loss + 6.0, loss)
        beta = 0.9
    loss.requires_grad_(True)
    out = objective("pu", loss, is_sensitive, beta=beta, correction=correction)
    out.loss.backward()
    n_u, n_s = int((~is_sensitive).sum()), int(is_sensitive.sum())
    bracket = loss.detach()[~is_sensitive].mean() - beta * loss.detach()[is_sensitive].mean()
    assert bool(bracket < 0) == (bracket_sign < 0) == bool(out.corrected)
    sign = 1.0 if bracket >= 0 else -1.0
    if correction == "nn" and bracket < 0:
        expected_u = torch.full((n_u,), -1.0 / n_u, dtype=torch.float64)
        expected_s = torch.full((n_s,), beta / n_s, dtype=torch.float64)
    else:
        expected_u = torch.full((n_u,), sign / n_u, dtype=torch.float64)
        expected_s = beta * _h_prime(loss.detach()[is_sensitive]) / n_s - sign * beta / n_s
    torch.testing.assert_close(loss.grad[~is_sensitive], expected_u)
    torch.testing.assert_close(loss.grad[is_sensitive], expected_s)


def test_supervised_and_unsupervised_gradients_of_every_item():
    generator = torch.Generator().manual_seed(4)
    is_sensitive = torch.tensor([False, True, True, False, False])
    for method in ("supervised", "unsupervised"):
        loss = (0.5 + 2.5 * torch.rand(5, generator=generator, dtype=torch.float64)).requires_grad_(True)
        objective(method, loss, is_sensitive).loss.backward()
        if method == "supervised":  # l on U items, h(l) on S items, over the whole batch
            expected = torch.where(is_sensitive, _h_prime(loss.detach()), torch.ones_like(loss)) / 5
        else:  # mean over U; S items get nothing
            expected = torch.where(is_sensitive, 0.0, 1.0 / 3).to(torch.float64)
        torch.testing.assert_close(loss.grad, expected)
