"""How GRPO and SDPO are mixed (`algorithm.mix`, docs/algorithm.md §3): a registry of `Mix` objects, so that the
objective, the learner and the config ask the mix what it does instead of naming it.

- "loss" (TRL's port): lambda * policy_loss + (1 - lambda) * distill_loss, each term normalised on its own; any
  distillation mode.
- "advantage" (paper Eq. 3): A = lambda A_GRPO + (1 - lambda) A_SDPO inside the clipped policy-gradient loss, with the
  sampled-token SDPO advantage; no separate distillation term.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdpo.registry import Registry


@dataclass(frozen=True)
class Mix:
    # The SDPO signal enters the policy gradient's advantage (it then needs a mode with a token advantage, and the
    # policy loss runs at weight 1 even for pure SDPO); otherwise it is a loss term of its own.
    in_advantage: bool

    def policy_weight(self, grpo_weight: float) -> float:
        """The weight of the clipped policy-gradient loss."""
        return 1.0 if self.in_advantage else grpo_weight

    def uses_policy_loss(self, grpo_weight: float) -> bool:
        return grpo_weight > 0.0 or self.in_advantage

    @property
    def distill_term(self) -> bool:
        """Whether the distillation loss is a term of its own (weight 1 - lambda)."""
        return not self.in_advantage


MIXES: Registry[Mix] = Registry("GRPO/SDPO mix")
MIXES.register("loss")(Mix(in_advantage=False))
MIXES.register("advantage")(Mix(in_advantage=True))
