"""Regression tests for six reported defects (items 1-6), each with its original repro call.

1. NaN (and +inf logits, non-finite advantages / old / reference log-probs) → that row's loss and
   whole gradient row NaN, every loss, both backends; other rows unchanged.
2. inplace_backward into logits whose memory overlaps itself → ValueError naming it.
3. Double backward (create_graph=True, a Hessian-vector product) → a clear error, never a silent
   first-order answer.
4. Precision at large logits: common offsets up to 1e4 and leads up to 6e4 within SPEC tolerance
   (measured by bench/precision.py, which prints the same figures).
5. Inputs that must be refused, with errors naming the argument.
6. The stats stores' offsets are 64-bit (N ≥ 429,496,730 rows cannot run here: the kernel's IR is read).
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import reference
from bench.precision import lead_inputs, measure, offset_inputs
from helpers import BACKENDS
from lco_kernels import (LinearLCOLoss, cispo_loss, fused_linear_lco_loss, lco_loss, lco_loss_from_logprobs,
                         pg_loss, ppo_loss, sft_loss)

NAN, INF = math.nan, math.inf


def loss_and_grad(fn, logits, *args, **kw):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, *args, reduction="none", **kw)
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    return loss.detach(), grad


# ------------------------------------------------------------------------------------------ item 1

@pytest.mark.parametrize("backend", BACKENDS)
def test_item1_issue_repro_nan_logit_ppo(backend):
    """The reported call: torch gave NaN loss with a zero gradient, Triton −2.06e-9 and a zero gradient."""
    loss, grad = loss_and_grad(ppo_loss, torch.tensor([[0.5, NAN, -1.0]]), torch.tensor([0]), torch.tensor([1.0]),
                               torch.tensor([-1.0]), backend=backend)
    assert loss.isnan().all() and grad.isnan().all(), (loss, grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ppo", "cispo", "ppo+lco"])
def test_item1_issue_repro_nan_old_logprobs(name, backend):
    """NaN old log-probs: PPO gave −2.06e-9 on Triton, CISPO 0.81 with a finite gradient, PPO+LCO
    took the token as unclipped on both backends."""
    z, y, a, old = torch.tensor([[0.5, 0.2, -1.0]]), torch.tensor([0]), torch.tensor([1.0]), torch.tensor([NAN])
    if name == "ppo+lco":
        loss, grad = loss_and_grad(lco_loss, z, y, a, old_logprobs=old, backend=backend)
    else:
        loss, grad = loss_and_grad({"ppo": ppo_loss, "cispo": cispo_loss}[name], z, y, a, old, backend=backend)
    assert loss.isnan().all() and grad.isnan().all(), (loss, grad)


# (name, call(logits, labels, adv, old, ref, **kw)): every loss and head variant
LOSSES = {
    "sft": lambda z, y, a, o, r, **k: sft_loss(z, y, **k),
    "pg": lambda z, y, a, o, r, **k: pg_loss(z, y, a, **k),
    "ppo": lambda z, y, a, o, r, **k: ppo_loss(z, y, a, o, **k),
    "ppo-dual-kl": lambda z, y, a, o, r, **k: ppo_loss(z, y, a, o, dual_clip=3.0, ref_logprobs=r, beta=0.1, **k),
    "cispo": lambda z, y, a, o, r, **k: cispo_loss(z, y, a, o, **k),
    "lco": lambda z, y, a, o, r, **k: lco_loss(z, y, a, **k),
    "ppo+lco": lambda z, y, a, o, r, **k: lco_loss(z, y, a, old_logprobs=o, **k),
}
READS = {"sft": "z", "pg": "za", "ppo": "zao", "ppo-dual-kl": "zaor", "cispo": "zao", "lco": "za", "ppo+lco": "zao"}
# (poison, which input it is in, value): NaN anywhere, +inf logits (at and off the label), ±inf
# advantages and NaN old / reference log-probs make the row NaN (README, "Degenerate rows")
POISONS = [("logit nan", "z", NAN), ("label logit nan", "zi", NAN), ("logit +inf", "z", INF),
           ("label logit +inf", "zi", INF), ("adv nan", "a", NAN), ("adv +inf", "a", INF), ("adv -inf", "a", -INF),
           ("old nan", "o", NAN), ("ref nan", "r", NAN)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_item1_poisoned_rows_are_nan_and_stay_in_their_row(name, backend):
    """Rows 0-3 each poisoned in turn with every poison the loss reads; row 0 also has Ψ = 0 and
    row 1 a token PPO clips (neither may hide the NaN); rows 4-5 clean must not change."""
    V = 37
    z = torch.randn(6, V) * 2
    y = torch.randint(0, V, (6,))
    a = torch.randn(6) * 2
    a[0] = 0.0
    logp = reference.token_logprobs(z.double(), y, -100).float()
    old, ref = logp + 0.3 * torch.randn(6), logp + 0.3 * torch.randn(6)
    old[1] = logp[1] - 3.0 * math.copysign(1.0, a[1])   # the ratio is far outside the clip range
    call = LOSSES[name]
    clean_loss, clean_grad = loss_and_grad(call, z, y, a, old, ref, backend=backend)
    for poison, where, value in POISONS:
        if where[0] not in READS[name]:
            continue
        for row in range(4):
            pz, pa, po, pr = z.clone(), a.clone(), old.clone(), ref.clone()
            if where == "z":
                pz[row, (int(y[row]) + 1 + row) % V] = value
            elif where == "zi":
                pz[row, y[row]] = value
            else:
                {"a": pa, "o": po, "r": pr}[where][row] = value
            loss, grad = loss_and_grad(call, pz, y, pa, po, pr, backend=backend)
            assert loss[row].isnan() and grad[row].isnan().all(), \
                f"{poison} in row {row}: loss {loss[row].item()}, {int((~grad[row].isnan()).sum())} non-NaN grads"
            others = torch.arange(6) != row
            assert torch.equal(loss[others], clean_loss[others]) and torch.equal(grad[others], clean_grad[others]), \
                f"{poison} in row {row} changed another row"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ppo", "ppo-dual-kl", "cispo", "ppo+lco"])
def test_item1_infinite_old_and_ref_logprobs_are_values(name, backend):
    """±inf old / reference log-probs are not poison: verl's clamps make them finite (PPO's ratio
    e^{±20}, k3's x clamped at ±20), CISPO's weight is min(r, 1 + ε), PPO+LCO's mask compares r; the
    result is the float64 reference's."""
    z = torch.randn(4, 9) * 2
    y = torch.randint(0, 9, (4,))
    a = torch.tensor([1.3, -0.8, 0.6, -2.0])
    old = torch.tensor([INF, INF, -INF, -INF])
    ref = torch.tensor([-INF, INF, INF, -INF])
    loss, grad = loss_and_grad(LOSSES[name], z, y, a, old, ref, backend=backend)
    x = z.double().requires_grad_(True)
    kind, kw = {"ppo": ("ppo", {}), "ppo-dual-kl": ("ppo", dict(dual_clip=3.0, ref_logprobs=ref.double(), beta=0.1)),
                "cispo": ("cispo", {}), "ppo+lco": ("lco", {})}[name]
    ref_loss, _ = reference.policy_loss_reference(kind, x, y, a.double(), old.double(), reduction="none", **kw)
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), x)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (loss, grad)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6 * 2)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6 * 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_item1_ignored_rows_stay_zero_whatever_they_hold(backend):
    z = torch.randn(3, 11)
    z[0, 2], z[1, 3] = NAN, INF
    y = torch.tensor([-100, -100, 4])
    a = torch.tensor([NAN, -INF, 1.0])
    old = torch.tensor([NAN, INF, -1.0])
    for name, call in LOSSES.items():
        loss, grad = loss_and_grad(call, z, y, a, old, old, backend=backend)
        assert torch.equal(loss[:2], torch.zeros(2)) and torch.equal(grad[:2], torch.zeros(2, 11)), name
        assert torch.isfinite(loss[2]) and torch.isfinite(grad[2]).all(), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_item1_neg_inf_logits_are_ordinary(backend):
    """−inf logits are masks, not poison: finite loss and gradient, and exact zeros there."""
    z = torch.randn(2, 9)
    z[0, 1:5] = -INF
    z[1, :] = -INF
    z[1, 3] = 0.5                                    # only the label is finite
    y = torch.tensor([0, 3])
    a = torch.tensor([1.5, -0.7])
    for name, call in LOSSES.items():
        old = reference.token_logprobs(z.double(), y, -100).float() + 0.1
        loss, grad = loss_and_grad(call, z, y, a, old, old, backend=backend)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), name
        assert torch.equal(grad[0, 1:5], torch.zeros(4)) and torch.equal(grad[1], torch.zeros(9)), name


