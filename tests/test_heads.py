"""The two per-row heads side by side: triton_heads.row_head (run by the forward kernel in head-only
mode under the interpreter) and torch_heads.row_head, on the same raw rows, for every head variant
of the loss registry.

The rows cover what the sweep-level tests rarely reach: log-odds d = ±80, |log r| > 20 (PPO's
ratio clamp), KL estimators past their clamps (k3 > 10, |x| > 20), both sides of every clip, the
one-option and p_i = 0 rows, and NaN / ±inf inputs. O(N): fast.
"""
import math

import pytest
import torch

from lco_kernels import torch_backend, torch_heads, triton_backend
from lco_kernels._plumbing import loss_spec
from lco_kernels.diagnostics.aot import heads
from lco_kernels.stats import PART, PARTIALS, ROW, STAT

IGNORE = -100


def raw_rows():
    """(partials, labels, advantages, old_logprobs, ref_logprobs): one row per case, fp32."""
    ds = [-80.0, -30.0, -5.0, -0.3, 0.0, 0.4, 2.0, 9.0, 25.0, 80.0]
    # log p_i − log p_old: inside and outside every clip, past PPO's ±20 clamp
    log_r = [0.0, math.log(1.2) - 1e-4, math.log(1.2) + 1e-4, math.log(0.8) + 1e-4, math.log(0.8) - 1e-4,
             math.log(3.0) + 0.01, 20.5, -20.5, 25.0, -25.0]
    # log p_ref − log p_i: k3 = e^x − x − 1 crosses 10 near x = 2.6; x past ±20; never exactly 0, where
    # |x| has its kink (the two libraries' log p_i may round to either side of it)
    ref_shift = [1e-3, 0.5, -0.5, 2.55, 2.65, 2.8, 3.5, 20.5, -20.5, -3.0]
    rows = []
    for d in ds:
        for lr, rs in zip(log_r, ref_shift):
            for adv in (1.3, -0.7):
                rows.append((d, lr, rs, adv))
    n = len(rows)
    d = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    m = torch.randn(n, dtype=torch.float64) * 3
    s = torch.rand(n, dtype=torch.float64) * 50 + 1
    z_i = m + torch.log(s) + d
    log_p = -torch.nn.functional.softplus(-d)
    old = log_p - torch.tensor([r[1] for r in rows], dtype=torch.float64)
    ref = log_p + torch.tensor([r[2] for r in rows], dtype=torch.float64)
    adv = torch.tensor([r[3] for r in rows], dtype=torch.float64)
    # u, q as a sweep over some p̃ would leave them: u/s ≤ log s, q/s² ≤ 1
    u = s * (torch.log(s) - torch.rand(n, dtype=torch.float64))
    q = s * s * torch.rand(n, dtype=torch.float64)
    labels = torch.randint(0, 1000, (n,))
    owned = torch.ones(n, dtype=torch.float64)

    def special(**kw):
        """Append one row with some raw values replaced."""
        nonlocal m, s, z_i, u, q, adv, old, ref, labels, owned
        vals = dict(m=1.0, s=7.0, z_i=2.5, u=5.0, q=20.0, adv=0.8, old=-1.0, ref=-1.2, label=3, owned=1.0)
        vals.update(kw)
        m, s, z_i, u, q = (torch.cat([t, torch.tensor([float(vals[k])], dtype=torch.float64)])
                           for t, k in ((m, "m"), (s, "s"), (z_i, "z_i"), (u, "u"), (q, "q")))
        adv, old, ref, owned = (torch.cat([t, torch.tensor([float(vals[k])], dtype=torch.float64)])
                                for t, k in ((adv, "adv"), (old, "old"), (ref, "ref"), (owned, "owned")))
        labels = torch.cat([labels, torch.tensor([vals["label"]])])

    special(s=0.0, m=-math.inf, u=0.0, q=0.0)             # one option: every other logit −inf
    special(s=0.0, m=-math.inf, z_i=-math.inf, u=0.0, q=0.0)  # every logit −inf
    special(z_i=-math.inf)                                  # p_i = 0
    special(z_i=math.nan)                                   # NaN in the logits
    special(s=math.nan)
    special(z_i=math.inf)                                   # +inf logit
    special(adv=math.nan)
    special(adv=math.inf)
    special(adv=-math.inf)
    special(adv=0.0)
    special(old=math.nan)
    special(ref=math.nan)
    special(old=-math.inf)
    special(owned=0.0)                                      # label outside the vocabulary
    special(label=IGNORE, z_i=math.nan, adv=math.nan)       # ignored: exact zeros whatever the inputs
    partials = torch.zeros(len(labels), len(PARTIALS), dtype=torch.float64)
    for name, t in (("m", m), ("s", s), ("z_i", z_i), ("owned", owned), ("u", u), ("q", q)):
        partials[:, PART[name]] = t
    return partials.float(), labels, adv.float(), old.float(), ref.float()


