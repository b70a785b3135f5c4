"""How a script ends when something goes wrong: one line on the terminal that says what to fix or how to go on,
a non-zero exit code, and the full traceback in the run's log file (on the terminal too with logging.verbose=true).

    error: env.path: /data/rows.jsonl does not exist (a .jsonl/.json/.parquet/.csv file, ...)
    error: vLLM server at http://127.0.0.1:8000 is unreachable during generation: ...; the checkpoints are kept
           (newest: step 4): continue with: python scripts/train.py ... trainer.resume=auto
    stopped by SIGINT after step 3 of 10 (checkpoint runs/x/checkpoints/step-000003); continue with: ...

Errors of the input (config, data, paths: sdpo's own messages) are the message alone; errors met while training (a
server, the disk) add where the run can continue from; anything else names its type and where the traceback is.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
import signal
import sys

from sdpo.console import FILE_ONLY
from sdpo.interrupt import RunStopped, StopNow, signal_name
from sdpo.resume import continue_command

log = logging.getLogger(__name__)
PACKAGE = Path(__file__).resolve().parent

# The message alone says what to fix.
INPUT_ERRORS = ("ConfigError", "DataError", "FileNotFoundError", "SandboxUnavailable", "ScoringError",
                "TokenizerError")
# Met while training: the run continues from its newest checkpoint once the cause is gone.
RUN_ERRORS = ("ServerError",)


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _raised_by_sdpo(exc: BaseException) -> bool:
    """Whether the exception was raised in this package's code (its messages say what to fix)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def one_line(text: str) -> str:
    """The first line of a message (the rest, a log tail or a library's detail, is in the log file)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def where_to_continue(run_dir: str | Path | None) -> str:
    """`the checkpoints are kept (newest: step 4): continue with: ...`, or that there is none yet."""
    if run_dir is None:
        return "no run directory yet: run the command again"
    try:
        from sdpo.checkpoint import latest_checkpoint
    except Exception:  # noqa: BLE001 - a signal cut torch's import short: the line still says how to go on
        return f"its newest complete checkpoint, if any: {continue_command(run_dir)}"
    newest = latest_checkpoint(Path(run_dir) / "checkpoints")
    if newest is None:
        return "no checkpoint yet: run the command again to start over"
    return f"the newest checkpoint is {newest}: {continue_command(run_dir)}"


def interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The signal's exception behind `exc`: itself, or one a library turned into its own error (an import cut short
    by Ctrl-C raises ImportError from it)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def describe(exc: BaseException, run_dir: str | Path | None, log_file: str | Path | None) -> tuple[str, int]:
    """(the terminal line, the exit code) for an exception that ends a script."""
    names = _names(exc)
    if isinstance(exc, RunStopped):
        return str(exc), exc.exit_code
    exc = interrupt_behind(exc) or exc
    if isinstance(exc, KeyboardInterrupt):
        signum = exc.signum if isinstance(exc, StopNow) else signal.SIGINT
        return f"stopped at once by {signal_name(signum)}; {where_to_continue(run_dir)}", 128 + signum
    if names & set(INPUT_ERRORS) or (isinstance(exc, ValueError | OSError) and _raised_by_sdpo(exc)
                                      and getattr(exc, "errno", None) != errno.ENOSPC):
        return f"error: {one_line(str(exc))}", 1
    if names & set(RUN_ERRORS):
        return f"error: {one_line(str(exc))}; {where_to_continue(run_dir)}", 1
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        place = f" writing {exc.filename}" if exc.filename else ""
        return (f"error: no space left on the device{place}: free some space (or set trainer.keep_last lower); "
                f"{where_to_continue(run_dir)}"), 1
    detail = one_line(str(exc))
    where = f"the traceback is in {log_file}" if log_file else "logging.verbose=true shows the traceback"
    return f"error: {type(exc).__name__}{': ' + detail if detail else ''} ({where})", 1


def report(exc: BaseException, run_dir: str | Path | None, log_file: str | Path | None) -> int:
    """Log the traceback (the log file; the terminal too under logging.verbose=true), print the one line to
    stderr, return the exit code."""
    line, code = describe(exc, run_dir, log_file)
    if isinstance(exc, RunStopped):
        log.info("%s", line, extra=FILE_ONLY)
    else:
        log.error("the run ended with %s", type(exc).__name__, exc_info=exc, extra=FILE_ONLY)
    sys.stderr.flush()
    print(line, file=sys.stderr, flush=True)
    return code
