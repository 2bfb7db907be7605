"""Reductions of a per-token loss matrix, as verl's ``agg_loss`` writes them (plus "mean", "sum",
"none" and the LCO authors' "sign-mean"). Sequences are the last dimension."""


def aggregate(loss_mat, mask, reduction, advantages=None, max_length=None):
    mask = mask.double()
    if reduction == "none":
        return loss_mat * mask
    if reduction == "sum":
        return (loss_mat * mask).sum()
    if reduction == "mean":
        return (loss_mat * mask).sum() / mask.sum().clamp(min=1)
    if reduction == "sign-mean":
        pos = mask * (advantages > 0)
        neg = mask * (advantages < 0)
        return (loss_mat * pos).sum() / pos.sum().clamp(min=1) + (loss_mat * neg).sum() / neg.sum().clamp(min=1)
    seq_mat = (loss_mat * mask).reshape(-1, loss_mat.shape[-1])
    seq_mask = mask.reshape(-1, mask.shape[-1])
    if reduction == "seq-mean-token-sum":
        return seq_mat.sum(-1).mean()
    if reduction == "seq-mean-token-mean":
        return (seq_mat.sum(-1) / seq_mask.sum(-1).clamp(min=1)).mean()
    if reduction == "seq-mean-token-sum-norm":
        return seq_mat.sum() / (max_length or loss_mat.shape[-1])
    raise ValueError(reduction)
