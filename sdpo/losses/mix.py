"""How GRPO and SDPO are mixed (`algorithm.mix`, docs/algorithm.md §3): a registry of `Mix` objects, so that the
objective, the learner and the config ask the mix what it does instead of naming it.

- "loss" (TRL's port): lambda * policy_loss + (1 - lambda) * distill_loss, each term normalised on its own; any
  distillation mode.
- "advantage" (paper Eq. 3): A = lambda A_GRPO + (1 - lambda) A_SDPO inside the clipped policy-gradient loss, with the
  sampled-token SDPO advantage; no separate distillation term.
- "route" (SRPO, docs/algorithm.md §12): each row takes one signal. A failed row with a reprompt signal is distilled,
  every other row takes the GRPO policy loss, and both sums share one normaliser (the step's tokens); no lambda.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sdpo.registry import Registry


@dataclass(frozen=True)
class Mix:
    # The SDPO signal enters the policy gradient's advantage (it then needs a mode with a token advantage, and the
    # policy loss runs at weight 1 even for pure SDPO); otherwise it is a loss term of its own.
    in_advantage: bool
    # Each row is routed to exactly one of the two losses by its success, both normalised by the step's counts.
    routes: bool = False

    def policy_weight(self, grpo_weight: float) -> float:
        """The weight of the clipped policy-gradient loss."""
        return 1.0 if self.in_advantage or self.routes else grpo_weight

    def distill_weight(self, grpo_weight: float) -> float:
        """The weight of the distillation loss term (when `distill_term`)."""
        return 1.0 if self.routes else 1.0 - grpo_weight

    def uses_policy_loss(self, grpo_weight: float) -> bool:
        return grpo_weight > 0.0 or self.in_advantage or self.routes

    @property
    def distill_term(self) -> bool:
        """Whether the distillation loss is a term of its own."""
        return not self.in_advantage

    def distilled_rows(self, signal_B: Tensor, success_B: Tensor) -> Tensor:
        """Which rows are distilled, given which have a reprompt signal and which succeeded (bool [B] each)."""
        return signal_B & ~success_B if self.routes else signal_B


MIXES: Registry[Mix] = Registry("GRPO/SDPO mix")
MIXES.register("loss")(Mix(in_advantage=False))
MIXES.register("advantage")(Mix(in_advantage=True))
MIXES.register("route")(Mix(in_advantage=False, routes=True))