# ------------------------------------------------------------------------------------------ item 2

@pytest.mark.parametrize("backend", BACKENDS)
def test_item2_inplace_backward_refuses_self_overlapping_logits(backend):
    """The reported call: an expanded view gave a wrong gradient (error 0.16-0.48 vs |grad| ≈ 0.15)."""
    b = torch.randn(3, 11, requires_grad=True)
    y, a = torch.randint(0, 11, (4, 3)), torch.randn(4, 3)
    with pytest.raises(ValueError, match="inplace_backward"):
        lco_loss((b * 1.).expand(4, 3, 11), y, a, reduction="sum", inplace_backward=True, backend=backend).backward()
    # the same logits out of place are fine: the gradient of the expanded view sums over the copies
    lco_loss((b * 1.).expand(4, 3, 11), y, a, reduction="sum", backend=backend).backward()
    z = b.detach().expand(4, 3, 11).clone().requires_grad_(True)
    lco_loss(z, y, a, reduction="sum", backend="torch").backward()
    torch.testing.assert_close(b.grad, z.grad.sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_item2_inplace_backward_refuses_overlapping_as_strided(backend):
    """Rows 3 elements apart in a 11-wide vocabulary: gave inf on torch."""
    base = (torch.randn(40, requires_grad=True) * 1.)
    z = base.as_strided((4, 11), (3, 1))
    with pytest.raises(ValueError, match="inplace_backward"):
        lco_loss(z, torch.randint(0, 11, (4,)), torch.randn(4), inplace_backward=True, backend=backend).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_item2_inplace_backward_still_takes_strided_views_that_do_not_overlap(backend):
    logits = torch.randn(2, 5, 13)
    view = logits[:, :-1, :]                          # rows 13 apart, one row skipped per sequence
    y, a = torch.randint(0, 13, (2, 4)), torch.randn(2, 4)
    x = view.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(lco_loss(x, y, a, backend=backend), x)
    leaf = logits.clone().requires_grad_(True)
    inner = leaf * 1.                                 # a non-leaf whose storage the gradient may take
    lco_loss(inner[:, :-1, :], y, a, inplace_backward=True, backend=backend).backward()
    torch.testing.assert_close(leaf.grad[:, :-1, :], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(leaf.grad[:, -1, :], torch.zeros(2, 13))


# ------------------------------------------------------------------------------------------ item 3

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_item3_double_backward_is_refused(name, backend):
    """A Hessian-vector product through the loss raises (torch: an unclear sub(out=) error; Triton:
    a gradient without a graph, so H·v was silently dropped)."""
    z = torch.randn(3, 11, requires_grad=True)
    y, a = torch.randint(0, 11, (3,)), torch.randn(3)
    old = reference.token_logprobs(z.detach().double(), y, -100).float() + 0.1
    for other_term in (0.0, 0.5 * (z ** 2).sum()):   # with a second-order term beside it, H·v was silently
        with pytest.raises(RuntimeError, match=r"(?i)second derivative"):   # only that term's
            loss = LOSSES[name](z, y, a, old, old, backend=backend).sum() + other_term
            (g,) = torch.autograd.grad(loss, z, create_graph=True)
            torch.autograd.grad((g * torch.randn_like(g)).sum(), z)
    (g,) = torch.autograd.grad(LOSSES[name](z, y, a, old, old, backend=backend).sum(), z)   # first order still works
    assert torch.isfinite(g).all()


def test_item3_fused_linear_double_backward_is_refused():
    h, w = torch.randn(3, 4, requires_grad=True), torch.randn(11, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"(?i)second derivative"):
        torch.autograd.grad(fused_linear_lco_loss(h, w, torch.randint(0, 11, (3,)), torch.randn(3)), h,
                            create_graph=True)


# ------------------------------------------------------------------------------------------ item 4

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [1e3, 3e3, 1e4, -1e4])
@pytest.mark.parametrize("loss", ["sft", "pg", "ppo", "cispo", "lco"])
def test_item4_common_offset_within_tolerance(loss, c, backend):
    """z = c + 2·randn, V = 1000, fp32: the error was 2.9-5.5× tolerance at c = 3e3, up to 40× at 1e4."""
    loss_err, grad_err = measure(loss, backend, *offset_inputs(c, rows=8, seed=int(abs(c))))
    assert loss_err <= 1 and grad_err <= 1, f"loss {loss_err:.2f}×, gradient {grad_err:.2f}× tolerance"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sign", [-1.0, 1.0])
@pytest.mark.parametrize("d", [1e3, 1e4, 6e4, 1e6])
def test_item4_large_lead_within_tolerance(d, sign, backend):
    """z = [d, 0], LCO: with Ψ < 0 the loss ≈ 0.1·d lost digits in the head (2.7e-5 relative at d = 1e3)."""
    loss_err, grad_err = measure("lco", backend, *lead_inputs(d, sign))
    assert loss_err <= 1 and grad_err <= 1, f"loss {loss_err:.2f}×, gradient {grad_err:.2f}× tolerance"


# ------------------------------------------------------------------------------------------ item 5

def _z_y_a():
    return torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3)), torch.randn(2, 3)


