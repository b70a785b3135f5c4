"""The order in which a run visits the training questions."""

from __future__ import annotations

import random


class QuestionSampler:
    """Seeded passes over the training questions in shuffled order; its position is part of a checkpoint."""

    def __init__(self, num_questions: int, seed: int) -> None:
        self.num_questions, self.seed = num_questions, seed
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        order = list(range(self.num_questions))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        picked: list[int] = []
        while len(picked) < count:
            chunk = self._order()[self.position : self.position + count - len(picked)]
            picked += chunk
            self.position += len(chunk)
            if self.position >= self.num_questions:
                self.epoch, self.position = self.epoch + 1, 0
        return picked

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
