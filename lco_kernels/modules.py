"""The nn.Module forms: ``LCOLoss`` (of ``lco_loss``) and ``LinearLCOLoss`` (of ``fused_linear_lco_loss``)."""
import torch
from torch import nn

from ._plumbing import loss_spec
from ._validation import check_chunk_size, check_options
from .losses.per_token import lco_loss
from .fused_linear import fused_linear_lco_loss
from .registry import RHO_NEG, RHO_POS


class LCOLoss(nn.Module):
    """``lco_loss`` as an ``nn.Module``: ``forward(logits, labels, advantages, **call_options)``.

    The constructor's options are checked once and applied to every call; ``call_options`` (per call:
    ``old_logprobs``, ``ref_logprobs``, ``loss_mask``, ``token_count``, ...) override them.

    Args:
        rho_pos: as ``lco_loss``.
        rho_neg: as ``lco_loss``.
        ignore_index: the padding label.
        reduction: as every loss.
        inplace_backward: as every loss.
        backend: "auto", "triton" or "torch".
        **options: any other keyword option of ``lco_loss`` (temperature, entropy_coef, epsilon_low,
            epsilon_high, beta, kl_type, ...).
    """

    def __init__(self, rho_pos=RHO_POS, rho_neg=RHO_NEG, ignore_index=-100, reduction="mean",
                 inplace_backward=False, backend="auto", **options):
        super().__init__()
        loss_spec("lco", rho_pos=rho_pos, rho_neg=rho_neg)
        check_options(ignore_index=ignore_index, reduction=reduction, backend=backend, return_stats=False,
                      max_length=options.get("max_length"), inplace_backward=inplace_backward,
                      temperature=options.get("temperature", 1.0), entropy_coef=options.get("entropy_coef", 0.0))
        self.options = dict(rho_pos=rho_pos, rho_neg=rho_neg, ignore_index=ignore_index, reduction=reduction,
                            inplace_backward=inplace_backward, backend=backend, **options)

    def forward(self, logits, labels, advantages, **call_options):
        """``call_options`` (per call: old_logprobs, ref_logprobs, loss_mask, token_count, ...) override."""
        return lco_loss(logits, labels, advantages, **{**self.options, **call_options})

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearLCOLoss(nn.Module):
    """``fused_linear_lco_loss`` as an ``nn.Module``: ``forward(hidden, weight, labels, advantages, bias=None, **call_options)``.

    The LM head's ``weight`` (and ``bias``) are passed to each call, so the module holds no parameter
    and can sit beside any model.

    Args:
        rho_pos: as ``lco_loss``.
        rho_neg: as ``lco_loss``.
        ignore_index: the padding label.
        reduction: as every loss.
        chunk_size: tokens per chunk (as ``fused_linear_policy_loss``).
        accum_dtype: dtype of the weight / bias gradient accumulation.
        backend: "auto", "triton" or "torch".
        **options: any other keyword option of ``fused_linear_lco_loss``.
    """

    def __init__(self, rho_pos=RHO_POS, rho_neg=RHO_NEG, ignore_index=-100, reduction="mean", chunk_size=None,
                 accum_dtype=torch.float32, backend="auto", **options):
        super().__init__()
        loss_spec("lco", rho_pos=rho_pos, rho_neg=rho_neg)
        check_options(ignore_index=ignore_index, reduction=reduction, backend=backend, return_stats=False,
                      max_length=options.get("max_length"), temperature=options.get("temperature", 1.0),
                      entropy_coef=options.get("entropy_coef", 0.0))
        check_chunk_size(chunk_size)
        self.options = dict(rho_pos=rho_pos, rho_neg=rho_neg, ignore_index=ignore_index, reduction=reduction,
                            chunk_size=chunk_size, accum_dtype=accum_dtype, backend=backend, **options)

    def forward(self, hidden, weight, labels, advantages, bias=None, **call_options):
        return fused_linear_lco_loss(hidden, weight, labels, advantages, bias=bias, **{**self.options, **call_options})

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
