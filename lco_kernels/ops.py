"""The backend launches as PyTorch custom operators (``torch.library``), with their autograd formulas.

``torch.compile`` sees each op as one node with a shape function (``register_fake``) and a gradient
formula (``register_autograd``): a model step with our loss compiles to one graph
(``fullgraph=True``), the losses run under FakeTensorMode and on ``meta`` tensors, and forward +
backward can be captured in a CUDA graph. The reductions, masks and normalisers stay ordinary
tensor code around the ops, traced with the model.

The forward keeps O(N) per-row state (stats.ROW_STATE) beside the caller's logits; the backward
folds the upstream gradient of each row's loss (the reduction weight × the upstream value, as
autograd hands it over) and 1/τ into ``coef = alpha × upstream / τ`` per row (and the entropy's
``ent_coef`` the same way), so all are applied exactly, without another N×V pass and without
reading anything on the host. Second derivatives are not supported: backward(create_graph=True)
raises.

Label range: inside the forward op, on CPU tensors only (host memory: no device sync; and since it
runs inside the op, compiled CPU code raises the same ValueError as eager code). On CUDA it is
skipped: an out-of-range label gives a NaN row, never an out-of-bounds read. Fake and meta tensors
have no values to check.

The ops are ``custom_op``s, not ``triton_op``s: a ``triton_op``'s shape function is its own body run
on fake tensors, and under the Triton interpreter (TRITON_INTERPRET=1, how the CPU tests run the
kernels) ``wrap_triton`` hands back the interpreted kernel, which cannot launch on fake tensors.
"""
import dataclasses
import enum
import functools
import typing

import torch

from . import torch_backend, triton_backend
from ._validation import check_labels_in_range
from .autograd import as_rows3d, compute_dtype, refuse_double_backward, row_coefficients
from .registry import KL, LossSpec
from .stats import ROW, ROW_STATE, STAT_ROWS

IMPLS = {"torch": torch_backend, "triton": triton_backend}


def backend_name(impl):
    """The ``backend`` argument of the ops for a backend module."""
    return "triton" if impl is triton_backend else "torch"


# A LossSpec crosses the op boundary as two arguments (ops take no Python objects): ``spec``, a string
# of its non-float fields, and ``spec_values``, its float fields (a list, so that floats that
# torch.compile made symbolic pass through). Two arguments, not one per field: torch.library walks
# the schema on every call, at a cost that grows with the square of its length. Both are derived
# from the dataclass, so a new field needs no change here as long as its type is in _KEY_TYPES or
# _FLOAT_TYPES. Decoding is cached per configuration.
_KEY_TYPES = {str: str, bool: lambda k: k == "True", int: int, KL: lambda k: KL(int(k))}
_FLOAT_TYPES = (float, float | None)
_FIELDS = tuple((f.name, f.type) for f in dataclasses.fields(LossSpec))
assert all(tp in _FLOAT_TYPES or tp in _KEY_TYPES for _, tp in _FIELDS), "a LossSpec field type the ops cannot pass"
SPEC_SCHEMA = "str spec, float[] spec_values"


def spec_args(spec: LossSpec):
    """The op arguments of a ``LossSpec``: (its non-float fields joined by ';' (enums as ints, an
    absent optional float as "None"), its float fields in order (0.0 for an absent one))."""
    key, values = [], []
    for name, tp in _FIELDS:
        v = getattr(spec, name)
        if tp in _FLOAT_TYPES:
            key.append("None" if v is None else "")
            values.append(0.0 if v is None else v)
        else:
            key.append(_flag(v) if tp is bool else str(int(v)) if isinstance(v, enum.IntEnum) else str(v))
    return ";".join(key), values


def _flag(v):
    # not str(v): under torch.compile a flag computed from a float option may be symbolic, and
    # branching on it specialises it where str() would break the graph
    return "True" if v else "False"


