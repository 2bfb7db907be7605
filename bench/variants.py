"""The implementations the benchmark compares. Each is ``fn(logits, labels, advantages)`` running one
forward + backward of the LCO loss (or, for the Liger anchor, cross-entropy) on leaf ``logits``."""
import torch

import reference
from lco_kernels import lco_loss, sft_loss


def plain_lco(logits, labels, advantages):
    """LCO the way a user writes it in PyTorch: autograd through log_softmax, target detached."""
    return _plain_lco_terms(logits, labels, advantages).mean()


def plain_lco_padded(logits, labels, advantages, ignore_index=-100):
    """``plain_lco`` where some labels are padding, masked as a user masks them: the mean over the others."""
    valid = labels != ignore_index
    terms = _plain_lco_terms(logits, labels.clamp(min=0), advantages)
    return (terms * valid).sum() / valid.sum()


def _plain_lco_terms(logits, labels, advantages, rho_pos=1.8, rho_neg=0.9):
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        rho = torch.where(advantages > 0, rho_pos, rho_neg)
        t = torch.clamp(rho * logp.exp(), max=1.0)
    log_1mp = torch.log1p(-logp.exp())
    kl = (torch.where(t > 0, t * (torch.log(t) - logp), 0.0)
          + torch.where(t < 1, (1 - t) * (torch.log1p(-t) - log_1mp), 0.0))
    return advantages.abs() * kl


_compiled = {}


def compiled(fn):
    """``torch.compile`` of ``fn`` (dynamic shapes), compiled once per process."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def liger_available():
    try:
        import liger_kernel.ops.cross_entropy  # noqa: F401
        return None
    except Exception as e:  # noqa: BLE001 - any import failure means "skip with this reason"
        return f"liger-kernel not importable ({type(e).__name__}: {e}); pip install liger-kernel"


def liger_ce(logits, labels, advantages):
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    out = LigerCrossEntropyFunction.apply(logits, labels, None)
    return out[0] if isinstance(out, tuple) else out


# what each variant is, for the tables' headers (a newcomer reads these before any ratio)
DESCRIPTIONS = {
    "ours": "`lco_loss`, this library (on a CPU its PyTorch backend, on a GPU its Triton kernels)",
    "ours-inplace": "`lco_loss(..., inplace_backward=True)`: the gradient overwrites the logits' memory",
    "ours-sft": "`sft_loss`, this library's cross-entropy (−log p_i per token) on the same fused path",
    "eager": "plain LCO, the paper's formula as a user writes it in PyTorch (`log_softmax`, `gather`, autograd; "
             "`bench.variants.plain_lco`)",
    "torch.compile": "`torch.compile` of plain LCO (dynamic shapes), timed after its compilation",
    "cross-entropy": "`F.cross_entropy(logits, labels)`, PyTorch's fused cross-entropy: the anchor for `sft_loss`",
    "reference": "`reference.lco_loss_reference`, the float64 reference: a correctness anchor, not a competitor",
    "liger-ce": "Liger's fused cross-entropy on the same logits (another loss; a speed anchor)",
}


def make(name, backend, padded=False):
    """fn(logits, labels, advantages) -> loss for a logits-level variant name; ``padded``: the labels hold
    padding (-100), which the plain PyTorch LCO then masks (``plain_lco_padded``; the others take -100 as is)."""
    if name == "ours":
        return lambda z, l, a: lco_loss(z, l, a, backend=backend)
    if name == "ours-inplace":
        # the gradient overwrites the logits: feed a non-leaf view, as logits out of an LM head
        return lambda z, l, a: lco_loss(z.view_as(z), l, a, backend=backend, inplace_backward=True)
    if name == "ours-sft":
        return lambda z, l, a: sft_loss(z, l, backend=backend)
    if name == "cross-entropy":
        return lambda z, l, a: torch.nn.functional.cross_entropy(z, l)
    if name == "reference":
        return lambda z, l, a: reference.lco_loss_reference(z, l, a)
    plain = plain_lco_padded if padded else plain_lco
    if name == "eager":
        return plain
    if name == "torch.compile":
        return lambda z, l, a: compiled(plain)(z, l, a)
    if name == "liger-ce":
        return liger_ce
    raise ValueError(name)


FROZEN = "-frozen-head"  # a linear variant with the LM head's weight not requiring a gradient (PEFT)


def linear_variant(name, backend):
    """fn(hidden, weight, labels, advantages) -> loss: fused, or the projection then lco_loss. The
    "-frozen-head" variants are the same functions; the memory worker then leaves the weight frozen."""
    from lco_kernels import fused_linear_lco_loss
    name = name.removesuffix(FROZEN)
    if name == "fused-linear":
        return lambda h, w, l, a: fused_linear_lco_loss(h, w, l, a, backend=backend)
    if name == "unfused-linear":
        return lambda h, w, l, a: lco_loss(h @ w.t(), l, a, backend=backend)
    raise ValueError(name)


def step(fn, logits, labels, advantages):
    """One forward + backward; returns nothing (the gradient lands in logits.grad)."""
    logits.grad = None
    fn(logits, labels, advantages).backward()
