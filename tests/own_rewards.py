"""Reward functions in an importable module (as a researcher's own `my_rewards.py` would be): they pickle, so the
dataset environment runs them in worker processes, and `module:function` names them from the command line."""

from __future__ import annotations

import time


def contains_word(prompts, completions, word, **kwargs):
    """1 when the completion contains the row's word; feedback naming the word otherwise."""
    return [(1.0, "") if w in c else (0.0, f"The response should contain {w!r}.") for c, w in zip(completions, word)]


def length_penalty(completions, **kwargs):
    """A scalar reward only (no feedback): minus the completion's length in hundreds of characters."""
    return [-len(c) / 100 for c in completions]


def hang_on_hang(completions, **kwargs):
    """Never returns for the completion "hang" (a stuck scorer); 1 otherwise."""
    if completions == ["hang"]:
        time.sleep(1000)
    return [1.0 for _ in completions]
