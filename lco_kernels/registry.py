"""The losses the vocabulary kernel computes: one table, from which the public functions' checks, the
kernels' head selection, the ahead-of-time head list and the tests' variants are all derived.

Every loss here sees the logits only through log p_i, so its logit gradient is α·(p̃ − e_i)
(SPEC §1); the head maps (log p_i, log(1 − p_i), Ψ, old/reference log-probs) to (loss, α).

Adding a loss: see "Adding a loss" in docs/contributing.md.
"""
import dataclasses
import enum

# Defaults shared by every signature that takes these hyperparameters.
RHO_POS = 1.8
RHO_NEG = 0.9
EPSILON = 0.2


class Kind(enum.IntEnum):
    """The head a forward launch selects (a Triton constexpr)."""
    SFT = 0     # −log p_i
    PG = 1      # REINFORCE: −Ψ·log p_i
    PPO = 2     # clipped surrogate −min(r·Ψ, clip(r)·Ψ) (+ dual clip)
    CISPO = 3   # −sg(min(r, 1 + ε_high))·Ψ·log p_i
    LCO = 4     # |Ψ|·KL(π' ‖ π) (+ PPO+LCO trust-region mask when old log-probs are given)
    SAPO = 5    # soft gate −(4/τ)·σ(τ(r − 1))·Ψ, τ by the sign of Ψ
    DPPO = 6    # −sg(min(r, C))·Ψ·log p_i on tokens inside a divergence trust region (TV or binary KL)
    DRO = 7     # −Ψ·log p_i + (β/2)(log p_i − log p_old)²


class KL(enum.IntEnum):
    """verl's KL estimators of KL(π ‖ π_ref) per token, x = log p_i − log p_ref (``kl_penalty``)."""
    K1 = 0      # "k1" / "kl": x
    K2 = 1      # "k2" / "mse": x² / 2
    K3 = 2      # "k3" / "low_var_kl": e^{−x} + x − 1 with x clamped to ±20, the result to ±10
    ABS = 3     # "abs": |x|


# DPPO's divergence between the old and the current policy, restricted to the sampled token
# (a Bernoulli over {i, not i}): "tv" = p_i − p_old, "kl" = KL(Bernoulli(p_old) ‖ Bernoulli(p_i)).
DIVERGENCES = {"tv": 0, "kl": 1}

KL_NAMES = {"k1": KL.K1, "kl": KL.K1, "k2": KL.K2, "mse": KL.K2, "k3": KL.K3, "low_var_kl": KL.K3, "abs": KL.ABS}


@dataclasses.dataclass(frozen=True)
class LossInfo:
    """What the API must know about one loss."""
    kind: Kind
    advantages: bool            # takes (and requires) advantages Ψ
    old_logprobs: str           # "required" | "optional" (changes the loss when given) | "none"
    hyperparameters: tuple      # names of the loss-specific keyword options it takes
    target: bool = False        # builds a target distribution: stats report target_prob / clamped
    reduction: str = "mean"     # the public function's default reduction

    @property
    def options(self):
        """Every loss-specific keyword option of the public function: its hyperparameters, the optional
        old log-probs, and the reference-KL options of the losses that take advantages (with TRL's
        ``bias_correction_kl`` where old log-probs can be given). tests/test_losses.py checks each
        public signature against this and the shared options, so signatures cannot drift."""
        out = self.hyperparameters + (("old_logprobs",) if self.old_logprobs == "optional" else ())
        if self.advantages:
            out += ("ref_logprobs", "beta", "kl_type")
            if self.old_logprobs != "none":
                out += ("bias_correction_kl",)
        return out


LOSSES = {
    "sft": LossInfo(Kind.SFT, advantages=False, old_logprobs="none", hyperparameters=()),
    "pg": LossInfo(Kind.PG, advantages=True, old_logprobs="none", hyperparameters=()),
    "ppo": LossInfo(Kind.PPO, advantages=True, old_logprobs="required",
                    hyperparameters=("epsilon_low", "epsilon_high", "dual_clip")),
    "cispo": LossInfo(Kind.CISPO, advantages=True, old_logprobs="required",
                      hyperparameters=("epsilon_low", "epsilon_high")),
    "lco": LossInfo(Kind.LCO, advantages=True, old_logprobs="optional",
                    hyperparameters=("rho_pos", "rho_neg", "epsilon_low", "epsilon_high"), target=True),
    # verl and TRL / Liger both aggregate SAPO per sequence, whatever the configured mode: its default.
    "sapo": LossInfo(Kind.SAPO, advantages=True, old_logprobs="required", hyperparameters=("tau_pos", "tau_neg"),
                     reduction="seq-mean-token-mean"),
    "dppo": LossInfo(Kind.DPPO, advantages=True, old_logprobs="required",
                     hyperparameters=("divergence", "delta_low", "delta_high", "clip_ratio_c")),
    "dro": LossInfo(Kind.DRO, advantages=True, old_logprobs="required", hyperparameters=("dro_beta",)),
}


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One checked configuration of a loss: what a kernel launch needs besides the tensors."""
    name: str
    rho_pos: float = RHO_POS
    rho_neg: float = RHO_NEG
    epsilon_low: float | None = EPSILON  # None: CISPO's one-sided cap (no lower clip)
    epsilon_high: float = EPSILON
    dual_clip: float | None = None
    beta: float = 0.0
    kl_type: KL = KL.K3
    entropy_coef: float = 0.0
    temperature: float = 1.0
    tau_pos: float = 1.0        # SAPO's gate temperatures
    tau_neg: float = 1.05
    divergence: int = 0         # DPPO: a value of DIVERGENCES
    delta_low: float = 0.2      # DPPO's divergence thresholds
    delta_high: float = 0.2
    clip_ratio_c: float = 3.0   # DPPO's truncation C of the importance weight
    dro_beta: float = 0.0       # DRO's β
    bias_correction_kl: bool = False  # the KL term times the token ratio r (TRL's use_bias_correction_kl)
    has_old: bool = False       # old log-probs are given
    has_ref: bool = False       # reference log-probs are given and β > 0

    @property
    def info(self) -> LossInfo:
        return LOSSES[self.name]

    @property
    def kind(self) -> Kind:
        return self.info.kind

    @property
    def has_target(self):
        return self.info.target

    @property
    def can_clip(self):
        """A clip or trust region can take a token's gradient away: stats report ``clipped``."""
        return self.has_old and self.kind in (Kind.PPO, Kind.CISPO, Kind.LCO, Kind.DPPO)

    @property
    def has_entropy_term(self):
        return self.entropy_coef != 0.0
