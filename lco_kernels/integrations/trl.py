"""TRL: ``LCOGRPOTrainer``, a ``trl.GRPOTrainer`` whose policy loss is one of the library's fused losses.

    from lco_kernels.integrations.trl import LCOGRPOTrainer
    trainer = LCOGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                             policy_loss="lco", rho_pos=1.8, rho_neg=0.9)

Everything else is TRL's: generation, rewards, advantages, old/reference log-probs, logging. The loss
replaces ``GRPOTrainer._compute_loss``:
- ``policy_loss`` picks the per-token formula ("lco", "ppo", "pg", "cispo", "gspo"); GRPOConfig's
  ``loss_type`` picks only the normaliser, mapped onto the library's reductions with TRL's global counts
  (``token_count`` / ``seq_count``), so gradient accumulation gives TRL's gradients.
- "gspo" is TRL's own GSPO, ``importance_sampling_level="sequence"`` (required with it, and refused with
  the other formulas), computed by ``gspo_loss``: its token-level straight-through ratio has TRL's
  sequence ratio as value and s·∇log p_t as gradient, so it reproduces TRL's loss and gradient whenever
  the reduction weighs the tokens of a sequence alike, which every mapped ``loss_type`` does. One
  difference is left: log s is clamped at 10 (verl's rule; TRL's is unclamped), which changes only
  sequences whose mean log-ratio exceeds 10.
- ``temperature``, ``epsilon``/``epsilon_high``, ``beta`` (k3 KL to ``ref_per_token_logps``),
  ``num_iterations`` > 1 (``old_per_token_logps``: PPO+LCO for "lco"), completion and tool masks, and
  vLLM's importance-sampling ratio (a positive per-token weight, folded into the advantages; for "gspo"
  its mean over each sequence's tokens, see ``_compute_loss``) are honoured.
- ``fused_linear=True`` computes the loss from the last hidden states and the LM-head weight, never
  materialising the (B, T, V) logits.
- Per-token statistics from the loss's own sweep go into TRL's metrics: ``entropy``, ``kl``,
  ``clip_ratio/region_mean`` and ``lco/token_prob``, ``lco/target_prob``, ``lco/clamped_frac``,
  ``lco/logit_grad_norm``.
Options this mapping cannot express exactly raise ``ValueError`` at construction.
"""
import functools
import types

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer

import lco_kernels

POLICY_LOSSES = ("lco", "ppo", "pg", "cispo", "gspo")
# TRL loss_type -> the library reduction; the normaliser is set per call (see _reduction).
# "sapo" and "vespo" are loss formulas the library does not have.
_LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "mean", "dr_grpo": "mean", "dapo": "mean",
               "cispo": "mean", "luspo": "mean"}


class LCOGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with the library's fused policy loss (see the module docstring).

    Args (beyond GRPOTrainer's):
        policy_loss: "lco" (default), "ppo" (TRL's clipped surrogate), "pg" (REINFORCE), "cispo" or "gspo"
            (TRL's GSPO: set importance_sampling_level="sequence" in GRPOConfig).
        rho_pos, rho_neg: LCO's target ratios (only with policy_loss="lco").
        fused_linear: compute the loss from hidden states and the LM-head weight, without the logits.
    """

    def __init__(self, *args, policy_loss="lco", rho_pos=1.8, rho_neg=0.9, fused_linear=False, **kwargs):
        if policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss must be one of {POLICY_LOSSES}, got {policy_loss!r}")
        if not isinstance(fused_linear, bool):
            raise TypeError(f"fused_linear must be a bool, got {type(fused_linear).__name__}")
        super().__init__(*args, **kwargs)
        self.policy_loss = policy_loss
        self.rho_pos, self.rho_neg = float(rho_pos), float(rho_neg)
        self.fused_linear = fused_linear
        self._check_supported()
        if fused_linear:
            _add_hidden_states_forward(self.model.get_base_model() if is_peft_model(self.model) else self.model)

    def _check_supported(self):
        args = self.args
        unsupported = {
            "loss_type": (self.loss_type not in _LOSS_TYPES,
                          f"{self.loss_type!r} is a loss formula; choose the formula with policy_loss and the "
                          f"normaliser with loss_type in {sorted(_LOSS_TYPES)}"),
            "loss_type='cispo'": (self.loss_type == "cispo" and self.policy_loss != "cispo",
                                  "TRL's 'cispo' is CISPO's formula (with importance_sampling_level='sequence', on "
                                  "a sequence ratio, which no policy_loss computes): use policy_loss='cispo' with "
                                  "token-level importance sampling, or loss_type='dapo' for the same normaliser "
                                  "with another formula"),
            "importance_sampling_level": (self.importance_sampling_level != self._importance_sampling_level(),
                                          "'sequence' is TRL's GSPO: use it with policy_loss='gspo', which needs it "
                                          "(so that stock GRPOTrainer with this GRPOConfig computes the same loss); "
                                          "the other policy losses are token-level"),
            "off_policy_mask_threshold": (self.off_policy_mask_threshold is not None, "not supported"),
            "top_entropy_quantile": (self.top_entropy_quantile < 1.0, "not supported"),
            "delta": (args.delta is not None, "two-sided clipping is not supported"),
            "use_bias_correction_kl": (self.beta != 0.0 and args.use_bias_correction_kl,
                                       "TRL's default with beta != 0 multiplies the k3 KL by the differentiable ratio "
                                       "p/p_old, which no kl_type of the library computes; set "
                                       "use_bias_correction_kl=False (the plain k3 KL of GRPO and verl)"),
            "use_adaptive_entropy": (self.use_adaptive_entropy, "not supported (a static entropy_coef is)"),
            "entropy_coef": (self.entropy_coef != 0.0 and self.loss_type == "grpo",
                             "TRL's bonus is a token mean, which loss_type='grpo''s per-sequence mean cannot carry"),
            "rho_pos/rho_neg": (self.policy_loss != "lco" and (self.rho_pos, self.rho_neg) != (1.8, 0.9),
                                "only apply to policy_loss='lco'"),
        }
        for name, (bad, why) in unsupported.items():
            if bad:
                raise ValueError(f"LCOGRPOTrainer: {name}: {why}")
        if self.fused_linear:
            scale = _logit_transform(self.model.config.get_text_config())
            if scale:
                raise ValueError(f"fused_linear=True: the model transforms its logits ({scale}), which the fused "
                                 "linear loss does not; use fused_linear=False")
        if self.aux_loss_enabled:
            raise ValueError("LCOGRPOTrainer: MoE router losses are not supported (set router_aux_loss_coef=0)")

    def _importance_sampling_level(self):
        return "sequence" if self.policy_loss == "gspo" else "token"

    def _compute_loss(self, model, inputs):
        for key in ("pixel_values", "image_grid_thw", "token_type_ids", "mm_token_type_ids"):
            if inputs.get(key) is not None:
                raise ValueError(f"LCOGRPOTrainer supports text-only inputs (got {key!r})")
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        n_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        labels = completion_ids.masked_fill(mask == 0, -100)

        advantages = inputs["advantages"]
        if advantages.dim() == 1:  # TRL's per-sequence advantages
            advantages = advantages[:, None]
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # A positive per-token weight w: every loss here is linear in Ψ's magnitude with Ψ's sign kept,
            # so w·loss(Ψ) = loss(w·Ψ) (TRL multiplies the policy term only, before the KL, as here).
            weight = inputs["importance_sampling_ratio"]
            if self.policy_loss == "gspo":
                # TRL's GSPO term of a sequence of L tokens is ℓ(s)·Σ_t c·w_t, c the reduction's weight of its
                # tokens (the same for all of them under every mapped loss_type): per log p_t its gradient is
                # c·(Σ_t w_t)·ℓ'(s)·s/L, where the straight-through form gives c·w_t·ℓ'(s)·s. With the
                # sequence's mean weight in place of each w_t, value and gradient are TRL's.
                weight = (weight * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
            advantages = advantages * weight

        options = dict(temperature=self.temperature, return_stats=True, **self._reduction(inputs, mask, mode))
        if self.entropy_coef != 0.0:
            # TRL subtracts coef·(token mean of the entropy over this micro-batch)/accumulation steps; the
            # library's entropy term shares the loss's normaliser (token_count), so rescale the coefficient
            # (a float: one host read of the ratio; 1 exactly for "bnpo", whose count is this micro-batch's).
            accum = self.current_gradient_accumulation_steps if mode == "train" else 1
            local = mask.sum().clamp(min=1.0) * accum
            ratio = 1.0 if self.loss_type == "bnpo" else float(options["token_count"] / local)
            options["entropy_coef"] = self.entropy_coef * ratio
        if self.beta != 0.0:
            options.update(ref_logprobs=inputs["ref_per_token_logps"], beta=self.beta, kl_type="k3")
        old = inputs.get("old_per_token_logps")

        with self.accelerator.autocast():
            if self.fused_linear:
                hidden = model(input_ids=input_ids, attention_mask=attention_mask, lco_hidden_states=True)
                hidden = hidden[:, -n_keep - 1:-1]
                head = self.accelerator.unwrap_model(model).get_output_embeddings()
                if old is None and self.policy_loss in ("ppo", "cispo"):
                    with torch.no_grad():  # the loss's own projection and chunks: exactly its log-probs
                        old = lco_kernels.fused_linear_token_logprobs(hidden, head.weight, labels, bias=head.bias,
                                                                      temperature=self.temperature)
                if self.policy_loss == "gspo":
                    loss_fn = lco_kernels.fused_linear_gspo_loss
                else:
                    loss_fn = functools.partial(lco_kernels.fused_linear_policy_loss, loss=self.policy_loss)
                loss, stats = loss_fn(hidden, head.weight, labels, advantages, bias=head.bias,
                                      **self._policy_options(old), **options)
            else:
                logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=n_keep + 1,
                               use_cache=False).logits[:, :-1]
                if old is None and self.policy_loss in ("ppo", "cispo"):
                    with torch.no_grad():
                        old = lco_kernels.token_logprobs(logits, labels, temperature=self.temperature)
                loss_fn = getattr(lco_kernels, f"{self.policy_loss}_loss")
                loss, stats = loss_fn(logits, labels, advantages, **self._policy_options(old), **options)

        self._log_token_stats(mode, stats, mask, inputs)
        return loss

    def _policy_options(self, old):
        """The formula's own options. ``old``: TRL's old log-probs, or on-policy (TRL then skips computing
        them) for "ppo"/"cispo" the current ones detached, which makes the ratio exactly 1, as TRL's; for
        "gspo" None, with which ``gspo_loss`` takes them from its own sweep (no second pass)."""
        if self.policy_loss == "pg":
            return {}
        if self.policy_loss == "gspo":
            return {"old_logprobs": old, "epsilon_low": self.epsilon_low, "epsilon_high": self.epsilon_high}
        if self.policy_loss == "cispo":
            # TRL's CISPO caps the weight at epsilon_high itself; the library caps it at 1 + epsilon_high.
            cap = self.epsilon_high if self.loss_type == "cispo" else 1.0 + self.epsilon_high
            return {"old_logprobs": old, "epsilon_high": cap - 1.0}
        options = {"rho_pos": self.rho_pos, "rho_neg": self.rho_neg} if self.policy_loss == "lco" else {}
        if old is not None:  # "lco": PPO+LCO's trust region; "ppo": always
            options.update(old_logprobs=old, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high)
        return options

    def _reduction(self, inputs, mask, mode):
        """TRL's normaliser for ``loss_type`` as the library's reduction and global count (GRPOTrainer._compute_loss)."""
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1
        n_seq = mask.size(0)
        if self.loss_type == "grpo":
            return {"reduction": "seq-mean-token-mean", "seq_count": n_seq * accum}
        if self.loss_type == "bnpo":
            count = mask.sum().clamp(min=1.0) * accum
        elif self.loss_type == "dr_grpo":
            count = n_seq * self.max_completion_length * accum
        elif self.loss_type == "luspo":
            count = n_seq * accum
        else:  # "dapo", "cispo": num_items_in_batch spans the generation batch, all processes
            count = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                count = count * accum / self.args.steps_per_generation
        return {"reduction": "mean", "token_count": count}

    def _log_token_stats(self, mode, stats, mask, inputs):
        """Masked means over all processes of the loss sweep's per-token statistics, into TRL's metrics; for
        "gspo" the clip ratio is over sequences, as TRL's sequence-level one (a sequence is clipped as a whole)."""
        mask = mask.float()
        logged = {"entropy": stats.entropy, "lco/token_prob": stats.logprobs.exp(),
                  "lco/logit_grad_norm": stats.logit_grad_norm}
        if stats.target_prob is not None:
            logged.update({"lco/target_prob": stats.target_prob, "lco/clamped_frac": stats.clamped})
        if stats.clipped is not None:
            logged["clip_ratio/region_mean"] = stats.clipped
        if self.beta != 0.0:
            x = inputs["ref_per_token_logps"] - stats.logprobs
            logged["kl"] = torch.exp(x) - x - 1
        means = {name: ((v.float() * mask).sum(), mask.sum()) for name, v in logged.items()}
        if self.policy_loss == "gspo":
            clipped_seqs = (stats.clipped * mask).amax(-1)
            means["clip_ratio/region_mean"] = (clipped_seqs.sum(), mask.new_tensor(mask.size(0)))
        totals = self.accelerator.reduce(torch.stack([x for pair in means.values() for x in pair]), reduction="sum")
        for name, (total, count) in zip(means, totals.view(-1, 2).tolist()):
            self._metrics[mode][name].append(total / max(count, 1.0))


def _logit_transform(text_config):
    """A description of any scaling or soft-capping the model applies to its logits ("" when none)."""
    names = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    found = {n: getattr(text_config, n, None) for n in names}
    return ", ".join(f"{n}={v}" for n, v in found.items() if v not in (None, 1, 1.0))


def _add_hidden_states_forward(model):
    """Let ``model(..., lco_hidden_states=True)`` return the backbone's last hidden states.

    Going through the model's own ``forward`` (as TRL's fused LM head does) keeps DDP/FSDP wrappers,
    which only see calls to the wrapped module, working; any other call is passed on unchanged.
    """
    inner_forward = model.forward

    def forward(self, *args, lco_hidden_states=False, **kwargs):
        if not lco_hidden_states:
            return inner_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.base_model(*args, **kwargs).last_hidden_state

    model.forward = types.MethodType(forward, model)
