"""Pure-PyTorch float64 implementations used to validate lco_kernels. Not shipped."""
from .lco import lco_loss_reference, lco_rows_closed_form
from .policy import policy_loss_reference, token_logprobs
from .reductions import aggregate

__all__ = ["lco_loss_reference", "lco_rows_closed_form", "policy_loss_reference", "token_logprobs", "aggregate"]
