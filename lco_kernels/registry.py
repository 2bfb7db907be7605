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


class KL(enum.IntEnum):
    """verl's KL estimators of KL(π ‖ π_ref) per token, x = log p_i − log p_ref (``kl_penalty``)."""
    K1 = 0      # "k1" / "kl": x
    K2 = 1      # "k2" / "mse": x² / 2
    K3 = 2      # "k3" / "low_var_kl": e^{−x} + x − 1 with x clamped to ±20, the result to ±10
    ABS = 3     # "abs": |x|


KL_NAMES = {"k1": KL.K1, "kl": KL.K1, "k2": KL.K2, "mse": KL.K2, "k3": KL.K3, "low_var_kl": KL.K3, "abs": KL.ABS}


@dataclasses.dataclass(frozen=True)
class LossInfo:
    """What the API must know about one loss."""
    kind: Kind
    advantages: bool            # takes (and requires) advantages Ψ
    old_logprobs: str           # "required" | "optional" (changes the loss when given) | "none"
    hyperparameters: tuple      # names of the loss-specific keyword options it takes
    target: bool = False        # builds a target distribution: stats report target_prob / clamped


LOSSES = {
    "sft": LossInfo(Kind.SFT, advantages=False, old_logprobs="none", hyperparameters=()),
    "pg": LossInfo(Kind.PG, advantages=True, old_logprobs="none", hyperparameters=()),
    "ppo": LossInfo(Kind.PPO, advantages=True, old_logprobs="required",
                    hyperparameters=("epsilon_low", "epsilon_high", "dual_clip")),
    "cispo": LossInfo(Kind.CISPO, advantages=True, old_logprobs="required", hyperparameters=("epsilon_high",)),
    "lco": LossInfo(Kind.LCO, advantages=True, old_logprobs="optional",
                    hyperparameters=("rho_pos", "rho_neg", "epsilon_low", "epsilon_high"), target=True),
}


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One checked configuration of a loss: what a kernel launch needs besides the tensors."""
    name: str
    rho_pos: float = RHO_POS
    rho_neg: float = RHO_NEG
    epsilon_low: float = EPSILON
    epsilon_high: float = EPSILON
    dual_clip: float | None = None
    beta: float = 0.0
    kl_type: KL = KL.K3
    entropy_coef: float = 0.0
    temperature: float = 1.0
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
        return self.has_old and self.kind in (Kind.PPO, Kind.CISPO, Kind.LCO)

    @property
    def has_entropy_term(self):
        return self.entropy_coef != 0.0
