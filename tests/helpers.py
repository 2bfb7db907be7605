"""Input generators and SPEC §4 tolerances shared by the tests."""
import torch

import reference

BACKENDS = ("torch", "triton")

GRAD_ATOL_FACTOR = {torch.bfloat16: 8e-3, torch.float16: 1e-3}  # × the largest reference element
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}


def make_inputs(shape, V, dtype=torch.float32, device="cpu", scale=3.0, adv_shape=None, ignore_frac=0.1,
                ignore_index=-100, zero_adv_frac=0.1):
    """Random logits (already rounded to ``dtype``), labels with some ignored, mixed-sign advantages
    with some exact zeros. Labels favour likely tokens so that clamped (ρ·p_i ≥ 1) rows appear."""
    logits = (torch.randn(*shape, V, dtype=torch.float64) * scale).to(dtype)
    probs = torch.softmax(logits.double() * 1.5, dim=-1).reshape(-1, V)
    labels = torch.multinomial(probs, 1).reshape(shape)
    labels[torch.rand(shape) < ignore_frac] = ignore_index
    adv_shape = shape if adv_shape is None else adv_shape
    advantages = torch.randn(adv_shape) * 2
    advantages[torch.rand(adv_shape) < zero_adv_frac] = 0.0
    return logits.to(device), labels.to(device), advantages.to(device)


def reference_loss_and_grad(logits, labels, advantages, reduction="mean", grad_output=None, **kw):
    """Literal float64 reference on the same rounded inputs: (loss, d loss / d logits)."""
    z = logits.detach().double().cpu().requires_grad_(True)
    loss = reference.lco_loss_reference(z, labels.cpu(), advantages.cpu(), reduction=reduction, **kw)
    g = torch.ones_like(loss) if grad_output is None else grad_output.double().cpu()
    (grad,) = torch.autograd.grad(loss, z, g)
    return loss.detach(), grad


def assert_loss_close(actual, expected, advantages):
    atol = 1e-6 * float(advantages.abs().max().clamp(min=1e-30))
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=1e-5, atol=atol, equal_nan=True)


def assert_grad_close(actual, expected, advantages, dtype):
    if dtype == torch.float32:
        atol = 1e-6 * float(advantages.abs().max().clamp(min=1e-30))
    else:
        atol = GRAD_ATOL_FACTOR[dtype] * float(expected.abs().max())
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=GRAD_RTOL[dtype], atol=atol,
                               equal_nan=True)


def spawn(tmp_path, world, *cases):
    """Run the (function name, args) ``cases`` of tp_worker.run_cases ("module:function" for another worker
    module) on ``world`` gloo ranks in fresh processes (one process start per rank costs seconds: each
    spawn runs many cases); a failing rank re-raises here."""
    import torch.multiprocessing as mp

    import tp_worker
    mp.spawn(tp_worker.run_cases, args=(world, f"file://{tmp_path}/rendezvous", list(cases)), nprocs=world, join=True)
