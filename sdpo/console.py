"""What a run shows on the terminal: a short header, the progress bar, a closing summary; the rest goes to a log file.

By default (`logging.verbose=false`) third-party INFO and WARNING messages (vLLM, transformers, Accelerate, wandb,
DeepSpeed, ...) go to the run directory's log file only; the terminal gets errors from everyone and sdpo's own
messages from INFO up (a resume, test-time progress, warnings). `logging.verbose=true` leaves every library's own terminal output alone.

Some start-up output never passes through Python's logging: vLLM's and transformers' weight-loading bars, Python
warnings, and messages that C++ code (oneDNN, c10, tcmalloc hints) prints straight to file descriptor 2.
`native_output_to` sends the process's stdout and stderr descriptors to the log file while the trainer is built
(where all of that happens); the console handler keeps a copy of the terminal, so errors still reach it in full.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import importlib
import importlib.util
import logging
import os
from pathlib import Path
import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from sdpo.config import SDPOConfig

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# `log.error(..., extra=FILE_ONLY)`: a record for the log file only (a traceback whose one-line summary the terminal
# gets on its own).
FILE_ONLY = {"terminal": False}


class TerminalFilter(logging.Filter):
    """Errors from anyone; INFO and above from sdpo's own loggers (their DEBUG, start-up details that the run
    header sums up, goes to the log file only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "terminal", True) is False:
            return False
        own = record.name == "sdpo" or record.name.startswith("sdpo.") or record.name == "__main__"
        return record.levelno >= (logging.INFO if own else logging.ERROR)


def _quiet_library_loggers() -> None:
    """Loggers that print through their own handlers (not the root's): send their records to the root instead."""
    try:
        import transformers

        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.enable_propagation()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    for name in list(logging.root.manager.loggerDict):
        logger = logging.getLogger(name)
        stream_handlers = [h for h in logger.handlers if type(h) is logging.StreamHandler]
        for handler in stream_handlers:
            logger.removeHandler(handler)
        if stream_handlers:
            logger.propagate = True


