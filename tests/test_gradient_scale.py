"""LCO's logit-gradient norm against PG's (README, "Gradient scale").

Both gradients are α·(p̃ − e_i) per token with the same p̃, so the ratio of their norms is the ratio
of their α: |ρ − 1|·p_i / (1 − p_i) where ρ·p_i < 1, and 1 where LCO's target is one-hot (ρ·p_i ≥ 1).
`python -m pytest -s tests/test_gradient_scale.py` prints the measured table.
"""
import math

import pytest
import torch

from lco_kernels import lco_loss, pg_loss

V = 151936  # Qwen2.5's vocabulary


def policy(kind, n=4):
    """Logits (n, V) and sampled labels: "flat" (p_i ≈ 1/V) or "confident" (p_i = 0.99, the rest random)."""
    z = torch.randn(n, V) * 0.01
    labels = torch.randint(0, V, (n,))
    if kind == "confident":
        rows = torch.arange(n)
        z[rows, labels] = -math.inf
        z[rows, labels] = torch.logsumexp(z, 1) + math.log(0.99 / 0.01)
    return z, labels


def grad_norm(loss_fn, z, labels, adv):
    x = z.clone().requires_grad_(True)
    loss_fn(x, labels, adv, reduction="sum", backend="torch").backward()
    return x.grad.norm().item()


@pytest.mark.parametrize("kind", ["flat", "confident"])
def test_lco_to_pg_gradient_norm_ratio(kind):
    z, labels = policy(kind)
    p_i = torch.softmax(z.double(), -1).gather(1, labels[:, None])[:, 0]
    for sign, rho in ((1.0, 1.8), (-1.0, 0.9)):
        adv = torch.full(labels.shape, sign)
        ratio = grad_norm(lco_loss, z, labels, adv) / grad_norm(pg_loss, z, labels, adv)
        per_token = torch.where(rho * p_i >= 1, 1.0, abs(rho - 1) * p_i / (1 - p_i))
        # the norm ratio of the whole batch: every token has the same |Ψ| and nearly the same p_i
        expected = per_token.mean().item()
        print(f"\n{kind} policy (p_i ≈ {p_i.mean().item():.3g}, V = {V}), Ψ {sign:+.0f}: "
              f"‖∂L_LCO/∂z‖ / ‖∂L_PG/∂z‖ = {ratio:.3g}")
        assert ratio == pytest.approx(expected, rel=1e-3)
