"""Pure-PyTorch float64 implementations used to validate lco_kernels. Not shipped."""
from .lco import lco_loss_reference, lco_rows_closed_form, reduce_rows
from .policy import aggregate, policy_loss_reference, token_logprobs

__all__ = ["lco_loss_reference", "lco_rows_closed_form", "reduce_rows", "aggregate", "policy_loss_reference",
           "token_logprobs"]
