"""Checks on the public arguments (SPEC §2 "Bad input"): each error names the argument and is raised
before any work is done."""
import functools
import math
import numbers

import torch

from .reductions import ALIASES, REDUCTIONS
from .registry import DIVERGENCES, KL_NAMES

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT64 = (-(1 << 63), (1 << 63) - 1)


def real(name, value):
    # the type test first: numbers.Real's abstract-class check costs more than the rest of a call's options
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not -math.inf < value < math.inf:  # not math.isfinite: torch.compile traces comparisons, not isfinite
        raise ValueError(f"{name} must be finite, got {value}")


def flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _count(name, value, device):
    """A global normaliser: a positive number, or a 0-dim real tensor on ``device`` (not read here)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a positive number or a 0-dim real tensor, got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        if value.device != device and value.device.type != "meta":
            raise ValueError(f"{name} is on {value.device} but logits is on {device}")
        return
    real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def once_per_combination(check, maxsize=256):
    """``check`` run once per distinct tuple of arguments, its result kept (an error is never kept: a refused
    combination raises every time). Typed: 1, 1.0 and True are different arguments (a bool where a number
    belongs is refused). Every call runs ``check`` under torch.compile (Dynamo would trace through the cache
    and warn; arguments may be symbolic there) and for unhashable arguments."""
    cached = functools.lru_cache(maxsize=maxsize, typed=True)(check)

    @functools.wraps(check)
    def run(*args):
        if torch.compiler.is_compiling():
            return check(*args)
        try:
            return cached(*args)
        except TypeError:  # an unhashable argument, or the check's own TypeError, which it raises again
            return check(*args)
    return run


def check_options(*, ignore_index, reduction, backend, return_stats, max_length, temperature=1.0, entropy_coef=0.0,
                  inplace_backward=False, token_count=None, seq_count=None, device=None):
    """The options every loss shares; without global normalisers, checked once per distinct combination."""
    options = (ignore_index, reduction, backend, return_stats, max_length, temperature, entropy_coef, inplace_backward)
    if token_count is None and seq_count is None:
        _checked_options(*options)
    else:
        _check_options(*options, token_count, seq_count, device)


def _check_options(ignore_index, reduction, backend, return_stats, max_length, temperature, entropy_coef,
                   inplace_backward, token_count=None, seq_count=None, device=None):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT64[0] <= ignore_index <= _INT64[1]:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if reduction not in REDUCTIONS and reduction not in ALIASES:
        raise ValueError(f"reduction must be one of {REDUCTIONS + tuple(ALIASES)}, got {reduction!r}")
    flag("inplace_backward", inplace_backward)
    flag("return_stats", return_stats)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral)
                                   or max_length < 1):
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    real("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    real("entropy_coef", entropy_coef)
    _count("token_count", token_count, device)
    _count("seq_count", seq_count, device)
    if reduction == "sign-mean" and (token_count is not None or seq_count is not None):
        raise ValueError("reduction='sign-mean' averages each sign over its own local tokens and takes no "
                         "token_count / seq_count; use reduction='none' and your own global sums instead")
    if token_count is not None and reduction not in ("mean", "token-mean"):
        raise ValueError(f"token_count is the normaliser of reduction='mean'; got reduction={reduction!r}")
    if seq_count is not None and not reduction.startswith("seq-"):
        raise ValueError(f"seq_count is the normaliser of the 'seq-*' reductions; got reduction={reduction!r}")


_checked_options = once_per_combination(_check_options)


def check_rho(rho_pos, rho_neg):
    real("rho_pos", rho_pos)
    real("rho_neg", rho_neg)
    if rho_pos < 1:
        raise ValueError(f"rho_pos must be >= 1 (it raises the sampled token's probability), got {rho_pos}")
    if not 0 <= rho_neg <= 1:
        raise ValueError(f"rho_neg must lie in [0, 1] (it lowers the sampled token's probability), got {rho_neg}")


def check_clip(epsilon_low, epsilon_high, dual_clip):
    """``epsilon_low`` None (no lower clip) is checked by the caller."""
    real("epsilon_high", epsilon_high)
    if epsilon_low is not None:
        real("epsilon_low", epsilon_low)
    if epsilon_low is not None and not 0 <= epsilon_low < 1:
        raise ValueError(f"epsilon_low must lie in [0, 1), got {epsilon_low}")
    if epsilon_high < 0:
        raise ValueError(f"epsilon_high must be >= 0, got {epsilon_high}")
    if dual_clip is not None:
        real("dual_clip", dual_clip)
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (the cap −Ψ·c on negative-advantage tokens), got {dual_clip}")


def _positive(name, value):
    real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_sapo(tau_pos, tau_neg):
    _positive("tau_pos", tau_pos)
    _positive("tau_neg", tau_neg)


def check_dppo(divergence, delta_low, delta_high, clip_ratio_c):
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCES)}, got {divergence!r}")
    for name, value in (("delta_low", delta_low), ("delta_high", delta_high)):
        real(name, value)
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (a divergence threshold), got {value}")
    _positive("clip_ratio_c", clip_ratio_c)


def check_dro(dro_beta):
    _positive("dro_beta", dro_beta)


def check_kl(beta, kl_type):
    real("beta", beta)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not isinstance(kl_type, str) or kl_type not in KL_NAMES:
        raise ValueError(f"kl_type must be one of {tuple(KL_NAMES)}, got {kl_type!r}")


def check_logits_labels(logits, labels):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point (float32, bfloat16 or float16), got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    _check_labels(labels, logits.shape[:-1], logits.device, "logits.shape[:-1]")


def _check_labels(labels, shape, device, what):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(f"labels must have shape {what} = {tuple(shape)}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the logits are on {device}")


def check_linear(hidden, weight, bias, labels, chunk_size, accum_dtype):
    """The fused-linear forms' tensors: hidden (..., H), weight (V, H), bias (V,) or None."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape (..., H), got a {hidden.dim()}-dim tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                             or tuple(bias.shape) != (weight.shape[0],) or bias.device != hidden.device):
        raise ValueError(f"bias must be a floating ({weight.shape[0]},) tensor on hidden's device")
    # mixed dtypes run in the lower precision (autocast's rule); bfloat16 with float16 has no lower one
    if {torch.bfloat16, torch.float16} <= {t.dtype for t in (hidden, weight, bias) if t is not None}:
        raise ValueError("hidden, weight and bias mix bfloat16 and float16: cast them to one of the two")
    _check_labels(labels, hidden.shape[:-1], hidden.device, "hidden.shape[:-1]")
    check_chunk_size(chunk_size)
    if not (isinstance(accum_dtype, torch.dtype) and accum_dtype.is_floating_point):
        raise TypeError(f"accum_dtype must be a floating torch.dtype, got {accum_dtype!r}")