def _spec(head):
    kw = {}
    if head.has_old:
        kw["old_logprobs"] = True
    if head.dual_clip:
        kw["dual_clip"] = 3.0
    if head.kl_type is not None:
        kw.update(ref_logprobs=True, beta=0.3, kl_type=head.kl_type.name.lower(), bias_correction_kl=head.bias_kl)
    if head.divergence is not None:
        kw.update(divergence=head.divergence, delta_low=0.05, delta_high=0.1)
    if head.loss == "cispo" and head.kl_type is not None:
        kw["epsilon_low"] = 0.25    # verl's two-sided clamp (the others: the one-sided cap)
    return loss_spec(head.loss, temperature=0.8, entropy_coef=0.01, epsilon_low=kw.pop("epsilon_low", None),
                     tau_pos=1.3, tau_neg=0.8, dro_beta=0.4, **kw)


def _close(a, b, what):
    """Equal NaN pattern, equal infinities, finite values within 2e-6 relative or 2e-6 absolute (a
    loss that sums terms of ~1 to ~0.005 keeps only their absolute error): the heads run the same
    fp32 operations, only exp/log/log1p come from different libraries (numpy's, ATen's)."""
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN rows differ"
    assert torch.equal(a.isinf(), b.isinf()) and torch.equal(a[a.isinf()], b[b.isinf()]), f"{what}: infinities"
    fin = a.isfinite()
    torch.testing.assert_close(a[fin], b[fin], rtol=2e-6, atol=2e-6, msg=what)


@pytest.mark.parametrize("head", heads(), ids=lambda h: h.name)
def test_both_heads_agree_on_every_row(head):
    partials, labels, adv, old, ref = raw_rows()
    spec = _spec(head)
    args = (labels, adv, old if spec.has_old else None, ref if spec.has_ref else None, spec, IGNORE, True, True)
    rows_triton, stats_triton = triton_backend.head_rows(partials, *args)
    rows_torch, stats_torch = torch_backend.head_rows(partials, *args)
    for name in ("loss", "alpha", "ent_mask", "log_p", "log_1mp", "entropy"):
        _close(rows_triton[:, ROW[name]], rows_torch[:, ROW[name]], name)
    for name in ("logprobs", "entropy", "logit_grad_norm", "target_prob"):
        _close(stats_triton[:, STAT[name]], stats_torch[:, STAT[name]], name)
    for name in ("clamped", "clipped"):
        assert torch.equal(stats_triton[:, STAT[name]], stats_torch[:, STAT[name]]), name
    ignored = labels == IGNORE
    assert bool((rows_torch[ignored, ROW["loss"]] == 0).all()) and bool((rows_triton[ignored, ROW["loss"]] == 0).all())
    # every row kind is present: some clipped and some not where the loss clips; NaN rows are NaN
    loss = rows_torch[:, ROW["loss"]]
    assert int(loss.isnan().sum()) >= 7
    if spec.can_clip:
        clipped = stats_torch[:, STAT["clipped"]]
        assert 0 < int(clipped.sum()) < len(clipped)


def test_sft_head_is_exact():
    """SFT's two-op head (−log p_i = softplus(nd), 1 − p_i = σ(nd) at nd = −d) against log(1 + e^nd) and
    1 / (1 + e^−nd) formed another way, in float64 and float32, for nd in [−60, 60]: softplus returns nd
    itself past its threshold, which must lie where e^−nd no longer shows (at softplus's default of 20 the
    float64 loss is off by up to 1e-10 relative: this test fails)."""
    nd = torch.linspace(-60, 60, 2401, dtype=torch.float64) + torch.rand(2401, dtype=torch.float64) * 0.01
    for dtype, rtol in ((torch.float64, 1e-15), (torch.float32, 1e-6)):
        x = nd.to(dtype)
        loss, alpha = torch_heads.sft_terms(x)
        x = x.double()
        want_loss = torch.where(x > 0, x + torch.log1p(torch.exp(-x)), torch.log1p(torch.exp(x)))
        want_alpha = torch.where(x > 0, 1 / (1 + torch.exp(-x)), torch.exp(x) / (1 + torch.exp(x)))
        assert loss.dtype == alpha.dtype == dtype
        torch.testing.assert_close(loss.double(), want_loss, rtol=rtol, atol=0)
        torch.testing.assert_close(alpha.double(), want_alpha, rtol=rtol, atol=0)
