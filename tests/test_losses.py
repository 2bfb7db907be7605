"""The loss family through one vocabulary kernel: every loss × reduction × backend against reference/."""
import dataclasses
import inspect

import pytest
import torch

import lco_kernels
import reference
from helpers import BACKENDS, assert_grad_close, assert_loss_close, make_inputs
from lco_kernels import lco_loss, ppo_loss, torch_backend, torch_heads
from lco_kernels._plumbing import loss_spec
from lco_kernels.diagnostics.aot import heads
from lco_kernels.reductions import REDUCTIONS
from lco_kernels.registry import DIVERGENCES, LOSSES, LossSpec


def _variant(head):
    """(id, public function, reference kind, extra kwargs) of one kernel head: every loss of the
    registry with each of its options (old log-probs, dual clip, each KL estimator) on and off."""
    extra = {}
    if head.has_old:
        extra["old"] = True
    if head.dual_clip:
        extra.update(dual_clip=3.0, epsilon_high=0.28)  # DAPO's clip-higher with verl's dual clip
    if head.kl_type is not None:
        extra.update(ref=True, beta=0.05, kl_type=head.kl_type.name.lower())
    if head.bias_kl:
        extra["bias_correction_kl"] = True
    if head.divergence is not None:
        extra["divergence"] = head.divergence
    if head.loss == "cispo":   # the one-sided cap, and verl's two-sided clamp with a KL term
        extra.update(epsilon_high=0.3, epsilon_low=None if head.kl_type is None else 0.25)
    if head.loss == "sapo":
        extra.update(tau_pos=1.3, tau_neg=0.8)
    if head.loss == "dppo":    # thresholds that put tokens on both sides of the trust region
        extra.update(delta_low=0.02, delta_high=0.03, clip_ratio_c=1.5)
    if head.loss == "dro":
        extra["dro_beta"] = 0.4
    return head.name, getattr(lco_kernels, f"{head.loss}_loss"), head.loss, extra


# The bias-corrected KL term is the same head code after every loss: here on two losses (every head
# runs it in tests/test_heads.py and tests/test_traffic.py).
VARIANTS = [_variant(h) for h in heads() if not h.bias_kl or h.loss in ("ppo", "sapo")]
NEEDS_OLD = {name for name, info in LOSSES.items() if info.old_logprobs == "required"}


def family_inputs(shape, V, dtype, device, old_noise=0.4):
    logits, labels, adv = make_inputs(shape, V, dtype, device)
    logp = reference.token_logprobs(logits.cpu(), labels.cpu(), -100)
    # behaviour-policy log-probs around the current ones, so ratios fall on both sides of every clip
    old = (logp + old_noise * torch.randn(shape, dtype=torch.float64)).float().to(device)
    ref = (logp + old_noise * torch.randn(shape, dtype=torch.float64)).float().to(device)
    return logits, labels, adv, old, ref


def call(fn, name, kind, extra, logits, labels, adv, old, ref, **kw):
    kwargs = {k: v for k, v in extra.items() if k not in ("ref", "old")}
    if extra.get("ref"):
        kwargs["ref_logprobs"] = ref
    if extra.get("old") and kind not in NEEDS_OLD:
        kwargs["old_logprobs"] = old
    args = (logits, labels) if kind == "sft" else (logits, labels, adv) + ((old,) if kind in NEEDS_OLD else ())
    return fn(*args, **kwargs, **kw)