def check_chunk_size(chunk_size):
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def per_token(name, value, labels, *, allow_number=True, allow_bool=False):
    """``value`` (a tensor with labels' number of dims or 0 dims, or a number where allowed) expanded
    to ``labels.shape``. Fewer dims than labels is an error, never a broadcast along the token axis."""
    if value is None:
        raise ValueError(f"{name} is required")
    if isinstance(value, torch.Tensor):
        if value.device != labels.device:
            raise ValueError(f"{name} is on {value.device} but the logits are on {labels.device}")
        if value.is_complex() or (value.dtype == torch.bool and not allow_bool):
            raise TypeError(f"{name} must be a real (not bool or complex) tensor, got {value.dtype}")
        if value.dim() != 0 and value.dim() != labels.dim():
            hint = ""
            if value.dim() == labels.dim() - 1:
                hint = f"; for one value per sequence pass {name}[..., None] (shape {tuple(value.shape) + (1,)})"
            raise ValueError(f"{name} of shape {tuple(value.shape)} must have labels' number of dimensions "
                             f"({labels.dim()}, labels are {tuple(labels.shape)}) or be 0-dim{hint}")
    elif not allow_number or isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a tensor" if not allow_number else "a tensor or a real number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    else:
        value = torch.as_tensor(value, device=labels.device)
    if value.shape == labels.shape:  # the common cases, without broadcast_shapes' cost
        return value
    if value.dim() == 0:
        return value.expand(labels.shape)
    try:
        shape = torch.broadcast_shapes(value.shape, labels.shape)
    except RuntimeError:
        shape = None
    if shape != labels.shape:
        raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to labels' shape "
                         f"{tuple(labels.shape)}")
    return value.expand(labels.shape)


def label_check_reads_device(labels):
    """Whether the label-range check may read ``labels``: only eagerly on the CPU. On a GPU it would
    be a host synchronisation, under torch.compile a graph break, on meta tensors impossible; there an
    out-of-range label gives its row a NaN loss and gradient instead (the kernels never index with it)."""
    return labels.is_cpu and not torch.compiler.is_compiling()


def every_label_a_column(labels, V, ignore_index, first=0):
    """True when every label lies in [first, first + V) and none can be ``ignore_index`` (None: padding is not
    asked about), from one reduction read on the host; False where it is not so, and for labels off the CPU
    (there the read would be a sync)."""
    if not labels.is_cpu or labels.numel() == 0:
        return False
    lo, hi = labels.aminmax()
    lo, hi = int(lo) - first, int(hi) - first
    return 0 <= lo and hi < V and not (ignore_index is not None and lo <= ignore_index - first <= hi)


def check_labels_in_range(labels, V, ignore_index):
    """Called inside the forward ops (ops.py) on the tensors they run on, so compiled CPU code raises as
    eager code does (there torch.compile is no longer tracing), inside the fused-linear Function, and by
    ``_plumbing.prepare_tokens`` for an eager call on the whole vocabulary.
    Returns True when it read that every label is a column and none can be ``ignore_index`` (no padding),
    False when it read that each one is a column or ``ignore_index``, None when it did not read them."""
    if not label_check_reads_device(labels) or labels.numel() == 0:
        return None
    if every_label_a_column(labels, V, ignore_index):  # one op for the common case
        return True
    lo, hi = labels.masked_fill(labels == ignore_index, 0).aminmax()  # three ops where a mask of each rule takes six
    if int(lo) < 0 or int(hi) >= V:  # a label out of range (or V = 0): find it
        bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
        if bool(bad.any()):
            first = labels[bad].reshape(-1)[0].item()
            raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}; found {first}")
    return False


def check_backend_dtype(backend, dtype):
    if backend == "triton" and dtype not in TRITON_DTYPES:
        raise TypeError(f"logits of dtype {dtype} are not supported by backend='triton' "
                        f"(float32, bfloat16, float16); backend='torch' also takes float64")


def check_no_self_overlap(logits3d):
    """inplace_backward writes a different value into every element: logits whose elements share
    memory (an expand, an overlapping as_strided view) would be written twice with a wrong result."""
    dims = sorted((stride, size) for size, stride in zip(logits3d.shape, logits3d.stride()) if size > 1)
    extent = 0  # the span (in elements) of the dims with smaller strides, minus one
    for stride, size in dims:
        if stride <= extent:
            raise ValueError("inplace_backward=True needs logits whose elements do not share memory (these overlap "
                             "themselves, e.g. an expand()); pass inplace_backward=False, or a contiguous copy")
        extent += (size - 1) * stride
