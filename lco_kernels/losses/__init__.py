"""The public losses, grouped by how they are computed.

- ``per_token``: losses whose row loss is a function of that token's log p_i and per-token scalars
  (advantage, old / reference log-probs). One vocabulary kernel with a per-loss scalar head
  (registry.py, triton_heads.py / torch_heads.py) serves them all; ``token_logprobs`` is its SFT head.
- ``sequence``: losses with a statistic over each sequence of the current log-probs, written in
  PyTorch on ``token_logprobs``' exact, differentiable log-probs (the vocabulary work is still one
  sweep forward and one backward): ``gspo_loss`` (GSPO's sequence ratio; verl "gspo", TRL / Liger
  ``importance_sampling_level="sequence"``), ``geo_mean_loss`` (GMPO; verl "geo_mean"),
  ``vespo_loss`` (VESPO's gamma weight of the sequence ratio; TRL / Liger ``loss_type="vespo"``), each
  with a ``fused_linear_*`` form. Its ``_run`` / ``_finish`` are the shared preparation, KL / entropy
  terms, reduction and statistics of every loss written on token log-probs.
- ``batch_selected``: losses whose token selection is a statistic of the micro-batch's current
  log-probs, taken from the same sweep: ``clip_cov_loss`` and ``kl_cov_loss`` (verl "clip_cov",
  "kl_cov", the entropy-mechanism losses), each with a ``fused_linear_*`` form.
- ``rollout_correction``: verl's "bypass_mode" (``bypass_mode_loss``) and its rollout-correction
  importance weights and rejection masks (``rollout_correction``), from the sweep's own log-probs;
  ``fused_linear_bypass_mode_loss`` is the loss's form on hidden states.
"""
