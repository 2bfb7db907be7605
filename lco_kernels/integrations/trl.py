"""TRL: ``LCOGRPOTrainer``, a ``trl.GRPOTrainer`` whose policy loss is one of the library's fused losses.

    from lco_kernels.integrations.trl import LCOGRPOTrainer
    trainer = LCOGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                             policy_loss="lco", rho_pos=1.8, rho_neg=0.9)

Everything else is TRL's: generation, rewards, advantages, old/reference/sampler log-probs, logging. The
loss replaces ``GRPOTrainer._compute_loss``.

``policy_loss`` picks the per-token formula:
- ``"trl"``: whatever formula GRPOConfig selects, computed by the library's fused losses:

  ============================  =========================================  ============================
  GRPOConfig                    library loss                               normaliser (``loss_type``)
  ============================  =========================================  ============================
  grpo / bnpo / dr_grpo /       ``ppo_loss`` (``importance_sampling_level``  grpo: "seq-mean-token-mean";
  dapo / luspo, token           "token")                                     the others "mean" with
                                                                             TRL's global count
  the same, sequence            ``gspo_loss`` (TRL's GSPO)                 as above
  ``delta``                     ``ppo_loss(dual_clip=delta)`` for δ ≥ 1 + ε_high; see below
  cispo                         ``cispo_loss``, weight capped at ε_high     dapo's
  sapo                          ``sapo_loss(tau_pos=sapo_temperature_pos,   grpo's
                                tau_neg=sapo_temperature_neg)``
  vespo                         ``vespo_loss(k_pos=vespo_k_pos, ...,       dapo's
                                sampler_ratio=vLLM's IS ratio)``
  ============================  =========================================  ============================

- ``"lco"`` (default), ``"ppo"``, ``"pg"``, ``"cispo"``, ``"gspo"``, ``"sapo"``, ``"vespo"``: that formula by
  name, with GRPOConfig's ``loss_type`` picking only the normaliser (``"cispo"``, ``"sapo"``, ``"vespo"`` as
  ``loss_type`` are formulas: they are accepted only with their own ``policy_loss`` or ``"trl"``). ``"gspo"`` is
  ``"ppo"`` with ``importance_sampling_level="sequence"``.

Every normaliser is mapped onto the library's reductions with TRL's global counts (``token_count`` /
``seq_count``), so gradient accumulation gives TRL's gradients. The rest of GRPOConfig:
- ``importance_sampling_level="sequence"``: the sequence ratio s = exp(mean_t(log p_t − log p_old,t)) (TRL's,
  unclamped) for ppo (GSPO), cispo and sapo; vespo's weight is a sequence statistic at either level. For
  cispo and sapo, and for ppo with ``delta``, the loss gets the token-level straight-through ratio (value s,
  gradient s·∇log p_t) as old log-probs log p_t − log s, computed from this step's log-probs (one extra forward
  sweep without gradient, see below); per-token weights (vLLM ratios, entropy mask) then act through their
  sequence mean where the gradient flows through s (ppo, sapo): with a reduction that weighs a sequence's
  tokens alike, which every ``loss_type`` does, value and gradient are TRL's.
- ``delta`` (TRL's two-sided clip, INTELLECT-2): with Ψ < 0 TRL's term is −Ψ·min(max(r, 1 − ε_low), c) with
  c = max(δ, 1 + ε_high), with Ψ > 0 it is −Ψ·min(r, δ, 1 + ε_high). For δ ≥ 1 + ε_high that is exactly
  ``ppo_loss(dual_clip=δ)``; for 1 < δ < 1 + ε_high it is ``ppo_loss(epsilon_high=δ − 1, dual_clip=1 + ε_high)``
  (also exact; TRL's "clip_ratio" metrics then differ: ours counts the tokens the dual clip caps). TRL applies
  ``delta`` only to the clipped-surrogate loss types, and so does ``"trl"``.
- ``beta`` > 0: TRL's k3 KL to ``ref_per_token_logps``, with ``use_bias_correction_kl`` (TRL's default) the
  library's ``bias_correction_kl=True`` (k3·r, r = p/p_old differentiable). The library's k3 is verl's
  (log-ratio clamped at ±20, value at 10); TRL's is unclamped: they differ only where |log p − log p_ref| > ~2.4.
- ``off_policy_mask_threshold`` (DeepSeek-V3.2's off-policy sequence mask, TRL's ``get_off_policy_mask`` on
  the sampler's log-probs, else the old ones) and ``top_entropy_quantile`` (TRL's ``get_high_entropy_mask``:
  the quantile over every process's tokens) are 0/1 weights on the policy term only, folded into Ψ (every
  formula here is 0 at Ψ = 0 and positively homogeneous in Ψ), so the KL term stays on every token as in TRL.
- vLLM importance sampling (``vllm_importance_sampling_correction``, every ``vllm_importance_sampling_mode``):
  TRL's ratio (per token or per sequence, truncated or masked) is a weight ≥ 0 on the policy term, folded into
  Ψ the same way; for vespo it enters the sequence weight as ``sampler_ratio`` instead, as in TRL.
- ``temperature``, ``epsilon``/``epsilon_high``, ``num_iterations`` > 1 (``old_per_token_logps``; PPO+LCO for
  "lco"), completion and tool masks, a static ``entropy_coef`` are honoured.

Log-probs the loss needs before its head runs (TRL's on-policy old log-probs, which TRL does not compute; the
entropy for ``top_entropy_quantile``; the current log-probs for ``off_policy_mask_threshold`` and for the
sequence ratio above) come from one forward sweep without gradient (``token_logprobs`` /
``fused_linear_token_logprobs``, the loss's own kernel: its values are the loss's), only when needed.

``fused_linear=True`` computes the loss from the last hidden states and the LM-head weight, never
materialising the (B, T, V) logits. Per-token statistics from the loss's own sweep go into TRL's metrics:
``entropy``, ``kl``, ``clip_ratio/region_mean`` and ``lco/token_prob``, ``lco/target_prob``,
``lco/clamped_frac``, ``lco/logit_grad_norm``.

What cannot be expressed raises ``ValueError`` at construction (``LCOGRPOTrainer._check_supported``):
``importance_sampling_level="sequence"`` with ``beta`` > 0 and ``use_bias_correction_kl`` (TRL multiplies each
token's KL by the sequence ratio, whose gradient reaches every token of the sequence: no per-token KL term
has it); ``entropy_coef`` with ``top_entropy_quantile`` < 1 (TRL's bonus covers the high-entropy tokens only,
the library's entropy term every token its loss covers) or with the per-sequence normalisers of "grpo" /
"sapo"; ``use_adaptive_entropy``; ``delta`` ≤ 1; the sequence level for "lco" / "pg" and ``delta`` for
formulas without a clipped ratio (by name); ``use_bias_correction_kl`` with "pg" (no ratio); MoE router
losses; and ``fused_linear=True`` for models that scale or soft-cap their logits.
"""
import functools
import inspect
import math
import types

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer

