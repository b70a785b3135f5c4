"""Run a sweep: one `scripts/train.py` process per run, one run at a time, resumable.

Each run writes into `<out>/<method>-seed<k>/` (its train.log, config.yaml, metrics.jsonl, checkpoints) and the
sweep adds `terminal.log` (what the process printed) and, once the process has exited, `sweep_run.json`: the
completion marker with the status (done / failed), exit code, wall and CPU seconds, the error line of a failed run
and the overrides it ran with. Starting the sweep again skips every run with a marker (`retry_failed` reruns the
failed ones); a run without one was stopped part-way: it resumes from its last complete checkpoint
(trainer.resume=auto) or, without one, starts again from scratch, its partial metrics removed.

A separate process per run: an in-process vLLM engine, CUDA context or leaked thread of one run cannot reach the
next. `keep_checkpoints: false` deletes a done run's checkpoints (the table reads metrics only). SIGINT or SIGTERM
stops the sweep: the signal is passed to the running run, which is left unmarked (the next start continues it), and
no further run starts. wandb runs are grouped by sweep (WANDB_RUN_GROUP = sweep name,
WANDB_JOB_TYPE = method).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
import json
import os
from pathlib import Path
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from sdpo.sweep.spec import Run, Sweep, SweepError

MARKER = "sweep_run.json"
SWEEP_RECORD = "sweep.json"
TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
STOP_GRACE_S = 120  # how long a run may take to stop cleanly after the signal before it is killed
TRACEBACK_LAST = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


def train_command(run: Run, run_dir: Path) -> list[str]:
    return [sys.executable, str(TRAIN_SCRIPT), *run.overrides, f"trainer.output_dir={run_dir}"]


def _shown(path: Path) -> str:
    """A path as the table shows it: relative to the working directory where it lies under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / MARKER
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a marker cut short: the run did not finish writing it


def error_line(text: str) -> str:
    """The line that says why a process failed: our `error: ...`, else a traceback's last line, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for pattern in (lambda s: s.startswith("error:"), TRACEBACK_LAST.match):
        found = [line for line in lines if pattern(line)]
        if found:
            return found[-1][:300]
    return lines[-1][:300] if lines else "(no output)"


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class SweepResult:
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished by an earlier start
    interrupted: str | None = None  # the run a signal stopped, or the next one when it came between two runs

    @property
    def stopped(self) -> bool:
        return self.interrupted is not None


class _Stop:
    """SIGINT / SIGTERM while a sweep runs: remembered, and passed on to the running run's process group."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.process: subprocess.Popen | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        first = self.signal is None
        self.signal = signum
        if self.process is not None and self.process.poll() is None:
            # A second signal kills: the run was asked once and has not stopped.
            os.killpg(self.process.pid, signum if first else signal.SIGKILL)


def prepare_run_dir(run_dir: Path, overrides: Sequence[str]) -> list[str]:
    """A run without a marker: resume from its last complete checkpoint, or clear what a stopped attempt left."""
    from sdpo.checkpoint import latest_checkpoint

    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "checkpoints").exists() and latest_checkpoint(run_dir / "checkpoints") is not None:
        return [*overrides, "trainer.resume=auto"]
    for stale in ("metrics.jsonl", "samples.jsonl", "reward_curve.png"):
        (run_dir / stale).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return list(overrides)


