"""What continuing a run needs besides its checkpoint: the command that continues it, the run's logs cut back to the
checkpoint's step, and the check that a run asked to resume still has steps to take.

A run stopped at any point (a signal, a crash, SIGKILL) continues from its newest complete checkpoint with
`trainer.resume=auto` and the same `trainer.output_dir`. The rows that `metrics.jsonl` and `samples.jsonl` got after
that checkpoint's step are dropped when the run resumes (the resumed run logs those steps again), so each step is
logged once; a fresh start (`trainer.resume=auto` without a checkpoint) starts them empty.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
import shlex
import sys

log = logging.getLogger(__name__)

LOGS = ("metrics.jsonl", "samples.jsonl")
_REPLACED = ("trainer.resume", "trainer.output_dir")


def _key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def continue_command(run_dir: str | Path) -> str:
    """`continue with: python scripts/train.py <the same overrides> trainer.output_dir=<run_dir> trainer.resume=auto`
    for a command-line run; for a run built in Python, the two settings to add."""
    settings = [f"trainer.output_dir={run_dir}", "trainer.resume=auto"]
    if Path(sys.argv[0]).name != "train.py":
        return "continue it with " + " ".join(settings)
    kept = [arg for arg in sys.argv[1:] if _key(arg) not in _REPLACED]
    return "continue with: " + shlex.join(["python", sys.argv[0], *kept, *settings])


def checkpoint_step(path: Path) -> int:
    """The step of a complete checkpoint (its COMPLETE marker holds it; the trainer state otherwise)."""
    from sdpo import checkpoint as ckpt

    marker = (path / ckpt.COMPLETE).read_text().strip() if (path / ckpt.COMPLETE).exists() else ""
    return int(marker) if marker.isdigit() else int(ckpt.load_trainer_state(path)["step"])


def resume_source(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint trainer.resume names: the run's newest complete one for "auto" (None: there is none)."""
    from sdpo import checkpoint as ckpt

    if resume == "none":
        return None
    return ckpt.latest_checkpoint(run_dir / "checkpoints") if resume == "auto" else Path(resume)


def finished_message(run_dir: str | Path, resume: str, total_steps: int) -> str | None:
    """For a run asked to resume whose checkpoint already holds trainer.total_steps steps: the line that says so
    (the run then has nothing to do: no weights to load, no engine or server to start). None otherwise."""
    from sdpo.checkpoint import COMPLETE

    path = resume_source(Path(run_dir), resume)
    if path is None or not (path / COMPLETE).exists():
        return None
    step = checkpoint_step(path)
    if step < total_steps:
        return None
    return (f"run {run_dir} is finished: its checkpoint {path} holds step {step} of trainer.total_steps="
            f"{total_steps}; nothing to do (raise trainer.total_steps to train further)")


def drop_rows_after(run_dir: Path, step: int) -> int:
    """Remove the rows of the run's logs past `step` (all of them for step -1), and a row cut short by a kill;
    returns how many rows went. Each file is rewritten whole and renamed into place."""
    dropped = 0
    for name in LOGS:
        path = run_dir / name
        if not path.exists():
            continue
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if (row_step := _row_step(line)) is not None and row_step <= step]
        if len(kept) == len(lines):
            continue
        dropped += len(lines) - len(kept)
        staging = path.with_name(f".{name}.tmp")
        staging.write_text("".join(line if line.endswith("\n") else line + "\n" for line in kept), encoding="utf-8")
        os.replace(staging, path)
    if dropped:
        log.info("dropped %d log row(s) past step %d from %s (the resumed run logs those steps again)", dropped,
                 max(step, 0), ", ".join(LOGS))
    return dropped


def _row_step(line: str) -> int | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row.get("step") if isinstance(row, dict) and isinstance(row.get("step"), int) else None
