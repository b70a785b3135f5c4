"""A reward function written for TRL's GRPOTrainer, used unchanged by SDPOTrainer.

TRL's `accuracy_reward` (trl.rewards) checks a completion's \\boxed{} answer against the dataset's `solution` column
with math-verify and returns floats only (None where the gold answer cannot be parsed). The dataset below is in TRL's
conversational format: a `prompt` column of chat messages, so completions reach the function as
`[{"role": "assistant", "content": ...}]`, as TRL passes them. Scalar rewards carry no feedback text: SDPO's teacher
then learns from the successful sibling attempts of the same question.

    python examples/trl_reward.py                      # SmolLM2-135M-Instruct, 8 steps
    python examples/trl_reward.py model=tiny trainer.total_steps=1 rollout=hf   # any overrides (the test's smoke run)

`accuracy_reward` lives in an importable module, so it runs in worker processes that are killed on a timeout
(env.score_timeout_s); a notebook's own functions run in threads (docs/own_data.md).
"""

from __future__ import annotations

import sys

from datasets import Dataset
from trl.rewards import accuracy_reward

from sdpo import SDPOTrainer

INSTRUCTION = "Put the final answer within \\boxed{}."
ROWS = [
    {"prompt": [{"role": "user", "content": f"What is {a} + {b}? {INSTRUCTION}"}], "solution": str(a + b)}
    for a in range(3, 9) for b in range(2, 8)
]


def main(overrides: list[str]) -> SDPOTrainer:
    # `model=` in the overrides picks the policy; the default is the packaged SmolLM2-135M-Instruct.
    trainer = SDPOTrainer(train_dataset=Dataset.from_list(ROWS), reward_funcs=[accuracy_reward],
                          overrides=["trainer.total_steps=8", *overrides])
    trainer.train()
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
