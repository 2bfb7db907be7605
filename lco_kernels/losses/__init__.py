"""The public losses, grouped by how they are computed.

- ``per_token``: losses whose row loss is a function of that token's log p_i and per-token scalars
  (advantage, old / reference log-probs). One vocabulary kernel with a per-loss scalar head
  (registry.py, triton_heads.py / torch_heads.py) serves them all; ``token_logprobs`` is its SFT head.
- ``sequence``: losses with a statistic over each sequence of the current log-probs (GSPO's
  sequence ratio), written in PyTorch on ``token_logprobs``' exact, differentiable log-probs: the
  vocabulary work is still one sweep forward and one backward.
"""
