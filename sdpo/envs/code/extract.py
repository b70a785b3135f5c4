"""The program inside a model response: the last complete fenced Python block."""

from __future__ import annotations

import re

_OPEN = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n`]*$")
_CLOSE = re.compile(r"^[ \t]*```[ \t]*$")
_PYTHON_TAGS = {"python", "python3", "py", "py3"}


def answer_instruction(what: str) -> str:
    """The prompts' closing request for what `extract_program` reads: "the complete <what>" in one ```python block."""
    return f"End your answer with the complete {what} in a single ```python code block."


def extract_program(response: str) -> str | None:
    """The last closed ```python block (```py and ```python3 count too); else the last closed untagged block.

    An unclosed block (a response cut off mid-code) does not count. Blocks in other languages never do. The
    thinking part (`<think>...</think>`) is skipped: a draft there is not the answer.
    """
    if "</think>" in response:
        response = response.rsplit("</think>", 1)[1]
    last_python = last_untagged = None
    tag, body = None, []
    for line in response.splitlines():
        if tag is None:
            opened = _OPEN.match(line)
            if opened:
                tag, body = opened.group(1).lower(), []
        elif _CLOSE.match(line):
            code = "\n".join(body) + "\n"
            if tag in _PYTHON_TAGS:
                last_python = code
            elif tag == "":
                last_untagged = code
            tag = None
        else:
            body.append(line)
    program = last_python if last_python is not None else last_untagged
    return program if program is not None and program.strip() else None
