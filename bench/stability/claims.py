"""The paper's single-state claims, measured through our own losses (torch backend).

1. Gradient dynamics (paper §3, §4.3): a free logit vector z, one sampled action, plain gradient
   descent on SFT, PG (Ψ = ±1), PG-IS (Ψ = ±1) and LCO (Ψ = ±1) through the public losses; per step
   the loss, ‖∂L/∂z‖, the sampled action's probability and the entropy.
2. Logits convexity (Propositions 3-6): extreme eigenvalues of the Hessian w.r.t. the logits of the
   float64 references (autograd; LCO's target is a constant, as in the paper) at random points.
"""
import math

import torch

import reference
from lco_kernels import lco_loss, pg_loss, ppo_loss, sft_loss

# ---------------------------------------------------------------- 1. single-state gradient dynamics

DYNAMICS_V = 1000
DYNAMICS_P0 = 0.9     # the sampled action starts likely: PG-IS with Ψ < 0 then shows its rise and fall


def _dynamics_loss(method, z, label, p_old_log):
    kind, sign = method.rsplit(" ", 1) if " " in method else (method, "+")
    adv = torch.tensor([1.0 if sign == "+" else -1.0])
    if kind == "SFT":
        return sft_loss(z, label, reduction="sum", backend="torch", return_stats=True)
    if kind == "PG":
        return pg_loss(z, label, adv, reduction="sum", backend="torch", return_stats=True)
    if kind == "PG-IS":   # the importance ratio against the starting policy, unclipped
        return ppo_loss(z, label, adv, p_old_log, epsilon_low=1 - 1e-12, epsilon_high=1e12, reduction="sum",
                        backend="torch", return_stats=True)
    return lco_loss(z, label, adv, reduction="sum", backend="torch", return_stats=True)


DYNAMICS_METHODS = ("SFT", "PG +", "PG -", "PG-IS +", "PG-IS -", "LCO +", "LCO -")


def gradient_dynamics(steps=300, lr=1.0, seed=0):
    """{method: {"loss", "grad_norm", "prob", "entropy": [per step]}} from one shared random start."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(1, DYNAMICS_V, generator=g, dtype=torch.float64).float()
    label = torch.tensor([int(torch.randint(0, DYNAMICS_V, (1,), generator=g))])
    # raise the sampled logit so that its probability starts at DYNAMICS_P0
    rest = torch.logsumexp(torch.cat([z0[0, :label], z0[0, label + 1:]]), 0)
    z0[0, label] = rest + math.log(DYNAMICS_P0 / (1 - DYNAMICS_P0))
    p_old_log = torch.log_softmax(z0, -1)[:, label[0]]
    curves = {}
    for method in DYNAMICS_METHODS:
        z = z0.clone()
        rec = {"loss": [], "grad_norm": [], "prob": [], "entropy": []}
        for _ in range(steps):
            z.requires_grad_(True)
            loss, stats = _dynamics_loss(method, z, label, p_old_log)
            (grad,) = torch.autograd.grad(loss, z)
            rec["loss"].append(loss.item())
            rec["grad_norm"].append(grad.norm().item())
            rec["prob"].append(stats.logprobs.exp().item())
            rec["entropy"].append(stats.entropy.item())
            z = (z - lr * grad).detach()
        curves[method] = rec
    return curves


# ---------------------------------------------------------------- 2. logits convexity

HESSIAN_CASES = (("SFT", "sft", 1.0), ("PG, Ψ > 0", "pg", 1.0), ("PG, Ψ < 0", "pg", -1.0),
                 ("PG-IS, Ψ > 0", "ppo", 1.0), ("PG-IS, Ψ < 0", "ppo", -1.0), ("LCO, Ψ > 0", "lco", 1.0),
                 ("LCO, Ψ > 0, clamped", "lco", 1.0), ("LCO, Ψ < 0", "lco", -1.0))


def hessian_eigenvalues(points=20, V=12, seed=0):
    """{case: (min eigenvalue, max eigenvalue) over ``points`` random logit vectors} (float64)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, kind, sign in HESSIAN_CASES:
        lo, hi = math.inf, -math.inf
        for _ in range(points):
            z = torch.randn(1, V, generator=g, dtype=torch.float64) * 2
            label = torch.randint(0, V, (1,), generator=g)
            if "clamped" in name:
                z[0, label] = z.max() + 3.0       # p_i > 1/ρ: one-hot target
            adv = torch.tensor([sign], dtype=torch.float64)
            old = (torch.log_softmax(z, -1)[:, label[0]] + torch.randn(1, generator=g, dtype=torch.float64)).detach()
            big = 1e12  # PG-IS: no clipping

            def f(x):
                return reference.policy_loss_reference(
                    kind, x, label, None if kind == "sft" else adv, old if kind == "ppo" else None,
                    reduction="sum", epsilon_low=1 - 1e-12, epsilon_high=big)[1]
            eig = torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, z).reshape(V, V))
            lo, hi = min(lo, eig.min().item()), max(hi, eig.max().item())
        out[name] = (lo, hi)
    return out


def curvature(lo, hi, tol=1e-10):
    if lo >= -tol:
        return "PSD (convex)"
    if hi <= tol:
        return "NSD (concave)"
    return "indefinite"

