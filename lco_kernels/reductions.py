"""Reductions as per-token weights: reduced loss = Σ_t w_t·L_t.

The backward applies the same w_t to each token's α, so every reduction's gradient is exact
without scaling an N×V gradient after the fact. The "seq-*" modes follow verl's ``agg_loss``
over sequences = the last dimension of ``labels``; "sign-mean" is the LCO authors' aggregation.
"""
import torch

REDUCTIONS = ("mean", "sum", "none", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
              "sign-mean")


def token_weights(valid, advantages, reduction, max_length=None):
    """(N,) weights for ``valid`` (labels-shaped bool: not ignored, not masked); None for "none".

    - "sum": 1; "mean": 1 / (number of valid tokens), 0 when there are none;
    - "seq-mean-token-mean": 1 / (valid tokens of the sequence) / (number of sequences);
      a sequence without valid tokens contributes 0 (verl would divide 0 by 0);
    - "seq-mean-token-sum": 1 / (number of sequences);
    - "seq-mean-token-sum-norm" (Dr. GRPO): 1 / max_length (verl: the whole sum over max_length);
    - "sign-mean": mean over tokens with Ψ > 0 plus mean over tokens with Ψ < 0.
    """
    if reduction == "none":
        return None
    w = valid.to(torch.float32)
    if reduction == "sum":
        pass
    elif reduction == "mean":
        w = w / w.sum().clamp(min=1)
    elif reduction == "sign-mean":
        pos = w * (advantages > 0)
        neg = w * (advantages < 0)
        w = pos / pos.sum().clamp(min=1) + neg / neg.sum().clamp(min=1)
    else:
        seqs = w.reshape(-1, w.shape[-1] if w.dim() else 1)
        n_seqs = max(seqs.shape[0], 1)
        if reduction == "seq-mean-token-mean":
            seqs = seqs / seqs.sum(dim=-1, keepdim=True).clamp(min=1) / n_seqs
        elif reduction == "seq-mean-token-sum":
            seqs = seqs / n_seqs
        else:
            seqs = seqs / max_length
        w = seqs.reshape(valid.shape)
    return w.reshape(-1)
