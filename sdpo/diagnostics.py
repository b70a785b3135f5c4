"""Failure-mode metrics of self-distillation, logged every step under `diagnostics/`.

What public reports say goes wrong with SDPO on small models (docs/algorithm.md §10), each as a number per step:

- `diagnostics/echo_template_fraction`: responses that contain a fixed phrase of the reprompt templates ("Correct
  solution:", "Correctly solve the original question.", ...). The student never sees these; only the teacher does.
- `diagnostics/echo_feedback_fraction`: responses that share a word n-gram (`ECHO_NGRAM` words) with the
  environment feedback the teacher saw for *other* questions of the step, which is not in the response's own prompt.
  Other questions only: a rollout's own feedback quotes the rollout ("56 is not the correct answer"), so overlap with
  it says nothing; text from another question's feedback reaches a response only when the student learned to write
  like the teacher's context. Demonstrations are left out here: they are the student's own siblings, sampled from the
  same weights, so sharing phrases with them is the model's style, not an echo (copying below measures that).
- `diagnostics/demo_copy`: how much more a response resembles its own demonstration (the sibling success the teacher
  saw) than a successful response to another question of the step: overlap(y, demo) - overlap(y, other), where
  overlap(a, b) is the fraction of a's word 3-grams found in b, with every number replaced by one symbol. Numbers are
  what the answer is in math tasks, so two responses that agree only on their numbers (the answer, the operands) do
  not count as copies; the other question's success has different numbers and is on the same footing once they are
  masked, and subtracting its overlap removes what every response of this model shares (its style). ~0: the response
  is no closer to its demonstration than to any success; towards 1: it repeats the demonstration's wording. Mean over
  the rollouts that had a demonstration and a step with a success on another question; null otherwise.
- `diagnostics/length_drift`, `diagnostics/entropy_drift`: the step's mean response length divided by that of the
  first step (1.0 = unchanged; privileged context is reported to shorten responses), and its mean token entropy minus
  the first step's (collapse shows as entropy falling towards 0). The first step's values live in the trainer state,
  so a resumed run keeps measuring against the same origin.
- `diagnostics/small_grad_fraction`: the fraction of the step's optimizer steps whose gradient is too small to move the
  weights: grad norm <= AdamW eps * sqrt(number of trainable weights), i.e. the root-mean-square gradient coordinate
  is at most eps. There Adam's update lr * m / (sqrt(v) + eps) is damped by eps to at most lr / 2 per coordinate and
  shrinks in proportion to the gradient below it; a gradient of exactly 0 (pure SDPO with no success and no feedback in
  the batch, "SDPO stayed inactive") is the common case. (`teacher/reprompt_fraction` says how many rollouts had any
  signal at all.)

All functions below are pure (text, word lists, numbers); `FailureModes` holds the first step's values.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import re
import string

from sdpo.config import RepromptConfig

PREFIX = "diagnostics/"
# Five words: "is not the correct answer" is a feedback phrase; shorter n-grams ("the answer is") are common speech.
# The one echo definition of the library: the pre-flight probe (sdpo/probe.py) uses `echoes`, `template_phrases` and
# `contains_phrase` too, so that its echo rate forecasts this metric. Words are counted without punctuation, so that
# n counts words ("it is, truly." is 3 words) and a comma in a copy does not break a match.
ECHO_NGRAM = 5
COPY_NGRAM = 3
_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")
_NUMBER = re.compile(r"^[0-9]+(?:\.[0-9]+)?$")


def words(text: str) -> list[str]:
    """Lower-cased words (letters and digits; a decimal number is one word): tokenizer-independent units."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def template_phrases(config: RepromptConfig) -> list[str]:
    """The fixed text of the three reprompt templates, split at their placeholders, as word lists joined by spaces;
    pieces of fewer than two words (bare newlines, "{prompt}{solution}") are dropped."""
    formatter = string.Formatter()
    phrases = []
    for template in (config.reprompt_template, config.solution_template, config.feedback_template):
        for literal, *_ in formatter.parse(template):
            piece = words(literal)
            if len(piece) >= 2:
                phrases.append(" ".join(piece))
    return phrases


def contains_phrase(text: str, phrases: Sequence[str]) -> bool:
    """Whether any phrase (a space-joined word list) occurs as consecutive words of `text`."""
    joined = f" {' '.join(words(text))} "
    return any(f" {p} " in joined for p in phrases)


