"""Reductions of a per-token loss matrix, as verl 0.9.1's ``agg_loss`` writes them (plus "mean", "sum",
"none" and the LCO authors' "sign-mean"). Sequences are the last dimension. ``token_count`` /
``seq_count`` replace the local counts (global normalisers)."""


def aggregate(loss_mat, mask, reduction, advantages=None, max_length=None, token_count=None, seq_count=None):
    mask = mask.double()
    reduction = {"token-mean": "mean"}.get(reduction, reduction)
    if reduction == "none":
        return loss_mat * mask
    if reduction == "sum":
        return (loss_mat * mask).sum()
    if reduction == "mean":
        return (loss_mat * mask).sum() / (mask.sum().clamp(min=1) if token_count is None else token_count)
    if reduction == "sign-mean":
        pos = mask * (advantages > 0)
        neg = mask * (advantages < 0)
        return (loss_mat * pos).sum() / pos.sum().clamp(min=1) + (loss_mat * neg).sum() / neg.sum().clamp(min=1)
    seq_mat = (loss_mat * mask).reshape(-1, loss_mat.shape[-1])
    seq_mask = mask.reshape(-1, mask.shape[-1])
    n_seqs = seq_mat.shape[0] if seq_count is None else seq_count
    if reduction == "seq-mean-token-sum":
        return seq_mat.sum(-1).sum() / n_seqs
    if reduction == "seq-mean-token-mean":
        return (seq_mat.sum(-1) / seq_mask.sum(-1).clamp(min=1)).sum() / n_seqs
    if reduction == "seq-mean-token-sum-norm":
        return seq_mat.sum() / (n_seqs * (max_length or loss_mat.shape[-1]))
    raise ValueError(reduction)
