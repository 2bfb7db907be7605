"""``python -m bench.precision [--rows N] [--json]``: the worst error at large logits, in units of
SPEC §4's tolerance, for both backends.

* common offset: z = c + 2·randn(rows, 1000) in fp32, c ∈ {1e3, 3e3, 1e4}, labels drawn from the
  policy, Ψ = 2·randn, old log-probs = log p_i + 0.3·randn; every loss, reduction="none";
* lead: z = [d, 0], label 0, LCO with Ψ = −1 (the two-outcome KL's cancellation) and Ψ = +1,
  d ∈ {1e3, 1e4}.

Error in units of tolerance: max over elements of |ours − ref| / (atol + rtol·|ref|) with SPEC §4's
fp32 rule (rtol = 1e-5, atol = 1e-6·max|Ψ|; 1e-6 for SFT), separately for the loss and the gradient;
≤ 1 is within tolerance. The references are float64 on the same fp32 inputs: ``reference.
policy_loss_reference`` (log_softmax, autograd) and, for LCO, ``reference.lco_rows_closed_form``.
On a CPU-only machine the Triton kernels run in the interpreter (TRITON_INTERPRET=1 is set here).
"""
import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import reference  # noqa: E402
from lco_kernels import cispo_loss, lco_loss, pg_loss, ppo_loss, sft_loss  # noqa: E402

BACKENDS = ("torch", "triton")
OFFSETS = (1e3, 3e3, 1e4)
LEADS = (1e3, 1e4)
LOSSES = ("sft", "pg", "ppo", "cispo", "lco")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _call(loss, backend, z, labels, adv, old):
    kw = dict(reduction="none", backend=backend)
    if loss == "sft":
        return sft_loss(z, labels, **kw)
    if loss == "pg":
        return pg_loss(z, labels, adv, **kw)
    if loss == "ppo":
        return ppo_loss(z, labels, adv, old, **kw)
    if loss == "cispo":
        return cispo_loss(z, labels, adv, old, **kw)
    return lco_loss(z, labels, adv, **kw)


def _reference(loss, z, labels, adv, old):
    """float64 (per-row loss, gradient) on the same inputs."""
    z64 = z.detach().double().cpu()
    labels, adv, old = labels.cpu(), adv.double().cpu(), old.double().cpu()
    if loss == "lco":
        return reference.lco_rows_closed_form(z64, labels, adv)
    z64.requires_grad_(True)
    mat, _ = reference.policy_loss_reference(loss, z64, labels, None if loss == "sft" else adv,
                                             old if loss in ("ppo", "cispo") else None, reduction="none")
    (grad,) = torch.autograd.grad(mat.sum(), z64)
    return mat.detach(), grad


def error_ratio(actual, expected, atol, rtol=1e-5):
    """max |actual − expected| / (atol + rtol·|expected|): the error in units of tolerance."""
    actual, expected = actual.detach().double().cpu(), expected.double()
    return float(((actual - expected).abs() / (atol + rtol * expected.abs())).max())


def measure(loss, backend, z, labels, adv, old):
    """(loss error, gradient error) in units of SPEC tolerance, reduction="none", unit upstream gradient."""
    x = z.clone().requires_grad_(True)
    out = _call(loss, backend, x, labels, adv, old)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    ref_loss, ref_grad = _reference(loss, z, labels, adv, old)
    atol = 1e-6 * (1.0 if loss == "sft" else float(adv.abs().max()))
    return error_ratio(out, ref_loss, atol), error_ratio(grad, ref_grad, atol)


def offset_inputs(c, rows=32, V=1000, seed=0):
    """z = c + 2·randn (fp32), labels drawn from the policy, Ψ = 2·randn, old = log p_i + 0.3·randn."""
    g = torch.Generator().manual_seed(seed)
    noise = 2 * torch.randn(rows, V, generator=g, dtype=torch.float64)
    z = (c + noise).float()
    labels = torch.multinomial(torch.softmax(noise, -1), 1, generator=g)[:, 0]
    adv = (2 * torch.randn(rows, generator=g)).float()
    logp = reference.token_logprobs(z.double(), labels, -100)
    old = (logp + 0.3 * torch.randn(rows, generator=g, dtype=torch.float64)).float()
    return z.to(DEVICE), labels.to(DEVICE), adv.to(DEVICE), old.to(DEVICE)


def lead_inputs(d, sign):
    """z = [d, 0], label 0, Ψ = sign: log p_i ≈ −e^{−d}, log(1 − p_i) ≈ −d."""
    z = torch.tensor([[d, 0.0]], dtype=torch.float32, device=DEVICE)
    return z, torch.tensor([0], device=DEVICE), torch.tensor([sign], device=DEVICE), torch.zeros(1, device=DEVICE)


def run(rows=32):
    """Records {case, loss, backend, loss_err, grad_err} for every case of the module docstring."""
    records = []
    for c in OFFSETS:
        inputs = offset_inputs(c, rows)
        for loss in LOSSES:
            for backend in BACKENDS:
                le, ge = measure(loss, backend, *inputs)
                records.append(dict(case=f"offset c={c:g}", loss=loss, backend=backend, loss_err=le, grad_err=ge))
    for d in LEADS:
        for sign in (-1.0, 1.0):
            for backend in BACKENDS:
                le, ge = measure("lco", backend, *lead_inputs(d, sign))
                records.append(dict(case=f"lead d={d:g}, Ψ={sign:+g}", loss="lco", backend=backend, loss_err=le,
                                    grad_err=ge))
    return records


def table(records):
    """Markdown: one line per (case, loss), torch and triton side by side; the worst per case last."""
    lines = ["| case | loss | torch: loss err | torch: grad err | triton: loss err | triton: grad err |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    keys = list(dict.fromkeys((r["case"], r["loss"]) for r in records))
    by = {(r["case"], r["loss"], r["backend"]): r for r in records}
    for case, loss in keys:
        cells = [f"{by[case, loss, b][k]:.2f}" for b in BACKENDS for k in ("loss_err", "grad_err")]
        lines.append(f"| {case} | {loss} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| case | worst error (× tolerance), both backends, loss and gradient |")
    lines.append("| --- | ---: |")
    for case in dict.fromkeys(r["case"] for r in records):
        worst = max(max(r["loss_err"], r["grad_err"]) for r in records if r["case"] == case)
        lines.append(f"| {case} | {worst:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="rows per common-offset case (default 32)")
    parser.add_argument("--json", action="store_true", help="print the records as JSON instead of tables")
    args = parser.parse_args(argv)
    records = run(args.rows)
    print(json.dumps(records, indent=1) if args.json else table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