def reference_for(kind, extra, logits, labels, adv, old, ref, reduction, **kw):
    z = logits.detach().cpu().double().requires_grad_(True)
    kwargs = {k: v for k, v in extra.items() if k not in ("ref", "old")}
    if extra.get("ref"):
        kwargs["ref_logprobs"] = ref.cpu()
    old_arg = old.cpu() if extra.get("old") else None
    _, loss = reference.policy_loss_reference(kind, z, labels.cpu(), None if kind == "sft" else adv.cpu(), old_arg,
                                              reduction=reduction, **kwargs, **kw)
    (grad,) = torch.autograd.grad(loss, z, torch.ones_like(loss))
    return loss.detach(), grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,fn,kind,extra", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_every_loss_every_reduction(name, fn, kind, extra, backend, device):
    logits, labels, adv, old, ref = family_inputs((3, 5), 1100, torch.float32, device)
    labels[2] = -100                       # one sequence with no valid token
    for reduction in REDUCTIONS:
        x = logits.clone().requires_grad_(True)
        loss = call(fn, name, kind, extra, x, labels, adv, old, ref, reduction=reduction, backend=backend,
                    max_length=7)
        (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
        ref_loss, ref_grad = reference_for(kind, extra, logits, labels, adv, old, ref, reduction, max_length=7)
        scale = adv.abs().max() if kind != "sft" else torch.tensor(1.0)
        assert_loss_close(loss, ref_loss, scale)
        assert_grad_close(grad, ref_grad, scale, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,fn,kind,extra", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_bf16_and_loss_mask(name, fn, kind, extra, backend, device):
    logits, labels, adv, old, ref = family_inputs((2, 6), 2000, torch.bfloat16, device)
    mask = torch.rand(2, 6, device=device) > 0.3
    x = logits.clone().requires_grad_(True)
    loss = call(fn, name, kind, extra, x, labels, adv, old, ref, reduction="seq-mean-token-mean", loss_mask=mask,
                backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    ref_loss, ref_grad = reference_for(kind, extra, logits, labels, adv, old, ref, "seq-mean-token-mean",
                                       loss_mask=mask.cpu())
    scale = adv.abs().max() if kind != "sft" else torch.tensor(1.0)
    assert_loss_close(loss, ref_loss, scale)
    assert_grad_close(grad, ref_grad, scale, torch.bfloat16)
    assert bool((grad[~mask] == 0).all())


@pytest.mark.parametrize("name,fn,kind,extra", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_every_reduction_without_padding(name, fn, kind, extra):
    """Every label a column and none padding: "sum" and "mean" weigh each token by one number
    (reductions.uniform_weight) and these small CPU calls take the one-pass path; every reduction against
    the float64 reference."""
    logits, labels, adv, old, ref = family_inputs((3, 5), 1100, torch.float32, "cpu")
    labels = torch.where(labels < 0, 11, labels)
    for reduction in REDUCTIONS:
        x = logits.clone().requires_grad_(True)
        loss = call(fn, name, kind, extra, x, labels, adv, old, ref, reduction=reduction, backend="torch")
        (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
        ref_loss, ref_grad = reference_for(kind, extra, logits, labels, adv, old, ref, reduction)
        scale = adv.abs().max() if kind != "sft" else torch.tensor(1.0)
        assert_loss_close(loss, ref_loss, scale)
        assert_grad_close(grad, ref_grad, scale, torch.float32)


@pytest.mark.parametrize("entropy_coef,temperature", [(0.0, 1.0), (0.01, 1.0), (0.0, 0.7)])
@pytest.mark.parametrize("name,fn,kind,extra", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_ordinary_calls_leave_out_the_masks_exactly(name, fn, kind, extra, entropy_coef, temperature, monkeypatch):
    """On CPU tensors the PyTorch backend leaves its row masks out (padding and labels outside the shard,
    NaN rows, rows with no other option) when no row of the call needs one; without the entropy it then
    takes its one-pass forward and backward (torch_backend.ordinary_forward: no row table either). Each
    row's loss and gradient (with the entropy term too) are the same bit for bit whether its call took
    that path (six ordinary rows) or the masked one (the same rows beside one padding row), and match the
    float64 reference."""
    logits, labels, adv, old, ref = family_inputs((6,), 300, torch.float32, "cpu")
    labels = torch.where(labels < 0, 7, labels)
    pad = torch.randn(1, 300) * 3
    padded = (torch.cat([logits, pad]), torch.cat([labels, torch.tensor([-100])]),
              *(torch.cat([t, torch.randn(1) - 1]) for t in (adv, old, ref)))
    fast, one_pass = [], []
    real_finite, real_forward = torch_heads.finite, torch_backend.ordinary_forward
    monkeypatch.setattr(torch_heads, "finite", lambda *c: fast.append(real_finite(*c)) or fast[-1])
    monkeypatch.setattr(torch_backend, "ordinary_forward",
                        lambda *a: one_pass.append(real_forward(*a)) or one_pass[-1])
    results = []
    for z, y, a, o, r in ((logits, labels, adv, old, ref), padded):
        x = z.clone().requires_grad_(True)
        loss = call(fn, name, kind, extra, x, y, a, o, r, reduction="none", backend="torch",
                    entropy_coef=entropy_coef, temperature=temperature)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        results.append((loss[:6].detach(), grad[:6]))
    # the ordinary call checked its rows and left the masks out (in the one-pass forward without the entropy,
    # in the row head with it); the padded one did not
    assert fast == ([True] if entropy_coef else []), fast
    assert [r is not None for r in one_pass] == ([] if entropy_coef else [True])
    for got, want, what in zip(*results, ("loss", "gradient")):
        assert torch.equal(got, want), what
    ref_loss, ref_grad = reference_for(kind, extra, logits, labels, adv, old, ref, "none", entropy_coef=entropy_coef,
                                       temperature=temperature)
    scale = adv.abs().max() if kind != "sft" else torch.tensor(1.0)
    assert_loss_close(results[0][0], ref_loss, scale)
    assert_grad_close(results[0][1], ref_grad, scale, torch.float32)


@pytest.mark.parametrize("name,fn,kind,extra", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_padded_calls_take_the_one_pass_path_exactly(name, fn, kind, extra, monkeypatch):
    """A CPU call with padding (``ignore_index`` labels and a loss mask) takes the one-pass path under every
    reduction that weighs its tokens: a padding token takes a column's values, which its weight 0 removes. Its
    loss and gradient are those of the general path (the same call with the one-pass path refused) bit for bit,
    and match the float64 reference on the masked labels; "none" (no weights) takes the general path."""
    logits, labels, adv, old, ref = family_inputs((3, 6), 300, torch.float32, "cpu")
    labels[0, -2:] = -100
    mask = torch.ones(3, 6)
    mask[1, 0] = 0.0
    masked = labels.masked_fill(mask == 0, -100)
    taken = []
    real_forward, real_view = torch_backend.ordinary_forward, torch_backend.ordinary_view
    monkeypatch.setattr(torch_backend, "ordinary_forward",
                        lambda *a: taken.append(real_forward(*a) is not None) or real_forward(*a))
    for reduction in REDUCTIONS:
        results = []
        for view in (real_view, lambda logits: None):  # the one-pass path, then the general path
            monkeypatch.setattr(torch_backend, "ordinary_view", view)
            x = logits.clone().requires_grad_(True)
            loss = call(fn, name, kind, extra, x, labels, adv, old, ref, reduction=reduction, loss_mask=mask,
                        max_length=7, backend="torch")
            (grad,) = torch.autograd.grad(loss.sum(), x)
            results.append((loss.detach(), grad))
        assert taken == ([] if reduction == "none" else [True]), (reduction, taken)
        taken.clear()
        for got, want, what in zip(*results, ("loss", "gradient")):
            assert torch.equal(got, want), (reduction, what)
        ref_loss, ref_grad = reference_for(kind, extra, logits, masked, adv, old, ref, reduction, max_length=7)
        scale = adv.abs().max() if kind != "sft" else torch.tensor(1.0)
        assert_loss_close(results[0][0], ref_loss, scale)
        assert_grad_close(results[0][1], ref_grad, scale, torch.float32)


@pytest.mark.parametrize("name,fn,kind,extra", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_one_pass_forward_refuses_non_finite_rows(name, fn, kind, extra):
    """The one-pass forward reads its rows' sums and the finiteness of z_i and the per-token inputs in one
    value, s + 0·(z_i + inputs): a +inf or NaN label logit, or a non-finite input the loss reads, sends the
    call down the general path (which makes that row NaN), and a finite call is not refused."""
    logits, labels, adv, old, ref = family_inputs((4,), 50, torch.float32, "cpu")
    labels = torch.where(labels < 0, 3, labels)
    spec = loss_spec(kind, old_logprobs=old if kind in NEEDS_OLD or extra.get("old") else None,
                     ref_logprobs=ref if extra.get("ref") else None,
                     **{k: v for k, v in extra.items() if k not in ("ref", "old")})
    inputs = (adv if spec.info.advantages else None, old if spec.has_old else None, ref if spec.has_ref else None)
    assert torch_backend.ordinary_forward(logits, labels, *inputs, spec) is not None
    for bad in (torch.inf, torch.nan):
        poisoned = logits.clone()
        poisoned[1, labels[1]] = bad
        assert torch_backend.ordinary_forward(poisoned, labels, *inputs, spec) is None
        for k, x in enumerate(inputs):
            if x is not None:
                changed = list(inputs)
                changed[k] = x.clone()
                changed[k][2] = -bad if k == 0 else bad  # -inf, +inf or NaN: none is finite
                assert torch_backend.ordinary_forward(logits, labels, *changed, spec) is None, k


def _rows_with_ratios(ratios, device):
    """One row per ratio r = p_i / p_old, with log p_old set from the row's own log p_i."""
    n = len(ratios)
    logits = torch.randn(n, 300, dtype=torch.float64) * 2
    labels = torch.randint(0, 300, (n,))
    logp = reference.token_logprobs(logits, labels, -100)
    old = logp - torch.log(torch.tensor(ratios, dtype=torch.float64))
    return logits.float().to(device), labels.to(device), old.float().to(device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_clip_boundaries(backend, device):
    eps = 0.2
    ratios = [1 + eps - 1e-3, 1 + eps + 1e-3, 1 - eps + 1e-3, 1 - eps - 1e-3, 3.0 - 1e-2, 3.0 + 1e-2]
    for sign, dual in ((1.0, None), (-1.0, None), (-1.0, 3.0)):
        logits, labels, old = _rows_with_ratios(ratios, device)
        adv = torch.full((len(ratios),), sign, device=device)
        x = logits.clone().requires_grad_(True)
        loss, stats = ppo_loss(x, labels, adv, old, epsilon_low=eps, epsilon_high=eps, dual_clip=dual,
                               reduction="none", backend=backend, return_stats=True)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        if sign > 0:    # clipped above 1 + ε only
            expected = [False, True, False, False, True, True]
        elif dual is None:  # clipped below 1 − ε only
            expected = [False, False, False, True, False, False]
        else:           # and capped at −Ψ·c above c
            expected = [False, False, False, True, False, True]
        clipped = stats.clipped.bool().cpu()
        assert clipped.tolist() == expected
        assert bool((grad[clipped.to(device)] == 0).all())
        assert bool((grad[~clipped.to(device)].abs().sum(dim=-1) > 0).all())
        if dual is not None:
            torch.testing.assert_close(loss[5].cpu(), torch.tensor(3.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_plus_lco_masks_only_the_pushing_direction(backend, device):
    eps = 0.2
    ratios = [1.5, 0.5, 1.1, 0.9, 1.5, 0.5]
    signs = [1.0, -1.0, 1.0, -1.0, -1.0, 1.0]   # rows 0, 1 left the region the way Ψ pushes; 4, 5 the other way
    logits, labels, old = _rows_with_ratios(ratios, device)
    adv = torch.tensor(signs, device=device)
    x = logits.clone().requires_grad_(True)
    loss, stats = lco_loss(x, labels, adv, old_logprobs=old, epsilon_low=eps, epsilon_high=eps, reduction="none",
                           backend=backend, return_stats=True)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    # with stats too: the CPU sweep takes another reference when the entropy is needed, so like is compared with like
    plain, _ = lco_loss(logits, labels, adv, reduction="none", backend=backend, return_stats=True)
    assert stats.clipped.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert loss[:2].tolist() == [0.0, 0.0] and bool((grad[:2] == 0).all())
    assert torch.equal(loss[2:], plain[2:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,fn,kind,extra", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_stats_against_float64(name, fn, kind, extra, backend, device):
    logits, labels, adv, old, ref = family_inputs((2, 7), 900, torch.float32, device)
    logits[0, 1, :300] = -torch.inf                                     # masked vocabulary
    labels[0, 1] = 500
    x = logits.clone().requires_grad_(True)
    loss, stats = call(fn, name, kind, extra, x, labels, adv, old, ref, reduction="none", backend=backend,
                       return_stats=True)
    valid = (labels != -100).cpu()
    z = logits.double().cpu()
    logp_all = torch.log_softmax(z, -1)
    p_all = logp_all.exp()
    entropy = -torch.where(p_all > 0, p_all * logp_all, 0.0).sum(-1)
    logp = reference.token_logprobs(z, labels.cpu(), -100)
    _, ref_grad = reference_for(kind, extra, logits, labels, adv, old, ref, "none")
    for name_, got, want in (("logprobs", stats.logprobs, logp), ("entropy", stats.entropy, entropy),
                             ("logit_grad_norm", stats.logit_grad_norm, ref_grad.norm(dim=-1))):
        assert got.shape == labels.shape and got.dtype == torch.float32 and not got.requires_grad, name_
        torch.testing.assert_close(got.cpu()[valid].double(), want[valid], rtol=1e-5, atol=1e-6, msg=name_)
        assert bool((got.cpu()[~valid] == 0).all())
    if kind == "lco":
        p_i = logp.exp()
        rho = torch.where(adv.cpu() > 0, 1.8, 0.9).double()
        torch.testing.assert_close(stats.target_prob.cpu()[valid].double(), (rho * p_i).clamp(max=1)[valid],
                                   rtol=1e-5, atol=1e-7)
        assert torch.equal(stats.clamped.cpu()[valid].bool(), (rho * p_i >= 1)[valid])
    else:
        assert stats.target_prob is None and stats.clamped is None
    if extra.get("old"):
        ratio = torch.exp(logp - old.cpu().double())
        if kind == "cispo":
            expected = (ratio > 1 + extra["epsilon_high"]) | (ratio < 1 - (extra["epsilon_low"] or 1.0))
        elif kind == "dppo":
            _, expected = reference.policy.dppo_token_loss(logp, old.cpu().double(), adv.cpu().double(),
                                                           extra["divergence"], extra["delta_low"],
                                                           extra["delta_high"], extra["clip_ratio_c"])
        elif kind in ("sapo", "dro"):   # nothing clips
            assert stats.clipped is None
            return
        elif kind == "ppo":
            _, expected = reference.policy.ppo_token_loss(logp, old.cpu().double(), adv.cpu().double(),
                                                          extra.get("epsilon_low", 0.2),
                                                          extra.get("epsilon_high", 0.2), extra.get("dual_clip"))
        else:
            a = adv.cpu()
            expected = ((a > 0) & (ratio > 1.2)) | ((a < 0) & (ratio < 0.8))
        assert torch.equal(stats.clipped.cpu()[valid].bool(), expected[valid])
    else:
        assert stats.clipped is None


def test_grpo_kl_needs_reference_logprobs():
    logits, labels, adv = make_inputs((4,), 50)
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo_loss(logits, labels, adv, torch.zeros(4), beta=0.1)


def _keyword_options(fn):
    return {name: p.default for name, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY}


def test_public_signatures_follow_the_registry():
    """Each public per-token loss takes exactly the shared options (those of ``sft_loss``) plus its
    registry options (``LossInfo.options``), with the registry's default reduction and ``LossSpec``'s
    defaults for its hyperparameters (or None / no default: "off" or required); ``fused_linear_policy_loss``
    takes every option of every loss. So the explicit signatures cannot drift from the table."""
    shared = _keyword_options(lco_kernels.sft_loss)
    spec_defaults = {f.name: f.default for f in dataclasses.fields(LossSpec)}
    for name, info in LOSSES.items():
        options = _keyword_options(getattr(lco_kernels, f"{name}_loss"))
        assert set(options) == set(shared) | set(info.options), name
        assert options.pop("reduction") == info.reduction, name
        for option, default in options.items():
            if option == "divergence":
                assert DIVERGENCES[default] == spec_defaults[option]
            elif option in info.hyperparameters and default not in (None, inspect.Parameter.empty):
                assert default == spec_defaults[option], (name, option)
            elif option in shared:
                assert default == shared[option], (name, option)
    linear = _keyword_options(lco_kernels.fused_linear_policy_loss)
    assert set().union(*(info.options for info in LOSSES.values())) <= set(linear)