@functools.lru_cache(maxsize=1024)
def _decode(key, values) -> LossSpec:
    fields, floats = [], iter(values)
    for (_, tp), k in zip(_FIELDS, key.split(";")):
        if tp in _FLOAT_TYPES:
            v = next(floats)  # one value per float field, absent or not
            fields.append(None if k == "None" else v)
        else:
            fields.append(_KEY_TYPES[tp](k))
    return LossSpec(*fields)


def spec_from_args(args) -> LossSpec:
    """The ``LossSpec`` of ``spec_args``' output (``args`` = (spec, spec_values))."""
    key, values = args
    return _decode(key, tuple(values))


def define(name, schema, fn, fake, mutates=()):
    """The custom op ``lco_kernels::name``: ``fn`` on every device, ``fake`` for shapes."""
    op = torch.library.custom_op(f"lco_kernels::{name}", fn, mutates_args=mutates, schema=schema)
    op.register_fake(fake)
    return op


# ---- the vocabulary passes on logits ----

class PolicyConfig(typing.NamedTuple):
    """What the policy ops take besides tensors and ``ignore_index``, decoded from their ``config``
    and ``spec_values`` arguments (``policy_args``)."""
    spec: LossSpec
    need_entropy: bool      # the entropy has a gradient: an entropy term or the entropy output
    with_stats: bool
    inplace_backward: bool  # only steers the backward
    backend: str            # "torch" | "triton"


def policy_args(spec, need_entropy, with_stats, inplace_backward, backend):
    """(config, spec_values): the policy ops' non-tensor arguments after ``ignore_index``; the
    options travel in the spec's key string (one argument, not four: see ``SPEC_SCHEMA``)."""
    key, values = spec_args(spec)
    return "|".join([key, _flag(need_entropy), _flag(with_stats), _flag(inplace_backward), backend]), values


@functools.lru_cache(maxsize=1024)
def _policy_config(config, values) -> PolicyConfig:
    key, need_entropy, with_stats, inplace_backward, backend = config.split("|")
    return PolicyConfig(_decode(key, values), need_entropy == "True", with_stats == "True",
                        inplace_backward == "True", backend)


def policy_config(config, spec_values) -> PolicyConfig:
    return _policy_config(config, tuple(spec_values))


_CONFIG_SCHEMA = "str config, float[] spec_values"


def _policy_forward(logits, labels, advantages, old_logprobs, ref_logprobs, ignore_index, config, spec_values):
    cfg = policy_config(config, spec_values)
    return run_forward(logits, labels, advantages, old_logprobs, ref_logprobs, ignore_index, cfg)


def run_forward(logits, labels, advantages, old_logprobs, ref_logprobs, ignore_index, cfg: PolicyConfig):
    """(loss, entropy, rows, stats) of flat ``labels`` (N,) for (..., V) logits: the per-row loss (N,),
    the per-row entropy (N,) with ``need_entropy`` (else empty), the row state (N, len(ROW_STATE)) and
    the statistics (N, len(STAT_ROWS)) with ``with_stats`` (else empty)."""
    check_labels_in_range(labels, logits.shape[-1], ignore_index)  # CPU tensors only
    rows, stats = IMPLS[cfg.backend].forward_rows(as_rows3d(logits), labels, advantages, old_logprobs,
                                                  ref_logprobs, cfg.spec, ignore_index,
                                                  cfg.need_entropy or cfg.with_stats, cfg.with_stats)
    entropy = rows[:, ROW["entropy"]].clone() if cfg.need_entropy else rows.new_empty(0)
    return rows[:, ROW["loss"]].clone(), entropy, rows, rows.new_empty(0) if stats is None else stats


def _policy_forward_fake(logits, labels, advantages, old_logprobs, ref_logprobs, ignore_index, config, spec_values):
    cfg = policy_config(config, spec_values)
    n = labels.numel()
    dtype = compute_dtype(logits.dtype)
    return (logits.new_empty(n, dtype=dtype), logits.new_empty(n if cfg.need_entropy else 0, dtype=dtype),
            logits.new_empty(n, len(ROW_STATE), dtype=dtype),
            logits.new_empty((n, len(STAT_ROWS)) if cfg.with_stats else (0,), dtype=dtype))


