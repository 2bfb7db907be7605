"""``LCOLoss``: the nn.Module form of ``lco_loss``."""
from torch import nn

from ._validation import check_common, check_rho
from .functional import lco_loss


class LCOLoss(nn.Module):
    """Logits Convex Optimization loss as a module; ``forward(logits, labels, advantages)``."""

    def __init__(self, rho_pos=1.8, rho_neg=0.9, ignore_index=-100, reduction="mean",
                 inplace_backward=False, backend="auto"):
        super().__init__()
        check_rho(rho_pos, rho_neg)
        check_common(ignore_index=ignore_index, reduction=reduction, inplace_backward=inplace_backward,
                     backend=backend, return_stats=False, max_length=None)
        self.rho_pos = rho_pos
        self.rho_neg = rho_neg
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, logits, labels, advantages):
        return lco_loss(logits, labels, advantages, rho_pos=self.rho_pos, rho_neg=self.rho_neg,
                        ignore_index=self.ignore_index, reduction=self.reduction,
                        inplace_backward=self.inplace_backward, backend=self.backend)

    def extra_repr(self):
        return (f"rho_pos={self.rho_pos}, rho_neg={self.rho_neg}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, inplace_backward={self.inplace_backward}, backend={self.backend!r}")