@pytest.mark.parametrize("name", ["pg", "ppo", "cispo", "lco"])
def test_item5_advantages_none_is_refused(name):
    """``pg_loss(z, y, None)`` equalled ``sft_loss``: Ψ = 1 taken silently."""
    z, y, _ = _z_y_a()
    old = torch.zeros(2, 3)
    call = {"pg": lambda: pg_loss(z, y, None), "ppo": lambda: ppo_loss(z, y, None, old),
            "cispo": lambda: cispo_loss(z, y, None, old), "lco": lambda: lco_loss(z, y, None)}[name]
    with pytest.raises((ValueError, TypeError), match="advantages"):
        call()


def test_item5_bool_advantages_are_refused():
    z, y, a = _z_y_a()
    with pytest.raises(TypeError, match="advantages"):
        lco_loss(z, y, a > 0)


def test_item5_linear_module_checks_chunk_size_at_construction():
    with pytest.raises(ValueError, match="chunk_size"):
        LinearLCOLoss(chunk_size=0)


def test_item5_logprob_form_refuses_positive_logprobs():
    with pytest.raises(ValueError, match="logprobs"):
        lco_loss_from_logprobs(torch.tensor([0.5, -1.0]), torch.tensor([1.0, -1.0]))


def test_item5_fused_linear_refuses_0dim_hidden():
    """Raised an IndexError from inside an f-string."""
    with pytest.raises((ValueError, TypeError), match="hidden"):
        fused_linear_lco_loss(torch.tensor(1.0), torch.randn(7, 1), torch.tensor(0), torch.tensor(1.0))


