"""The functional API: ``lco_loss`` (SPEC §2)."""
import torch

from . import torch_backend, triton_kernels
from ._validation import (check_backend_dtype, check_labels_in_range, check_options, check_tensors,
                          _TRITON_DTYPES)
from .autograd import LCOFunction


def triton_runs_on_cpu() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1: its kernels then run on CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(triton_kernels._lco_forward_kernel, InterpretedFunction)


def resolve_backend(backend, logits):
    """The backend module for ``backend`` ("auto" | "triton" | "torch") and these logits."""
    if backend == "auto":
        triton_ok = logits.is_cuda or (logits.device.type == "cpu" and triton_runs_on_cpu())
        backend = "triton" if triton_ok and logits.dtype in _TRITON_DTYPES else "torch"
    if backend == "torch":
        return torch_backend
    check_backend_dtype(backend, logits.dtype)
    if not (logits.is_cuda or (logits.device.type == "cpu" and triton_runs_on_cpu())):
        raise ValueError(f"backend='triton' needs CUDA tensors (logits are on {logits.device}), or "
                         "TRITON_INTERPRET=1 set before triton is imported to run on the CPU")
    return triton_kernels


def lco_loss(logits, labels, advantages, *, rho_pos=1.8, rho_neg=0.9, ignore_index=-100,
             reduction="mean", inplace_backward=False, backend="auto") -> torch.Tensor:
    """Logits Convex Optimization loss (paper §4.2): |Ψ|·KL(π' ‖ π) per token, fused.

    Args:
        logits: (..., V) float32 | bfloat16 | float16 (float64 with backend="torch").
        labels: (...) integer sampled tokens; ``ignore_index`` marks padding.
        advantages: Ψ, broadcastable to ``labels.shape`` (per token, or (B, 1) per sequence).
        rho_pos: target ratio π'_i / p_i for Ψ > 0 (≥ 1); where ρ·p_i ≥ 1 the target is one-hot.
        rho_neg: target ratio for Ψ < 0, in [0, 1].
        reduction: "mean" over non-ignored tokens (0.0 when none), "sum", or "none" (labels' shape).
        inplace_backward: the backward writes the gradient into the logits' storage (no N×V
            buffer). Only when nothing else reads those logits after this loss: their values
            are gone after backward, and the graph cannot be differentiated twice.
        backend: "auto" (Triton for CUDA; for CPU the PyTorch backend, or the Triton
            interpreter when TRITON_INTERPRET=1), "triton" or "torch".

    Returns:
        float32 loss (float64 for float64 logits): a scalar, or labels' shape for "none".
    """
    check_options(rho_pos=rho_pos, rho_neg=rho_neg, ignore_index=ignore_index, reduction=reduction,
                  inplace_backward=inplace_backward, backend=backend)
    advantages = check_tensors(logits, labels, advantages)
    impl = resolve_backend(backend, logits)
    check_labels_in_range(labels, logits.shape[-1], ignore_index)
    return LCOFunction.apply(logits, labels, advantages, float(rho_pos), float(rho_neg), int(ignore_index),
                             reduction, inplace_backward, impl)
