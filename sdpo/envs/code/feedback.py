"""LeetCode-style feedback text for the self-teacher (spec section 6).

A compile error, runtime error or time/memory/output limit shows that one case with its "Last Executed Input";
otherwise up to two of the shortest failing cases as "Test Case k: Wrong Answer" with Input / Output / Expected.
Limits (the paper's): 2000 characters in all, 250 per field, 8 lines of input.
"""

from __future__ import annotations

from dataclasses import dataclass

FATAL_HEADINGS = {
    "compile_error": "Compile Error",
    "runtime_error": "Runtime Error",
    "time_limit": "Time Limit Exceeded",
    "memory_limit": "Memory Limit Exceeded",
    "output_limit": "Output Limit Exceeded",
}
TRUNCATED_FEEDBACK = (
    "Truncated Attempt\nThe response hit the length limit before it ended, so its code was not run. "
    "Give a shorter answer that ends with the complete program in a ```python code block."
)
NO_CODE_FEEDBACK = (
    "No code found\nThe response has no complete ```python code block. "
    "End the answer with the complete program in a ```python code block."
)


@dataclass
class TestOutcome:
    """The verdict on one test. `index` counts from 0 among the tests this split shows."""

    __test__ = False  # not a pytest test class, despite the name

    index: int
    # passed | wrong_answer | runtime_error | time_limit | memory_limit | output_limit | not_run
    status: str
    input: str = ""  # how the test's input is shown (stdin text, or the call's arguments)
    expected: str = ""
    output: str = ""  # what the program produced, as shown
    error: str = ""  # a short traceback or the reason for a limit

    @property
    def fatal(self) -> bool:
        return self.status in FATAL_HEADINGS


@dataclass(frozen=True)
class FeedbackLimits:
    total_chars: int = 2000
    field_chars: int = 250
    input_lines: int = 8


def clip(text: str, max_chars: int, max_lines: int | None = None, keep: str = "head") -> str:
    """Shorten to the limits with a visible marker. `keep="tail"` keeps the end (where a traceback says what)."""
    lines = text.rstrip("\n").split("\n")
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines] + ["..."]
    text = "\n".join(lines)
    if len(text) <= max_chars:
        return text
    if keep == "tail":
        return "..." + text[-(max_chars - 3) :]
    return text[: max_chars - 3] + "..."


def format_feedback(outcomes: list[TestOutcome], limits: FeedbackLimits = FeedbackLimits()) -> str:
    """"" when every test passed."""
    fatal = next((o for o in outcomes if o.fatal), None)
    if fatal is not None:
        text = _fatal_case(fatal, limits)
    else:
        failing = [o for o in outcomes if o.status == "wrong_answer"]
        shortest = sorted(failing, key=lambda o: (len(o.input), o.index))[:2]
        text = "\n\n".join(_wrong_answer_case(o, limits) for o in sorted(shortest, key=lambda o: o.index))
    return clip(text, limits.total_chars)


def _fatal_case(outcome: TestOutcome, limits: FeedbackLimits) -> str:
    parts = [FATAL_HEADINGS[outcome.status]]
    if outcome.error:
        parts.append(clip(outcome.error, limits.field_chars, keep="tail"))
    if outcome.status != "compile_error":
        parts += ["Last Executed Input", clip(outcome.input, limits.field_chars, limits.input_lines)]
    return "\n".join(parts)


def _wrong_answer_case(outcome: TestOutcome, limits: FeedbackLimits) -> str:
    return "\n".join(
        [
            f"Test Case {outcome.index + 1}: Wrong Answer",
            "Input",
            clip(outcome.input, limits.field_chars, limits.input_lines),
            "Output",
            clip(outcome.output, limits.field_chars) if outcome.output.strip() else "(no output)",
            "Expected",
            clip(outcome.expected, limits.field_chars),
        ]
    )
