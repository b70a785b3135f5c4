"""Where metrics go: `metrics.jsonl` always, wandb and tensorboard when asked, a progress bar on the terminal.

Also the named stage timers that outline a training step (generate / score / teacher / update / sync) and feed the
`time/*` metrics.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
import contextlib
import json
import logging
import math
import os
import secrets
from pathlib import Path
import time
from typing import Any

from sdpo.config import LoggingConfig

log = logging.getLogger(__name__)


class StageTimer:
    """Wall time per named stage: `with timer("generate"): ...`; `timer.pop()` returns the totals and resets.

    Stages nest exclusively: time spent in an inner stage (the teacher forward inside the update) is not counted
    again in the outer one, so the `time/*` metrics add up to the step's wall time.
    """

    def __init__(self) -> None:
        self._seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [stage, start of the current uninterrupted stretch]

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:
            outer = self._stack[-1]
            self._seconds[outer[0]] += now - outer[1]
        self._stack.append([stage, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            name, start = self._stack.pop()
            self._seconds[name] += now - start
            if self._stack:
                self._stack[-1][1] = now

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self._seconds.items()}
        self._seconds.clear()
        return out


def has_wandb_key() -> bool:
    """An API key in the environment or a wandb entry in the netrc file (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(requested: str) -> str:
    """The wandb mode to run: never "online" without credentials (that would stop a run at a login prompt).

    WANDB_MODE=disabled in the environment always wins; otherwise an explicit `logging.wandb` does; "auto" follows
    WANDB_MODE when set, else goes online with a key and offline (synced later with `wandb sync`) without one.
    """
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("disabled", "off"):
        return "disabled"
    mode = requested if requested != "auto" else {"dryrun": "offline", "run": "online"}.get(env, env) or "online"
    if mode == "online" and not has_wandb_key():
        # Not a warning: the run header says "wandb offline", and `wandb sync` uploads the run later.
        log.debug("wandb: no API key (WANDB_API_KEY or `wandb login`): logging offline to the run directory")
        return "offline"
    return mode


class Tracker:
    def __init__(self, config: LoggingConfig, run_dir: Path, run_config: Mapping[str, Any], enabled: bool = True) -> None:
        self.config = config
        self.run_dir = run_dir
        self.enabled = enabled  # False on non-main processes
        self._jsonl = None
        self._wandb = None
        self._tensorboard = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (run_dir / "metrics.jsonl").open("a")
        self.wandb_mode = wandb_mode(config.wandb)
        if self.wandb_mode != "disabled":
            self._wandb = self._start_wandb(self.wandb_mode, run_config)
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def _start_wandb(self, mode: str, run_config: Mapping[str, Any]) -> Any:
        try:
            import wandb

            # One wandb run per run directory: a resumed run continues the same wandb run.
            id_file = self.run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id)
            return wandb.init(
                project=self.config.project,
                name=self.config.run_name or self.run_dir.name,
                dir=str(self.run_dir),
                config=dict(run_config),
                mode=mode,
                id=run_id,
                resume="allow",
            )
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            log.warning("wandb unavailable (%s); logging to metrics.jsonl only", exc)
            return None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None) for k, v in metrics.items()}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        finite = {k: v for k, v in clean.items() if v is not None}
        if self._wandb is not None:
            self._wandb.log(finite, step=step)
        if self._tensorboard is not None:
            for key, value in finite.items():
                self._tensorboard.add_scalar(key, value, step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """A table of sample completions with their reward and feedback."""
        if not self.enabled or not rows:
            return
        with (self.run_dir / "samples.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        columns = list(rows[0])
        if self._wandb is not None:
            import wandb

            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            self._wandb.log({"samples": table}, step=step)
        if self._tensorboard is not None:
            cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731 - markdown table cell
            table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            table += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
            self._tensorboard.add_text("samples", "\n".join(table), step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl, one per step: a resumed run re-logs steps after its checkpoint, and the
    last row logged for a step wins."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    by_step: dict[int, dict[str, Any]] = {}
    with path.open() as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_step[row["step"]] = {**by_step.get(row["step"], {}), **row}
    return [by_step[k] for k in sorted(by_step)]


# The learning curves of a run, in the metric names the trainer logs ("eval/avg@*": whatever k the run used).
CURVES = ["reward/mean", "eval/avg@*", "response/length_mean", "distill/student_teacher_kl"]


def _resolve_key(key: str, rows: list[dict[str, Any]]) -> str | None:
    if not key.endswith("*"):
        return key
    found = sorted({k for r in rows for k in r if k.startswith(key[:-1])}, key=lambda k: (len(k), k))
    return found[0] if found else None


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (1: unchanged)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_curves(run_dirs: list[Path], keys: list[str], out_png: Path, labels: list[str] | None = None,
                smooth: int = 1, title: str | None = None) -> Path:
    """Overlay the curves of `keys` (one panel each; `prefix*` picks the run's first match) from several runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    plotted = [False] * len(keys)
    for run, label in zip(run_dirs, labels or [Path(p).name for p in run_dirs], strict=True):
        rows = read_metrics(run)
        for i, (ax, key) in enumerate(zip(axes[0], keys)):
            name = _resolve_key(key, rows)
            points = [(r["step"], r[name]) for r in rows if name and r.get(name) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, _smooth(list(values), smooth), label=label, marker="." if len(points) < 30 else None)
                ax.set_title(name if key.endswith("*") else key)
                plotted[i] = True
    for ax, key, has_data in zip(axes[0], keys, plotted):
        if not has_data:
            ax.set_title(key)
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles = [ax for ax, ok in zip(axes[0], plotted) if ok]
    if handles:
        handles[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
