"""LeetCode-style feedback text for the self-teacher (docs/algorithm.md §6).

A compile error, runtime error or time/memory/output limit shows that one case with its "Last Executed Input";
otherwise up to two of the shortest failing cases as "Test Case k: Wrong Answer" with Input / Output / Expected.
Limits (the paper's): 2000 characters in all, 250 per field, 8 lines of input.
"""

from __future__ import annotations

from dataclasses import dataclass
import re

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


_TRACEBACK = "Traceback (most recent call last):"
_FRAME = re.compile(r'^\s*File ".*", line \d+')


def clip_error(text: str, max_chars: int) -> str:
    """Shorten an error for feedback, keeping what says what went wrong.

    A traceback keeps its last frame in solution.py (the failing line of the program) and the head of the exception
    line (its type and the start of the message); a long message is cut at its end, not its start. Other text (a
    reason, a program's stderr without a traceback) keeps its tail.
    """
    text = text.strip("\n")
    if len(text) <= max_chars:
        return text
    start = text.rfind(_TRACEBACK)  # the last one: the exception that ended the program
    if start < 0:
        return clip(text, max_chars, keep="tail")
    lines = text[start:].split("\n")[1:]
    frame_starts = [k for k, line in enumerate(lines) if _FRAME.match(line)]
    if not frame_starts:
        return clip(text, max_chars, keep="tail")
    exception_at = frame_starts[-1] + 1
    while exception_at < len(lines) and lines[exception_at].startswith("    "):  # the frame's source line(s)
        exception_at += 1
    exception = "\n".join(lines[exception_at:]).strip() or "(no exception line)"
    at = ([k for k in frame_starts if '"solution.py"' in lines[k]] or frame_starts)[-1]
    kept = [_TRACEBACK, "  ..."] if len(frame_starts) > 1 else [_TRACEBACK]
    kept.append(clip(lines[at], 100))
    if at + 1 < len(lines) and lines[at + 1].startswith("    "):
        kept.append(clip(lines[at + 1], 100))
    if at != frame_starts[-1]:  # raised inside a library the program called
        kept.append("  ...")
    head = "\n".join(kept) + "\n"
    if len(head) > max_chars - 40:
        return clip(exception, max_chars)
    return head + clip(exception, max_chars - len(head))


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
        parts.append(clip_error(outcome.error, limits.field_chars))
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
