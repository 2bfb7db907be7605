"""Fused linear + loss against the unfused float64 reference: loss, grad_hidden, grad_weight, grad_bias."""
import json
import os
import subprocess
import sys

import pytest
import torch

import reference
from helpers import BACKENDS
from lco_kernels import LinearLCOLoss, fused_linear_lco_loss, fused_linear_policy_loss
from lco_kernels.registry import LOSSES
from lco_kernels.fused_linear import default_chunk_size
from lco_kernels.reductions import REDUCTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def linear_inputs(shape, H, V, dtype, device, bias=True):
    hidden = torch.randn(*shape, H).to(dtype).to(device)
    weight = (torch.randn(V, H) * 2 / H ** 0.5).to(dtype).to(device)
    b = (torch.randn(V) * 0.5).to(dtype).to(device) if bias else None
    labels = torch.randint(0, V, shape)
    labels[torch.rand(shape) < 0.15] = -100
    adv = torch.randn(shape)
    adv[torch.rand(shape) < 0.1] = 0.0
    return hidden, weight, b, labels.to(device), adv.to(device)


def reference_grads(kind, hidden, weight, bias, labels, adv, reduction, grad_output, **kw):
    leaves = [t.detach().cpu().double().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    h, w, b = leaves
    logits = h @ w.t() + (b if b is not None else 0.0)
    old = kw.pop("old_logprobs", None)
    _, loss = reference.policy_loss_reference(kind, logits, labels.cpu(), None if kind == "sft" else adv.cpu(),
                                              None if old is None else old.cpu(), reduction=reduction, **kw)
    loss.backward(grad_output.double().cpu())
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


def check(ours, ref, dtype, what):
    if dtype == torch.float32:
        torch.testing.assert_close(ours.double().cpu(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()), msg=what)
    else:  # bf16 logits: every logit carries one bf16 rounding of the projection
        torch.testing.assert_close(ours.double().cpu(), ref, rtol=3e-2, atol=2e-2 * float(ref.abs().max()), msg=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [64, 3])   # one chunk (N < chunk) and several, N not a multiple
def test_parity_every_reduction(backend, dtype, chunk_size, device):
    hidden, weight, bias, labels, adv = linear_inputs((2, 5), 24, 301, dtype, device)
    for reduction in REDUCTIONS:
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        loss = fused_linear_lco_loss(h, w, labels, adv, bias=b, reduction=reduction, chunk_size=chunk_size,
                                     backend=backend, max_length=6)
        grad_output = torch.randn(loss.shape, device=device) if reduction == "none" else torch.tensor(-1.7, device=device)
        loss.backward(grad_output)
        ref_loss, (gh, gw, gb) = reference_grads("lco", hidden, weight, bias, labels, adv, reduction, grad_output,
                                                 max_length=6)
        check(loss.detach(), ref_loss, dtype, f"loss {reduction}")
        check(h.grad, gh, dtype, f"grad_hidden {reduction}")
        check(w.grad, gw, dtype, f"grad_weight {reduction}")
        check(b.grad, gb, dtype, f"grad_bias {reduction}")
        assert h.grad.dtype == dtype and w.grad.dtype == dtype and b.grad.dtype == dtype


# options beside the defaults: DRO's required β, DPPO's other divergence
OPTIONS = {"dro": {"dro_beta": 0.4}, "dppo": {"divergence": "kl", "delta_high": 0.05}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", sorted(set(LOSSES) - {"lco"}))
def test_other_losses(backend, loss, device):
    hidden, weight, _, labels, adv = linear_inputs((7,), 16, 129, torch.float32, device, bias=False)
    with torch.no_grad():
        logp = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    old = (logp + 0.3 * torch.randn(7, dtype=torch.float64, device=device)).float()
    kw = {"old_logprobs": old} if LOSSES[loss].old_logprobs == "required" else {}
    kw.update(OPTIONS.get(loss, {}))
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = fused_linear_policy_loss(h, w, labels, None if loss == "sft" else adv, loss=loss, chunk_size=2,
                                   backend=backend, **kw)
    out.backward()
    ref_loss, (gh, gw, _) = reference_grads(loss, hidden, weight, None, labels, adv, "mean", torch.tensor(1.0), **kw)
    check(out.detach(), ref_loss, torch.float32, "loss")
    check(h.grad, gh, torch.float32, "grad_hidden")
    check(w.grad, gw, torch.float32, "grad_weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_and_module(backend, device):
    hidden, weight, bias, labels, adv = linear_inputs((3, 4), 8, 97, torch.float32, device)
    loss, stats = fused_linear_lco_loss(hidden, weight, labels, adv, bias=bias, chunk_size=5, return_stats=True,
                                        backend=backend)
    logits = hidden @ weight.t() + bias
    from lco_kernels import lco_loss
    loss2, stats2 = lco_loss(logits, labels, adv, return_stats=True, backend=backend)
    torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-7)
    for name in ("logprobs", "entropy", "logit_grad_norm", "target_prob", "clamped"):
        torch.testing.assert_close(getattr(stats, name), getattr(stats2, name), rtol=1e-4, atol=1e-6, msg=name)
    module = LinearLCOLoss(reduction="sum", chunk_size=5, backend=backend)
    torch.testing.assert_close(module(hidden, weight, labels, adv, bias=bias),
                               fused_linear_lco_loss(hidden, weight, labels, adv, bias=bias, reduction="sum",
                                                     chunk_size=5, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])  # gradients formed in the forward / in the backward op
def test_frozen_lm_head(backend, reduction, device):
    """A frozen LM head (PEFT): only grad_hidden is formed (no V×H accumulator) and it equals the
    reference; the frozen weight and bias get no gradient."""
    hidden, weight, bias, labels, adv = linear_inputs((2, 5), 16, 129, torch.float32, device)
    h = hidden.clone().requires_grad_(True)
    loss = fused_linear_lco_loss(h, weight, labels, adv, bias=bias, reduction=reduction, chunk_size=3,
                                 backend=backend)
    grad_output = torch.randn(loss.shape, device=device) if reduction == "none" else torch.tensor(0.7, device=device)
    loss.backward(grad_output)
    ref_loss, (gh, _, _) = reference_grads("lco", hidden, weight, bias, labels, adv, reduction, grad_output)
    check(loss.detach(), ref_loss, torch.float32, "loss")
    check(h.grad, gh, torch.float32, "grad_hidden")
    assert weight.grad is None and bias.grad is None


def test_eager_gradients_are_handed_out_once():
    hidden, weight, _, labels, adv = linear_inputs((4,), 8, 33, torch.float32, "cpu", bias=False)
    h = hidden.clone().requires_grad_(True)
    loss = fused_linear_lco_loss(h, weight, labels, adv)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        loss.backward()


def test_default_chunk_size():
    assert default_chunk_size(4096, 1024, 65536, 4) == 256         # a chunk as big as a quarter of the weight
    assert default_chunk_size(65536, 1024, 65536, 4) == 1024       # ... or as hidden, when that is larger
    assert default_chunk_size(16384, 4096, 151936, 2) == 883       # capped at 256 MiB of logits
    assert default_chunk_size(10, 8, 100, 4) == 10                  # never more than N
    assert default_chunk_size(1 << 20, 8192, 32000, 4) * 32000 * 4 <= 1 << 28   # at most 256 MiB of logits


def test_bad_input():
    hidden, weight, bias, labels, adv = linear_inputs((4,), 8, 33, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight"):
        fused_linear_lco_loss(hidden, weight[:, :5], labels, adv)
    with pytest.raises(ValueError, match="bfloat16 and float16"):  # mixed dtypes need a lower precision
        fused_linear_lco_loss(hidden.bfloat16(), weight.half(), labels, adv)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_lco_loss(hidden, weight, labels, adv, bias=bias[:3])
    with pytest.raises(ValueError, match="labels"):
        fused_linear_lco_loss(hidden, weight, labels[:2], adv)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_lco_loss(hidden, weight, labels, adv, chunk_size=0)
    with pytest.raises(ValueError, match="loss"):
        fused_linear_policy_loss(hidden, weight, labels, adv, loss="dpo")
    for name in ("gspo", "geo_mean", "vespo", "clip_cov", "kl_cov", "bypass_mode"):  # they have their own form
        with pytest.raises(ValueError, match=rf"loss='{name}' .* lco_kernels\.fused_linear_{name}_loss\(hidden"):
            fused_linear_policy_loss(hidden, weight, labels, adv, loss=name)
    with pytest.raises(ValueError, match="old_logprobs"):
        fused_linear_policy_loss(hidden, weight, labels, adv, loss="ppo")


def _peak_extra(variant):
    out = subprocess.run([sys.executable, "-m", "bench.memory_worker", variant, "4096", "65536", "float32", "cpu",
                          "1024"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")
def test_fused_peak_memory_is_under_a_quarter_of_unfused():
    """(N, H, V) = (4096, 1024, 65536) fp32, one forward + backward in a fresh process each."""
    fused, unfused = _peak_extra("fused-linear"), _peak_extra("unfused-linear")
    print(f"peak extra memory: fused {fused / 2**20:.0f} MiB, unfused {unfused / 2**20:.0f} MiB, "
          f"ratio {fused / unfused:.3f}")
    assert fused <= unfused / 4
