"""lco-kernels: fused Triton kernels for the Logits Convex Optimization (LCO) loss."""
from .functional import lco_loss
from .module import LCOLoss

__all__ = ["lco_loss", "LCOLoss"]
__version__ = "0.1.0"
