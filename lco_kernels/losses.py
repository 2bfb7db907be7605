"""Which per-token policy loss the vocabulary kernel's scalar head computes, and its hyperparameters.

Every loss here sees the logits only through log p_i, so its logit gradient is α·(p̃ − e_i)
(SPEC §1); the head maps (log p_i, log(1 − p_i), Ψ, old/ref log-probs) to (loss, α).
"""
import dataclasses
import enum


class Loss(enum.IntEnum):
    SFT = 0     # −log p_i
    PG = 1      # REINFORCE: −Ψ·log p_i
    PPO = 2     # clipped surrogate −min(r·Ψ, clip(r)·Ψ) (+ dual clip, + β·k3 KL to a reference)
    CISPO = 3   # −sg(min(r, 1 + ε_high))·Ψ·log p_i
    LCO = 4     # |Ψ|·KL(π' ‖ π) (+ PPO+LCO trust-region mask when old log-probs are given)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    kind: Loss
    rho_pos: float = 1.8
    rho_neg: float = 0.9
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    dual_clip: float | None = None
    beta: float = 0.0
    has_old: bool = False       # old log-probs are given (PPO, CISPO, PPO+LCO)
    has_ref: bool = False       # reference log-probs and β > 0 (PPO's k3 KL)

    @property
    def has_target(self):
        """The loss builds a target distribution (LCO): stats report target_prob and clamped."""
        return self.kind == Loss.LCO

    @property
    def can_clip(self):
        return self.kind in (Loss.PPO, Loss.CISPO) or (self.kind == Loss.LCO and self.has_old)
