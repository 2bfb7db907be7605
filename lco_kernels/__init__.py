"""lco-kernels: fused Triton kernels for the Logits Convex Optimization (LCO) loss and the policy
losses it replaces, all through one vocabulary kernel; exact differentiable token log-probs."""
from .from_logprobs import lco_loss_from_logprobs
from .losses.per_token import (cispo_loss, dppo_loss, dro_loss, lco_loss, pg_loss, ppo_loss, sapo_loss, sft_loss,
                               token_logprobs)
from .fused_linear import fused_linear_lco_loss, fused_linear_policy_loss, fused_linear_token_logprobs
from .losses.sequence import (fused_linear_geo_mean_loss, fused_linear_gspo_loss, fused_linear_vespo_loss,
                              geo_mean_loss, gspo_loss, vespo_loss)
from .losses.batch_selected import clip_cov_loss, fused_linear_clip_cov_loss, fused_linear_kl_cov_loss, kl_cov_loss
from .losses.rollout_correction import bypass_mode_loss, fused_linear_bypass_mode_loss, rollout_correction
from .modules import LCOLoss, LinearLCOLoss
from .stats import TokenStats

__all__ = ["lco_loss", "LCOLoss", "sft_loss", "pg_loss", "ppo_loss", "cispo_loss", "sapo_loss", "dppo_loss",
           "dro_loss", "token_logprobs", "lco_loss_from_logprobs", "gspo_loss", "geo_mean_loss", "vespo_loss",
           "clip_cov_loss", "kl_cov_loss", "bypass_mode_loss", "rollout_correction", "fused_linear_lco_loss",
           "fused_linear_policy_loss", "fused_linear_token_logprobs", "fused_linear_gspo_loss",
           "fused_linear_geo_mean_loss", "fused_linear_vespo_loss", "fused_linear_clip_cov_loss",
           "fused_linear_kl_cov_loss", "fused_linear_bypass_mode_loss", "LinearLCOLoss", "TokenStats"]
__version__ = "0.2.0"
