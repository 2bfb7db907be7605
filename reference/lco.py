"""Two float64 references for the LCO loss (paper §4.2, eq. 13-18).

``lco_loss_reference`` follows the paper's steps literally with autograd: π = softmax(z),
ρ from the sign of Ψ, Δz of eq. 15, π' = softmax(z + Δz·e_i) (eq. 14/16, materialised over the
whole vocabulary), L = |Ψ|·KL(π' ‖ π) (eq. 17); the gradient comes from autograd through the KL
with π' detached. It computes 1 − p_i by subtraction, so it loses digits once the sampled logit
leads the others by ~35 (1 − p_i underflows float64's spacing near 1).

``lco_rows_closed_form`` is the oracle for those confident rows: SPEC §1's table in the log
domain, float64, returning the per-row loss and the full gradient α·(p̃ − e_i) without autograd.
"""
import torch
import torch.nn.functional as F

from .reductions import aggregate


def _rows(logits, labels, advantages):
    V = logits.shape[-1]
    z = logits.reshape(-1, V).double()
    lab = labels.reshape(-1).long()
    adv = torch.as_tensor(advantages, dtype=torch.float64, device=logits.device)
    adv = adv.expand(labels.shape).reshape(-1)
    return z, lab, adv


def lco_loss_reference(logits, labels, advantages, *, rho_pos=1.8, rho_neg=0.9,
                       ignore_index=-100, reduction="mean"):
    """The paper's LCO loss, step by step, in float64 with autograd (gradient w.r.t. ``logits``)."""
    z, lab, adv = _rows(logits, labels, advantages)
    valid = lab != ignore_index
    idx = torch.where(valid, lab, 0)[:, None]
    onehot = F.one_hot(idx[:, 0], z.shape[-1]).bool()

    log_pi = torch.log_softmax(z, dim=-1)                     # log π_θ (differentiable)
    with torch.no_grad():                                     # the target is built from sg(z)
        zd = z.detach()
        p_i = log_pi.detach().gather(1, idx)[:, 0].exp()
        rho = torch.where(adv > 0, rho_pos, rho_neg).double()
        # Rows whose non-sampled logits are all -inf have no mass to move: π' = π (SPEC §1).
        only_option = torch.isneginf(zd.masked_fill(onehot, -torch.inf)).all(dim=-1)
        clamped = rho * p_i >= 1                              # no finite Δz: one-hot target
        dz = torch.log(rho) + torch.log((1 - p_i) / (1 - rho * p_i))          # eq. 15
        dz = torch.where(clamped | only_option, 0.0, dz)
        target = torch.softmax(zd + torch.where(onehot, dz[:, None], 0.0), dim=-1)  # eq. 14, 16
        target = torch.where(clamped[:, None], onehot.double(), target)
        target = torch.where(only_option[:, None], log_pi.detach().exp(), target)

    # eq. 17 with 0·log 0 = 0: entries with π'_k = 0 contribute nothing.
    terms = torch.where(target == 0, 0.0, target * (torch.log(target) - log_pi))
    kl = terms.sum(dim=-1)
    per_row = torch.where(valid, adv.abs() * kl, 0.0)
    return aggregate(per_row.reshape(labels.shape), labels != ignore_index, reduction)


def lco_rows_closed_form(logits, labels, advantages, *, rho_pos=1.8, rho_neg=0.9, ignore_index=-100):
    """(per-row loss, gradient α·(p̃ − e_i)) in float64 from SPEC §1's log-domain table, no autograd.

    Exact for confident tokens: log(1 − p_i) = lse_excl − lse, never 1 − p_i by subtraction.
    """
    z, lab, adv = _rows(logits.detach(), labels, advantages)
    valid = lab != ignore_index
    idx = torch.where(valid, lab, 0)[:, None]
    z_i = z.gather(1, idx)[:, 0]
    z_excl = z.scatter(1, idx, -torch.inf)
    lse_excl = torch.logsumexp(z_excl, dim=-1)
    # log p_i = z_i − lse and log(1 − p_i) = lse_excl − lse, written as −softplus(∓d) so that the
    # one close to 0 keeps its digits (z_i − lse rounds to 0 once d > 37 in float64).
    d = z_i - lse_excl
    zero = torch.zeros_like(d)
    log_p = -torch.logaddexp(zero, -d)
    log_1mp = -torch.logaddexp(zero, d)
    p = log_p.exp()
    rho = torch.where(adv > 0, rho_pos, rho_neg).double()
    t = torch.clamp(rho * p, max=1.0)
    log_t = torch.log(t)
    log_1mt = torch.log1p(-t)
    kl = (torch.where(t > 0, t * (log_t - log_p), 0.0)
          + torch.where(t < 1, (1 - t) * (log_1mt - log_1mp), 0.0))
    # t − p_i: when clamped it is 1 − p_i, taken from log(1 − p_i) to keep its digits.
    t_minus_p = torch.where(rho * p >= 1, log_1mp.exp(), t - p)
    alpha = adv.abs() * t_minus_p
    degenerate = ~valid | torch.isneginf(lse_excl)
    loss = torch.where(degenerate, 0.0, adv.abs() * kl)
    alpha = torch.where(degenerate, 0.0, alpha)
    p_tilde = torch.exp(z_excl - torch.where(degenerate, 0.0, lse_excl)[:, None])
    grad = alpha[:, None] * p_tilde
    grad = grad.scatter(1, idx, -alpha[:, None])
    grad = torch.where(degenerate[:, None], 0.0, grad)
    return loss.reshape(labels.shape), grad.reshape(logits.shape)
