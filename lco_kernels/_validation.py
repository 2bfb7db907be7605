"""Checks on the public arguments (SPEC §2 "Bad input"): each error names the argument."""
import math
import numbers

import torch

from .reductions import REDUCTIONS

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_common(*, ignore_index, reduction, inplace_backward, backend, return_stats, max_length):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, flag in (("inplace_backward", inplace_backward), ("return_stats", return_stats)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral)
                                   or max_length < 1):
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")


def check_rho(rho_pos, rho_neg):
    _real("rho_pos", rho_pos)
    _real("rho_neg", rho_neg)
    if rho_pos < 1:
        raise ValueError(f"rho_pos must be >= 1 (it raises the sampled token's probability), got {rho_pos}")
    if not 0 <= rho_neg <= 1:
        raise ValueError(f"rho_neg must lie in [0, 1] (it lowers the sampled token's probability), got {rho_neg}")


def check_clip(epsilon_low=0.0, epsilon_high=0.0, dual_clip=None, beta=0.0):
    _real("epsilon_low", epsilon_low)
    _real("epsilon_high", epsilon_high)
    if not 0 <= epsilon_low < 1:
        raise ValueError(f"epsilon_low must lie in [0, 1), got {epsilon_low}")
    if epsilon_high < 0:
        raise ValueError(f"epsilon_high must be >= 0, got {epsilon_high}")
    if dual_clip is not None:
        _real("dual_clip", dual_clip)
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (the cap −Ψ·c on negative-advantage tokens), got {dual_clip}")
    _real("beta", beta)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")


def check_logits_labels(logits, labels):
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


def per_token(name, value, labels, *, allow_number=True):
    """``value`` (a tensor, or a number where allowed) broadcast to ``labels.shape``."""
    if isinstance(value, torch.Tensor):
        if value.device != labels.device:
            raise ValueError(f"{name} is on {value.device} but logits is on {labels.device}")
        if value.is_complex():
            raise TypeError(f"{name} must be real, got {value.dtype}")
    elif not allow_number or isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a tensor" if not allow_number else "a tensor or a real number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    value = torch.as_tensor(value, device=labels.device)
    try:
        shape = torch.broadcast_shapes(value.shape, labels.shape)
    except RuntimeError:
        shape = None
    if shape != labels.shape:
        raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to labels' shape "
                         f"{tuple(labels.shape)}")
    return value.expand(labels.shape)


def check_labels_in_range(labels, V, ignore_index):
    """The one host synchronisation of the hot path: no label may index outside the vocabulary."""
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad].reshape(-1)[0].item()
        raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}; found {first}")


def check_backend_dtype(backend, dtype):
    if backend == "triton" and dtype not in TRITON_DTYPES:
        raise TypeError(f"logits of dtype {dtype} are not supported by backend='triton' "
                        f"(float32, bfloat16, float16); backend='torch' also takes float64")