def setup_logging(log_file: str | Path, verbose: bool = False, terminal: TextIO | None = None) -> Path:
    """Route log records: everything at INFO to `log_file`; to the terminal, everything (verbose) or what
    `TerminalFilter` lets through. Call before vLLM is imported: its own logging setup is switched off here."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("sdpo").setLevel(logging.DEBUG)  # sdpo's start-up details reach the log file
    if verbose:
        return log_file
    # vLLM reads these when it is first imported; its records then reach the handlers below.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ.setdefault("WANDB_SILENT", "true")  # wandb's banners ("Tracking run", "Detected [openai]", Weave)
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter(LOG_FORMAT))
    # A copy of the terminal's descriptor: still the terminal while `native_output_to` diverts descriptor 2.
    to_terminal = logging.StreamHandler(terminal or os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1))
    to_terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    to_terminal.addFilter(TerminalFilter())
    logging.basicConfig(level=logging.INFO, handlers=[to_file, to_terminal], force=True)  # replaces Hydra's
    logging.captureWarnings(True)  # Python warnings (deprecations from libraries) go to the file too
    _quiet_library_loggers()
    return log_file


@contextlib.contextmanager
def native_output_to(log_file: str | Path, enabled: bool = True) -> Iterator[None]:
    """Send file descriptors 1 and 2 to `log_file` inside the block (not with `enabled=False`), then restore them.

    What C++ code prints and progress bars written to stderr land in the log; an exception leaving the block is
    reported after the descriptors are back, so it reaches the terminal.
    """
    if not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with open(log_file, "a") as log:
        try:
            for fd in saved:
                os.dup2(log.fileno(), fd)
            yield
        finally:
            # DeepSpeed adds a terminal handler to its logger when first imported, which Accelerate does when the
            # first checkpoint is saved, deep in the run: import it now, while its greeting goes to the log, so that
            # its logger exists when the loggers are rerouted below.
            try:
                if importlib.util.find_spec("deepspeed") is not None:
                    with contextlib.suppress(Exception):
                        importlib.import_module("deepspeed")
            finally:  # the terminal comes back even when a Ctrl-C cuts that import short
                sys.stdout.flush()
                sys.stderr.flush()
                for fd, copy in saved.items():
                    os.dup2(copy, fd)
                    os.close(copy)
            _quiet_library_loggers()  # libraries imported inside the block may have added handlers


def log_path() -> Path | None:
    """The log file the root logger writes to (ours, or Hydra's under `logging.verbose=true`)."""
    files = [h for h in logging.root.handlers if isinstance(h, logging.FileHandler)]
    return Path(files[0].baseFilename) if files else None


def header(config: SDPOConfig, run_dir: str | Path, log_file: str | Path | None = None) -> str:
    """What runs, in at most five lines: algorithm and teacher; model, env, engine; precision and threads; where.
    After the trainer is built: its precision is resolved, its thread count set and its metrics log open."""
    import torch

    from sdpo.losses.mix import MIXES
    from sdpo.precision import compute_dtype_name, probe
    from sdpo.tracking import wandb_mode

    algo, model, rollout = config.algorithm, config.model, config.rollout
    steps = config.trainer.total_steps
    steps_text = f"{steps} step{'s' if steps != 1 else ''}"
    if algo.grpo_weight >= 1.0:
        what = f"{algo.name}: GRPO (no teacher), {steps_text}"
    else:
        mix = f", GRPO weight {algo.grpo_weight} ({algo.mix}-level mix)" if algo.grpo_weight > 0 else ""
        if MIXES.get(algo.mix).routes:
            mix = f", {algo.mix}: GRPO on successes, distillation on failures"
        what = f"{algo.name}: SDPO{mix}, {algo.teacher.kind} teacher, {algo.distill.mode} distillation, {steps_text}"
    from sdpo.rollout import ENGINES

    engine = rollout.engine + (f" ({rollout.vllm.dtype})" if ENGINES.get(rollout.engine).own_dtype else "")
    trainer_dtype = compute_dtype_name(config) + (" autocast" if model.autocast_dtype != "none" else "")
    lines = [
        what,
        f"model {model.name_or_path} · env {config.env.name} · rollouts {engine}",
        f"precision {trainer_dtype} on {probe().describe} · {torch.get_num_threads()} threads",
        f"run directory {run_dir}" + (f" (log: {log_file})" if log_file else ""),
    ]
    wandb = wandb_mode(config.logging.wandb)
    if wandb != "disabled":
        lines[-1] += f" · wandb {wandb}"
    return "\n".join(lines)


def _eval_key(rows: list[dict[str, Any]]) -> str | None:
    keys = sorted({k for r in rows for k in r if k.startswith("eval/avg@")}, key=lambda k: (len(k), k))
    return keys[-1] if keys else None  # the largest k: the metric the progress bar shows


def summary(run_dir: str | Path, log_file: str | Path | None = None) -> str:
    """Final and best held-out accuracy and where the curve, the last checkpoint and the log are."""
    from sdpo.checkpoint import latest_checkpoint
    from sdpo.tracking import read_metrics

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    steps = rows[-1]["step"] if rows else 0
    key = _eval_key(rows)
    points = [(r["step"], r[key]) for r in rows if key and r.get(key) is not None]
    if points:
        (first_step, first), (last_step, last) = points[0], points[-1]
        best_step, best = max(points, key=lambda p: (p[1], -p[0]))
        accuracy = (f"held-out {key.removeprefix('eval/')}: {first:.3f} at step {first_step} -> {last:.3f} at step "
                    f"{last_step} (best {best:.3f} at step {best_step})")
    else:
        accuracy = "no held-out evaluation (eval.every=0)"
    kept = _kept_best(run_dir, rows)
    if kept:
        accuracy += "\n" + kept
    where = [f"curve {run_dir / 'reward_curve.png'}"]
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is not None:
        where.append(f"checkpoint {checkpoint}")
    if log_file:
        where.append(f"log {log_file}")
    return f"done: {steps} step{'s' if steps != 1 else ''}; {accuracy}\n" + " · ".join(where)


def _kept_best(run_dir: Path, rows: list[dict[str, Any]]) -> str:
    """trainer.keep_best: the best checkpoint's metric, value, step and path, the final value, and a collapse stop."""
    from sdpo.guards import read_record

    record = read_record(run_dir / "checkpoints")
    if record is None:
        return ""
    metric = record["metric"]
    finals = [(r["step"], r[metric]) for r in rows if r.get(metric) is not None]
    final = f"; final {finals[-1][1]:.3f} at step {finals[-1][0]}" if finals else ""
    text = f"kept best {metric} {record['value']:.3f} at step {record['step']} ({record['path']}){final}"
    if any(r.get("guard/collapse_stop") for r in rows):
        text += f"; stopped at step {rows[-1]['step']}: the held-out metric fell trainer.collapse_drop below its best"
    return text


def progress_postfix(metrics: dict[str, Any], shown: dict[str, str]) -> dict[str, str]:
    """The progress bar's fields after a step: its reward, the latest held-out accuracy (kept between evaluations)
    and the step's own wall time. `shown` carries the fields over from step to step."""
    if "reward/mean" in metrics:
        shown["reward"] = f"{metrics['reward/mean']:.3f}"
    key = _eval_key([metrics])
    if key is not None:
        shown["held-out"] = f"{metrics[key]:.3f}"
    seconds = sum(v for k, v in metrics.items() if k.startswith("time/"))
    if seconds:
        shown["step"] = f"{seconds:.1f}s"
    return shown