def test_item5_huge_ignore_index_is_refused():
    """Raised OverflowError."""
    z, y, a = _z_y_a()
    with pytest.raises(ValueError, match="ignore_index"):
        lco_loss(z, y, a, ignore_index=2 ** 70)


def test_item5_meta_tensors_give_a_clear_answer():
    """Raised "Tensor.item() cannot be called on meta tensors": either a meta result of the right
    shape (shape propagation) or an error that says meta tensors are not supported."""
    z, y, a = (t.to("meta") for t in _z_y_a())
    try:
        out = lco_loss(z, y, a, reduction="none")
    except (ValueError, TypeError, NotImplementedError) as e:
        assert "meta" in str(e), str(e)
    else:
        assert out.device.type == "meta" and out.shape == y.shape


# ------------------------------------------------------------------------------------------ item 6

_TTIR_SCRIPT = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lco_kernels import triton_backend as tb
from lco_kernels.diagnostics import aot
head = next(h for h in aot.heads() if h.name == "ppo+old+dual+k3").constexprs()
configs = [("_forward_kernel", dict(head, NEED_ENTROPY=True, WITH_STATS=True, MODE=mode))
           for mode in (tb.FUSED, tb.SWEEP, tb.HEAD)] + [("_backward_kernel", dict(HAS_ENTROPY=True))]
out = []
for name, consts in configs:
    kernel = getattr(tb, name)
    src = ASTSource(fn=kernel, signature=aot._signature(kernel, "*fp32"), constexprs=dict(consts, BLOCK_V=1024),
                    attrs={})
    out.append(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ttir"])
print(json.dumps(out))
"""


def test_item6_stats_offsets_are_64_bit():
    """``stats_row + k * N`` was i32 arithmetic: out of bounds from N ≥ 429,496,730 rows. Every scalar
    pointer offset in the forward kernel (stats on; fused, sweep-only and head-only) and the backward
    kernel must be i64 or a constant."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _TTIR_SCRIPT], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    narrow, n_offsets = [], 0
    for ttir in json.loads(out.stdout.strip().splitlines()[-1]):   # one kernel each: SSA names are unique
        constants = set(re.findall(r"(%[\w.]+) = arith\.constant ", ttir))
        offsets = re.findall(r"tt\.addptr %[\w.]+, (%[\w.]+) : !tt\.ptr<\w+>, (i\d+)", ttir)
        n_offsets += len(offsets)
        narrow += [name for name, ty in offsets if ty != "i64" and name not in constants]
    assert n_offsets, "no scalar pointer arithmetic found: the pattern no longer matches the IR"
    assert not narrow, f"32-bit scalar pointer offsets: {narrow}"