import lco_kernels
from lco_kernels.registry import LOSSES

POLICY_LOSSES = ("lco", "trl", "ppo", "pg", "cispo", "gspo", "sapo", "vespo")
# TRL loss_type -> the library loss computing its formula (policy_loss="trl"); the normaliser: _reduction
_TRL_FORMULAS = {"grpo": "ppo", "bnpo": "ppo", "dr_grpo": "ppo", "dapo": "ppo", "luspo": "ppo", "cispo": "cispo",
                 "sapo": "sapo", "vespo": "vespo"}
# formulas whose ratio (hence whose gradient) may be the sequence's: TRL's importance_sampling_level="sequence"
_SEQUENCE_LEVEL = ("ppo", "gspo", "cispo", "sapo", "vespo")
_CLIPPED_SURROGATE = ("ppo", "gspo")  # the formulas TRL's `delta` applies to


class LCOGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with the library's fused policy loss (see the module docstring).

    Args (beyond GRPOTrainer's):
        policy_loss: "lco" (default), "trl" (the formula GRPOConfig selects), or a formula by name: "ppo" (TRL's
            clipped surrogate), "pg" (REINFORCE), "cispo", "gspo" (TRL's GSPO: set
            importance_sampling_level="sequence" in GRPOConfig), "sapo", "vespo".
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
        self._set_formula()
        if fused_linear:
            _add_hidden_states_forward(self.model.get_base_model() if is_peft_model(self.model) else self.model)

    def _formula(self):
        """The formula (a library loss name) this configuration selects."""
        name = _TRL_FORMULAS.get(self.loss_type) if self.policy_loss == "trl" else self.policy_loss
        return "gspo" if name == "ppo" and self.importance_sampling_level == "sequence" else name

    def _set_formula(self):
        """The library loss to call and how the sequence ratio reaches it (see the module docstring)."""
        formula = self._formula()
        self._delta = self.args.delta if formula in _CLIPPED_SURROGATE else None
        # GSPO with delta: the straight-through sequence ratio through ppo_loss's dual clip
        self._loss = "ppo" if formula == "gspo" and self._delta is not None else formula
        self._straight_through = self.importance_sampling_level == "sequence" and self._loss in ("ppo", "cispo", "sapo")
        # where the gradient flows through the sequence ratio, per-token weights act through their sequence mean
        self._ratio_gradient = self._loss == "gspo" or (self._straight_through and self._loss != "cispo")
        self._bias_correction = self.beta != 0.0 and self.args.use_bias_correction_kl

    def _check_supported(self):
        args = self.args
        formula = self._formula()
        named = self.policy_loss != "trl"
        bias_kl = self.beta != 0.0 and args.use_bias_correction_kl
        unsupported = {
            "loss_type": (self.loss_type not in _TRL_FORMULAS,
                          f"{self.loss_type!r} is not one of TRL's loss types {sorted(_TRL_FORMULAS)}"),
            f"loss_type={self.loss_type!r}": (
                named and _TRL_FORMULAS.get(self.loss_type, "ppo") != "ppo"
                and self.loss_type != self.policy_loss,
                f"TRL's {self.loss_type!r} is a formula: use policy_loss='trl' (or {self.loss_type!r}) for it, or "
                f"loss_type='dapo' for its normaliser with policy_loss={self.policy_loss!r}"),
            "importance_sampling_level": (
                (self.importance_sampling_level == "sequence" and formula not in _SEQUENCE_LEVEL)
                or (self.policy_loss == "gspo" and self.importance_sampling_level != "sequence"),
                "'sequence' is a sequence importance ratio, which 'lco' and 'pg' do not have; policy_loss='gspo' "
                "needs it (it is TRL's GSPO: stock GRPOTrainer with this GRPOConfig computes the same loss)"),
            "delta": (args.delta is not None and (args.delta <= 1 or (named and formula not in _CLIPPED_SURROGATE)),
                      "TRL's two-sided clip caps the ratio of the clipped surrogate ('ppo', 'gspo', 'trl') at "
                      "delta > 1"),
            "use_bias_correction_kl": (
                bias_kl and (self.importance_sampling_level == "sequence" or formula == "pg"),
                "TRL's default with beta != 0 multiplies the k3 KL by the ratio p/p_old: with "
                "importance_sampling_level='sequence' by the sequence ratio, whose gradient reaches every token of "
                "the sequence, which no per-token KL term has; 'pg' has no ratio. Set "
                "use_bias_correction_kl=False (the plain k3 KL of GRPO and verl)"),
            "use_adaptive_entropy": (self.use_adaptive_entropy, "not supported (a static entropy_coef is)"),
            "entropy_coef": (self.entropy_coef != 0.0 and (self.loss_type in ("grpo", "sapo")
                                                            or self.top_entropy_quantile < 1.0),
                             "TRL's bonus is a token mean (over the high-entropy tokens with top_entropy_quantile < "
                             "1), which loss_type='grpo''s and 'sapo''s per-sequence mean cannot carry and the "
                             "library's entropy term (on every token of the loss) cannot restrict"),
            "rho_pos/rho_neg": (self.policy_loss != "lco" and (self.rho_pos, self.rho_neg) != (1.8, 0.9),
                                "only apply to policy_loss='lco'"),
        }
        for name, (bad, why) in unsupported.items():
            if bad:
                raise ValueError(f"LCOGRPOTrainer: {name}: {why}")
        loss = "ppo" if formula == "gspo" and args.delta is not None else formula
        fn = getattr(lco_kernels, f"fused_linear_{loss}_loss" if self.fused_linear and loss in ("gspo", "vespo")
                     else f"{loss}_loss", None)
        if fn is None or (bias_kl and "bias_correction_kl" not in inspect.signature(fn).parameters) or (
                self.fused_linear and loss not in ("gspo", "vespo") and loss not in LOSSES):
            raise ValueError(f"LCOGRPOTrainer: this lco_kernels has no {loss!r} loss"
                             f"{' with bias_correction_kl' if bias_kl else ''}"
                             f"{' in fused-linear form' if self.fused_linear else ''}")
        if self.fused_linear:
            scale = _logit_transform(self.model.config.get_text_config())
            if scale:
                raise ValueError(f"fused_linear=True: the model transforms its logits ({scale}), which the fused "
                                 "linear loss does not; use fused_linear=False")
        if self.aux_loss_enabled:
            raise ValueError("LCOGRPOTrainer: MoE router losses are not supported (set router_aux_loss_coef=0)")

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
            if self._bias_correction:
                options["bias_correction_kl"] = True

        with self.accelerator.autocast():
            if self.fused_linear:
                hidden = model(input_ids=input_ids, attention_mask=attention_mask, lco_hidden_states=True)
                hidden = hidden[:, -n_keep - 1:-1]
                head = self.accelerator.unwrap_model(model).get_output_embeddings()
                sweep = functools.partial(lco_kernels.fused_linear_token_logprobs, hidden, head.weight, labels,
                                          bias=head.bias)
                if self._loss == "gspo":
                    loss_fn = lco_kernels.fused_linear_gspo_loss
                elif self._loss == "vespo":
                    loss_fn = lco_kernels.fused_linear_vespo_loss
                else:
                    loss_fn = functools.partial(lco_kernels.fused_linear_policy_loss, loss=self._loss)
                loss_fn = functools.partial(loss_fn, hidden, head.weight, labels, bias=head.bias)
            else:
                logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=n_keep + 1,
                               use_cache=False).logits[:, :-1]
                sweep = functools.partial(lco_kernels.token_logprobs, logits, labels)
                loss_fn = functools.partial(getattr(lco_kernels, f"{self._loss}_loss"), logits, labels)
            advantages, old, sampler_ratio = self._policy_inputs(inputs, mask, sweep)
            if self._loss == "vespo" and sampler_ratio is not None:
                options["sampler_ratio"] = sampler_ratio
            loss, stats = loss_fn(advantages, **self._policy_options(old), **options)

        self._log_token_stats(mode, stats, mask, inputs)
        return loss

    def _policy_inputs(self, inputs, mask, sweep):
        """(advantages, old log-probs, vLLM ratio for vespo) as the library loss takes them: TRL's weights on the
        policy term folded into Ψ, the sequence ratio as straight-through old log-probs (module docstring).
        ``sweep(temperature=..., return_entropy=...)``: this step's log-probs, computed here (without gradient)
        only when something needs them before the loss's head runs."""
        advantages = inputs["advantages"]
        if advantages.dim() == 1:  # TRL's per-sequence advantages
            advantages = advantages[:, None]
        old = inputs.get("old_per_token_logps")
        need_entropy = self.top_entropy_quantile < 1.0
        needs_old = self._loss in ("ppo", "cispo", "sapo", "vespo") or (self._loss == "lco" and self._bias_correction)
        current = entropy = None
        if need_entropy or self._straight_through or self.off_policy_mask_threshold is not None or (
                old is None and needs_old):
            with torch.no_grad():
                current, entropy = sweep(temperature=self.temperature, return_entropy=True)
            if old is None:  # on-policy (TRL skips computing them): the current log-probs, detached
                old = current

        weight = torch.ones_like(advantages)  # TRL's per-token (or per-sequence) factors of the policy term
        if self.off_policy_mask_threshold is not None:
            sampler = inputs.get("sampling_per_token_logps", old)
            weight = weight * self.get_off_policy_mask(advantages, current, sampler, mask,
                                                       self.off_policy_mask_threshold)
        if need_entropy:
            weight = weight * self.get_high_entropy_mask(entropy, mask, 1 - self.top_entropy_quantile)
        sampler_ratio = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            if self._loss == "vespo":  # TRL folds it into VESPO's sequence weight, not onto the term
                sampler_ratio = inputs["importance_sampling_ratio"]
            else:
                weight = weight * inputs["importance_sampling_ratio"]
        if self._ratio_gradient:
            # TRL's term of a sequence of L tokens is ℓ(s)·Σ_t c·w_t, c the reduction's weight of its tokens (the
            # same for all of them under every loss_type): per log p_t its gradient is c·(Σ_t w_t)·ℓ'(s)·s/L,
            # where the straight-through form gives c·w_t·ℓ'(s)·s. With the sequence's mean weight in place of
            # each w_t, value and gradient are TRL's.
            weight = (weight * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        advantages = advantages * weight

        if self._straight_through:
            # log s: TRL's mean log-ratio over the sequence's tokens (unclamped); log p_t − log s as old log-probs
            # makes the loss's ratio s·p_t/sg(p_t): value s, gradient s·∇log p_t
            log_s = ((current - old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
            old = current - log_s
        if self._loss == "cispo":
            # TRL's 'cispo' caps the weight at epsilon_high itself, its other loss types (and the library) at
            # 1 + epsilon_high. min(r, c)·Ψ = min(r/c, 1)·(c·Ψ): the library's cap at 1 on old log-probs + log c
            cap = self.epsilon_high if self.loss_type == "cispo" else 1.0 + self.epsilon_high
            old, advantages = old + math.log(cap), advantages * cap
        return advantages, old, sampler_ratio

    def _policy_options(self, old):
        """The formula's own options. ``old``: TRL's old log-probs, or on-policy the current ones detached
        (the ratio is then exactly 1, as TRL's); for "gspo" possibly None, with which ``gspo_loss`` takes
        them from its own sweep (no second pass)."""
        args = self.args
        if self._loss == "pg":
            return {}
        if self._loss == "lco":
            options = {"rho_pos": self.rho_pos, "rho_neg": self.rho_neg}
            if old is not None:  # PPO+LCO's trust region
                options.update(old_logprobs=old, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high)
            return options
        options = {"old_logprobs": old}
        if self._loss == "cispo":
            options["epsilon_high"] = 0.0  # the cap is in ``old`` (see _policy_inputs)
        elif self._loss == "sapo":
            options.update(tau_pos=args.sapo_temperature_pos, tau_neg=args.sapo_temperature_neg)
        elif self._loss == "vespo":
            options.update(k_pos=args.vespo_k_pos, lambda_pos=args.vespo_lambda_pos, k_neg=args.vespo_k_neg,
                           lambda_neg=args.vespo_lambda_neg)
        else:  # "ppo", "gspo"
            options.update(epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high)
            if self._delta is not None:
                # TRL's two-sided clip (module docstring): Ψ > 0 capped at min(δ, 1 + ε_high), Ψ < 0 at max(δ, 1 + ε_high)
                high = 1.0 + self.epsilon_high
                options.update(epsilon_high=min(self._delta, high) - 1.0, dual_clip=max(self._delta, high))
        return options

    def _reduction(self, inputs, mask, mode):
        """TRL's normaliser for ``loss_type`` as the library's reduction and global count (GRPOTrainer._compute_loss)."""
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1
        n_seq = mask.size(0)
        if self.loss_type in ("grpo", "sapo"):
            return {"reduction": "seq-mean-token-mean", "seq_count": n_seq * accum}
        if self.loss_type == "bnpo":
            count = mask.sum().clamp(min=1.0) * accum
        elif self.loss_type == "dr_grpo":
            count = n_seq * self.max_completion_length * accum
        elif self.loss_type == "luspo":
            count = n_seq * accum
        else:  # "dapo", "cispo", "vespo": num_items_in_batch spans the generation batch, all processes
            count = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                count = count * accum / self.args.steps_per_generation
        return {"reduction": "mean", "token_count": count}

    def _log_token_stats(self, mode, stats, mask, inputs):
        """Masked means over all processes of the loss sweep's per-token statistics, into TRL's metrics; with a
        sequence ratio the clip ratio is over sequences, as TRL's sequence-level one (a sequence is clipped as
        a whole)."""
        mask = mask.float()
        logged = {"entropy": stats.entropy, "lco/token_prob": stats.logprobs.exp(),
                  "lco/logit_grad_norm": stats.logit_grad_norm, "lco/target_prob": stats.target_prob,
                  "lco/clamped_frac": stats.clamped, "clip_ratio/region_mean": stats.clipped}
        if self.beta != 0.0:
            x = inputs["ref_per_token_logps"] - stats.logprobs
            logged["kl"] = torch.exp(x) - x - 1
        means = {name: ((v.float() * mask).sum(), mask.sum()) for name, v in logged.items() if v is not None}
        if stats.clipped is not None and self.importance_sampling_level == "sequence":
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