def run_sweep(sweep: Sweep, out: Path, extra: Sequence[str] = (), *, retry_failed: bool = False,
              command: Callable[[Run, Path], list[str]] = train_command, progress: bool = True,
              record: dict[str, Any] | None = None) -> SweepResult:
    """Run every run of `sweep` that has not finished, into `out`; `extra`: overrides added to every run.
    `record`: written to <out>/sweep.json with the sweep's command, machine and start time."""
    from tqdm import tqdm

    runs = sweep.runs(tuple(extra))
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_RECORD).write_text(json.dumps({
        "sweep": sweep.name, "config": _shown(sweep.path), "extra": list(extra), **(record or {})}, indent=1) + "\n")
    result = SweepResult()
    todo = []
    for run in runs:
        marker = read_marker(out / run.name)
        if marker is not None and marker.get("overrides") != list(run.overrides):
            raise SweepError(f"{out / run.name} was run with other overrides ({' '.join(marker.get('overrides', []))});"
                             f" this sweep now gives {' '.join(run.overrides)}. Write to another directory (--out) "
                             "or delete that run")
        if marker is not None and (marker["status"] == "done" or not retry_failed):
            result.skipped.append(run.name)
        else:
            todo.append(run)
    bar = tqdm(total=len(runs), initial=len(result.skipped), unit="run", desc=sweep.name, disable=not progress,
               dynamic_ncols=True)
    env = {**os.environ, "WANDB_RUN_GROUP": sweep.name}
    with _Stop() as stop:
        for run in todo:
            if stop.signal is not None:  # between two runs: none started
                result.interrupted = run.name
                bar.write(f"stopped by signal {stop.signal} before {run.name}")
                break
            run_dir = (out / run.name).resolve()
            (run_dir / MARKER).unlink(missing_ok=True)
            overrides = prepare_run_dir(run_dir, run.overrides)
            bar.set_postfix_str(run.name)
            argv = command(Run(run.method, run.seed, tuple(overrides)), run_dir)
            wall, cpu = time.time(), _children_cpu_s()
            with (run_dir / "terminal.log").open("w") as log:
                stop.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env={**env, "WANDB_JOB_TYPE": run.method}, start_new_session=True)
                code = _wait(stop)
                stop.process = None
            wall, cpu = time.time() - wall, _children_cpu_s() - cpu
            if stop.signal is not None:
                result.interrupted = run.name
                bar.write(f"{run.name}: stopped by signal {stop.signal} after {wall:.0f} s (not marked: the next "
                          "start continues it)")
                break
            marker = {"status": "done" if code == 0 else "failed", "exit_code": code, "wall_s": round(wall, 2),
                      "cpu_s": round(cpu, 2), "overrides": list(run.overrides), "command": argv,
                      "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
            if code != 0:
                marker["error"] = error_line((run_dir / "terminal.log").read_text(errors="replace"))
                result.failed.append(run.name)
                bar.write(f"{run.name}: failed (exit {code}) after {wall:.0f} s: {marker['error']}")
            else:
                result.done.append(run.name)
                bar.write(f"{run.name}: done in {wall:.0f} s")
            (run_dir / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            if code == 0 and not sweep.keep_checkpoints:  # after the marker: a finished run is never resumed
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            bar.update(1)
    bar.close()
    return result


def _wait(stop: _Stop) -> int:
    """The run's exit code; after a stop signal it has STOP_GRACE_S to exit cleanly, then it is killed."""
    process = stop.process
    assert process is not None
    signalled_at = None
    while True:
        try:
            return process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if stop.signal is None:
                continue
            signalled_at = signalled_at or time.monotonic()
            if time.monotonic() - signalled_at > STOP_GRACE_S:
                os.killpg(process.pid, signal.SIGKILL)


def metric_problem(key: str, config: Any) -> str | None:
    """Why a run with `config` would never log `key` (None: it may): held-out metrics need evaluations, and
    `avg@k` / `pass@k` the k the run samples."""
    if not key.startswith("eval"):
        return None
    if not config.eval.every:
        return f"metric {key} needs held-out evaluations, but eval.every=0"
    match = re.search(r"/(avg|pass)@(\d+)$", key)
    k = config.eval.samples_per_question
    if match and match.group(1) == "avg" and int(match.group(2)) != k:
        return f"metric {key} is not logged: eval.samples_per_question={k} logs {key[:match.start(2)]}{k}"
    if match and match.group(1) == "pass" and int(match.group(2)) not in (1, k):
        return f"metric {key} is not logged: eval.samples_per_question={k} logs pass@1 and pass@{k}"
    return None


def dry_run(sweep: Sweep, out: Path, extra: Sequence[str] = ()) -> list[tuple[Run, str | None]]:
    """Compose and validate every run's config as scripts/train.py would, without training: (run, None) when it
    composes and logs the sweep's metrics, else (run, what is wrong)."""
    from sdpo.hydra_config import check_overrides, load_config

    results = []
    for run in sweep.runs(tuple(extra)):
        overrides = [*run.overrides, f"trainer.output_dir={out / run.name}"]
        try:
            check_overrides(overrides)
            config = load_config(overrides)
        except Exception as exc:  # noqa: BLE001 - every composition error is this run's verdict
            results.append((run, f"{type(exc).__name__}: {exc}".splitlines()[0][:400]))
            continue
        problems = [p for p in (metric_problem(m.key, config) for m in sweep.metrics) if p]
        results.append((run, "; ".join(problems) or None))
    return results