def echoes(response: str, context: Sequence[str], prompt: str, n: int = ECHO_NGRAM) -> bool:
    """Whether `response` shares an n-gram with any of the `context` texts that its own `prompt` does not contain."""
    candidates = set().union(*(ngrams(words(c), n) for c in context)) - ngrams(words(prompt), n) if context else set()
    return bool(ngrams(words(response), n) & candidates)


def _masked(text: str) -> list[str]:
    return ["<num>" if _NUMBER.match(w) else w for w in words(text)]


def overlap(a: str, b: str, n: int = COPY_NGRAM) -> float:
    """The fraction of `a`'s word n-grams (numbers masked) that occur in `b`; 0 when `a` has none."""
    grams_a = ngrams(_masked(a), n)
    return len(grams_a & ngrams(_masked(b), n)) / len(grams_a) if grams_a else 0.0


def demo_copy(response: str, demonstration: str, other_success: str, n: int = COPY_NGRAM) -> float:
    """overlap(response, demonstration) - overlap(response, a success of another question): the module docstring."""
    return overlap(response, demonstration, n) - overlap(response, other_success, n)


def context_metrics(
    config: RepromptConfig,
    questions: Sequence[str],
    responses: Sequence[str],
    solutions: Sequence[str | None],
    feedback: Sequence[str | None],
    rewards: Sequence[float],
    group_ids: Sequence[int],
) -> dict[str, float]:
    """Echo and copying over one step's rollouts (one entry per rollout): `questions` the prompt text the student saw,
    `solutions` / `feedback` what its reprompt carried (None: nothing), `rewards` to find other questions' successes."""
    n = len(responses)
    if n == 0:
        return {}
    phrases = template_phrases(config)
    out = {PREFIX + "echo_template_fraction": sum(contains_phrase(r, phrases) for r in responses) / n}
    feedback_by_group: dict[int, list[str]] = {}
    success_by_group: dict[int, str] = {}
    for i, group in enumerate(group_ids):
        if feedback[i]:
            feedback_by_group.setdefault(group, []).append(feedback[i])
        if rewards[i] >= config.success_reward_threshold:
            success_by_group.setdefault(group, responses[i])  # the first success of each question
    echo = 0
    for i, group in enumerate(group_ids):
        others = [f for g, texts in feedback_by_group.items() if g != group for f in texts]
        echo += echoes(responses[i], others, questions[i])
    out[PREFIX + "echo_feedback_fraction"] = echo / n
    groups = sorted(success_by_group)
    copies = []
    for i, group in enumerate(group_ids):
        other = [g for g in groups if g != group]
        if solutions[i] is not None and other:
            # The next solved question after this one (cyclically): a fixed, seed-free choice.
            pick = next((g for g in other if g > group), other[0])
            copies.append(demo_copy(responses[i], solutions[i], success_by_group[pick]))
    # NaN rather than absent, so that every process reports the same keys; `Distributed.reduce_mean` averages over
    # the processes that have a value and leaves the metric out of the step's metrics when none has.
    out[PREFIX + "demo_copy"] = sum(copies) / len(copies) if copies else math.nan
    return out


def too_small_to_move(grad_norm: float, num_weights: int, adam_eps: float) -> bool:
    """Whether a gradient norm is too small for AdamW to move the weights (the module docstring)."""
    return math.isfinite(grad_norm) and grad_norm <= adam_eps * math.sqrt(max(num_weights, 1))


class FailureModes:
    """The drift metrics' origin (the first step's mean response length and entropy), checkpointed with the run."""

    def __init__(self) -> None:
        self.origin: dict[str, float] = {}

    def drift(self, metrics: dict[str, float]) -> dict[str, float]:
        """Length ratio and entropy difference against the first step that reported them."""
        out = {}
        for key, name in (("response/length_mean", "length_drift"), ("policy/entropy", "entropy_drift")):
            if key not in metrics:
                continue
            origin = self.origin.setdefault(key, float(metrics[key]))
            value = float(metrics[key])
            if name == "length_drift":
                out[PREFIX + name] = value / origin if origin > 0 else math.nan
            else:
                out[PREFIX + name] = value - origin
        return out

    def state_dict(self) -> dict[str, float]:
        return dict(self.origin)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.origin = dict(state)