policy_forward = define(
    "policy_forward",
    "(Tensor logits, Tensor labels, Tensor advantages, Tensor? old_logprobs, Tensor? ref_logprobs, "
    f"int ignore_index, {_CONFIG_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor)",
    _policy_forward, _policy_forward_fake)


def _policy_backward(logits, labels, coef, ent_coef, rows, config, spec_values):
    return run_backward(logits, labels, coef, ent_coef, rows, policy_config(config, spec_values))


def run_backward(logits, labels, coef, ent_coef, rows, cfg: PolicyConfig):
    """∂L/∂logits (contiguous, logits' shape and dtype) from per-row ``coef`` (and ``ent_coef``)."""
    logits3d = as_rows3d(logits)
    grad3d = torch.empty(logits3d.shape, dtype=logits.dtype, device=logits.device)
    IMPLS[cfg.backend].backward_rows(logits3d, labels, coef, ent_coef, rows, grad3d, cfg.spec)
    return grad3d.view(logits.shape)


def _policy_backward_fake(logits, *_):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _policy_backward_inplace(logits, labels, coef, ent_coef, rows, config, spec_values):
    run_backward_inplace(logits, labels, coef, ent_coef, rows, policy_config(config, spec_values))


def run_backward_inplace(logits, labels, coef, ent_coef, rows, cfg: PolicyConfig):
    """``run_backward`` written into the logits' own storage."""
    logits3d = as_rows3d(logits)
    IMPLS[cfg.backend].backward_rows(logits3d, labels, coef, ent_coef, rows, logits3d, cfg.spec)
    if logits3d.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
        logits.copy_(logits3d.view(logits.shape))  # no (B, T, V) view of these logits: as_rows3d copied


_BACKWARD_ARGS = f"Tensor labels, Tensor coef, Tensor? ent_coef, Tensor rows, {_CONFIG_SCHEMA}"
policy_backward = define("policy_backward", f"(Tensor logits, {_BACKWARD_ARGS}) -> Tensor", _policy_backward,
                         _policy_backward_fake)
policy_backward_ = define("policy_backward_", f"(Tensor(a!) logits, {_BACKWARD_ARGS}) -> ()",
                          _policy_backward_inplace, lambda *_: None, mutates=("logits",))


def _policy_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[2])
    ctx.gradient_written = False
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs nobody used
    ctx.config = inputs[6:]


def _policy_gradient(ctx, grad_loss, grad_entropy, grad_rows, grad_stats):
    refuse_double_backward()
    cfg = policy_config(*ctx.config)
    if cfg.inplace_backward and ctx.gradient_written:
        raise RuntimeError("inplace_backward=True: the first backward overwrote the logits with their "
                           "gradient, so this graph cannot be differentiated again")
    logits, labels, rows = ctx.saved_tensors
    if grad_loss is None:  # only the entropy output was used
        grad_loss = torch.zeros_like(rows[:, ROW["loss"]])
    # weights=None: the reduction weight is already in grad_loss (autograd of the reduction outside the op)
    coef, ent_coef = row_coefficients(cfg.spec, rows, None, grad_loss, grad_entropy, cfg.need_entropy)
    if cfg.inplace_backward:
        policy_backward_(logits, labels, coef, ent_coef, rows, *ctx.config)  # bumps the logits' version
        grad = logits
    else:
        grad = policy_backward(logits, labels, coef, ent_coef, rows, *ctx.config)
    ctx.gradient_written = cfg.inplace_backward
    return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)


policy_forward.register_autograd(_policy_gradient, setup_context=_policy_setup_context)


# ---- which calls take the ops ----

def runs_eagerly(logits):
    """True for an eager call on plain tensors: not traced by torch.compile or export, no dispatch mode
    (FakeTensorMode, functionalization, ...), not a tensor subclass, not on the meta device. Such a call
    skips the custom op's dispatch and its torch.library autograd layer (autograd.LossFunction runs the
    same forward and gradient): on small inputs that layer costs more than the arithmetic. Every other
    call goes through the ops."""
    return (type(logits) is torch.Tensor and not logits.is_meta and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0)
