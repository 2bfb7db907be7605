"""Checks on the public arguments (SPEC §2 "Bad input"): each error names the argument."""
import math
import numbers

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_options(*, rho_pos, rho_neg, ignore_index, reduction, inplace_backward, backend):
    for name, value in (("rho_pos", rho_pos), ("rho_neg", rho_neg)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (math.isfinite(rho_pos) and rho_pos >= 1):
        raise ValueError(f"rho_pos must be a finite number >= 1 (it raises the sampled token's probability), got {rho_pos}")
    if not (0 <= rho_neg <= 1):
        raise ValueError(f"rho_neg must lie in [0, 1] (it lowers the sampled token's probability), got {rho_neg}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_tensors(logits, labels, advantages):
    """Type, shape and device checks; returns ``advantages`` as a float32 tensor shaped like ``labels``."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point (float32, bfloat16 or float16), got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}")
    if isinstance(advantages, torch.Tensor):
        if advantages.device != logits.device:
            raise ValueError(f"advantages is on {advantages.device} but logits is on {logits.device}")
        if advantages.is_complex() or advantages.dtype == torch.bool:
            raise TypeError(f"advantages must be real numbers, got {advantages.dtype}")
    elif isinstance(advantages, bool) or not isinstance(advantages, numbers.Real):
        raise TypeError(f"advantages must be a tensor or a real number, got {type(advantages).__name__}")
    advantages = torch.as_tensor(advantages, device=logits.device)
    try:
        shape = torch.broadcast_shapes(advantages.shape, labels.shape)
    except RuntimeError:
        shape = None
    if shape != labels.shape:
        raise ValueError(f"advantages of shape {tuple(advantages.shape)} does not broadcast to "
                         f"labels' shape {tuple(labels.shape)}")
    return advantages.expand(labels.shape)


def check_labels_in_range(labels, V, ignore_index):
    """The one host synchronisation of the hot path: no label may index outside the vocabulary."""
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad].reshape(-1)[0].item()
        raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}; found {first}")


def check_backend_dtype(backend, dtype):
    if backend == "triton" and dtype not in _TRITON_DTYPES:
        raise TypeError(f"logits of dtype {dtype} are not supported by backend='triton' "
                        f"(float32, bfloat16, float16); backend='torch' also takes float64")
