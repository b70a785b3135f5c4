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


def _wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    # Online only with credentials; never crash for a missing key.
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
    return "online" if has_key else "offline"


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
        mode = _wandb_mode(os.environ.get("WANDB_MODE", config.wandb))
        if mode != "disabled":
            self._wandb = self._start_wandb(mode, run_config)
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def _start_wandb(self, mode: str, run_config: Mapping[str, Any]) -> Any:
        try:
            import wandb

            return wandb.init(
                project=self.config.project,
                name=self.config.run_name or self.run_dir.name,
                dir=str(self.run_dir),
                config=dict(run_config),
                mode=mode,
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
        if self._wandb is not None:
            import wandb

            columns = list(rows[0])
            self._wandb.log({"samples": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])}, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(run_dirs: list[Path], keys: list[str], out_png: Path, labels: list[str] | None = None) -> Path:
    """Overlay the curves of `keys` (one panel each) from several runs; x is the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for run, label in zip(run_dirs, labels or [p.name for p in run_dirs], strict=True):
        rows = read_metrics(run)
        for ax, key in zip(axes[0], keys):
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=label, marker="." if len(points) < 30 else None)
    for ax, key in zip(axes[0], keys):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
