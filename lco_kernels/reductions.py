"""Reductions as per-token weights: reduced loss = Σ_t w_t·L_t.

The backward applies the same w_t to each token's α, so every reduction's gradient is exact
without scaling an N×V gradient after the fact. The "seq-*" modes follow verl 0.9.1's
``agg_loss`` over sequences = the last dimension of ``labels``; "sign-mean" is the LCO authors'
aggregation. Counts may be given for the whole optimizer step (gradient accumulation, data
parallelism): ``token_count`` for "mean", ``seq_count`` for the "seq-*" modes; they stay tensors,
so nothing here synchronises with the device.
"""

import torch

REDUCTIONS = ("mean", "sum", "none", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
              "sign-mean")
# verl's loss_agg_mode spellings that differ from ours
ALIASES = {"token-mean": "mean"}


def canonical(reduction):
    return ALIASES.get(reduction, reduction)


def token_weights(valid, advantages, reduction, max_length=None, token_count=None, seq_count=None,
                  dtype=torch.float32):
    """(N,) weights of ``dtype`` for ``valid`` (labels-shaped bool: not ignored, not masked); None for "none".

    - "sum": 1; "mean": 1 / token_count (default: the number of valid tokens; 0 weight when none);
    - "seq-mean-token-mean": 1 / (valid tokens of the sequence) / seq_count (default: the number of
      sequences); a sequence without valid tokens contributes 0 (verl would divide 0 by 0);
    - "seq-mean-token-sum": 1 / seq_count;
    - "seq-mean-token-sum-norm" (Dr. GRPO): 1 / (seq_count · max_length), as verl 0.9.1 and Liger
      (max_length default: the sequences' length, the last dimension of ``valid``);
    - "sign-mean": mean over tokens with Ψ > 0 plus mean over tokens with Ψ < 0 (local counts only;
      ``advantages`` None, as SFT's: every token counts as positive).
    """
    reduction = canonical(reduction)
    if reduction == "none":
        return None
    w = valid.to(dtype)
    if reduction == "sum":
        pass
    elif reduction == "mean":
        w = w / (w.sum().clamp(min=1) if token_count is None else token_count)
    elif reduction == "sign-mean":
        if advantages is None:
            w = w / w.sum().clamp(min=1)
        else:
            pos = w * (advantages > 0)
            neg = w * (advantages < 0)
            w = pos / pos.sum().clamp(min=1) + neg / neg.sum().clamp(min=1)
    else:
        seqs = w.reshape(-1, w.shape[-1] if w.dim() else 1)
        n_seqs = max(seqs.shape[0], 1) if seq_count is None else seq_count
        if reduction == "seq-mean-token-mean":
            seqs = seqs / seqs.sum(dim=-1, keepdim=True).clamp(min=1) / n_seqs
        elif reduction == "seq-mean-token-sum":
            seqs = seqs / n_seqs
        else:
            seqs = seqs / (n_seqs * (seqs.shape[-1] if max_length is None else max_length))
        w = seqs.reshape(valid.shape)
    return w if w.dim() == 1 else w.reshape(-1)


def uniform_weight(reduction, n, token_count=None, dtype=torch.float32):
    """The weight ``token_weights`` gives each of ``n`` tokens when every one is valid, as a 0-dim CPU tensor of
    ``dtype``, where it is one number known on the host: "sum" 1, "mean" 1 / n (without a global ``token_count``);
    else None. Its value is the weights tensor's, so the products are those of ``token_weights``, bit for bit
    (1 / n in float64, then rounded once to float32: rounding a quotient twice gives the once-rounded value for
    53 ≥ 2·24 + 2 bits). A tensor, not a Python float: an operation with a Python number wraps it in a tensor on
    every call. Beyond 2^24 tokens a float32 count of them rounds; 1 / n here does not."""
    reduction = canonical(reduction)
    if reduction == "sum":
        return torch.ones((), dtype=dtype)
    if reduction == "mean" and token_count is None and n > 0:
        return torch.full((), 1.0 / n, dtype=dtype)
    return None
