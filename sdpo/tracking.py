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


def _series(dirs: list[Path], key: str) -> tuple[str | None, list[int], list[list[float]]]:
    """The resolved metric name, and the steps with the values of each run that logged them."""
    per_run = []
    name = None
    for run in dirs:
        rows = read_metrics(run)
        resolved = _resolve_key(key, rows)
        name = name or resolved
        per_run.append({r["step"]: r[resolved] for r in rows if resolved and r.get(resolved) is not None})
    steps = sorted({s for points in per_run for s in points})
    return name, steps, [[points[s] for points in per_run if s in points] for s in steps]


def curves_figure(groups: dict[str, list[Path]], keys: list[str], smooth: int = 1, title: str | None = None):
    """A figure with one panel per key; each group (a run, or a method's runs over seeds) one colour on every panel
    and one legend for all panels. A group of several runs: their mean at each step, with a 95% Student t band over
    the runs that logged that step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from sdpo.sweep.stats import estimate

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = {}
    for ax, key in zip(axes[0], keys):
        shown = None
        for i, (label, dirs) in enumerate(groups.items()):
            colour = colours[i % len(colours)]
            name, steps, values = _series(dirs, key)
            if not values:
                continue
            shown = name if key.endswith("*") else key
            estimates = [estimate(v) for v in values]
            means = _smooth([e.mean for e in estimates], smooth)
            (line,) = ax.plot(steps, means, color=colour, label=label, marker="." if len(steps) < 30 else None)
            handles.setdefault(label, line)
            if any(e.half_width is not None for e in estimates):
                low = [e.low if e.low is not None else e.mean for e in estimates]
                high = [e.high if e.high is not None else e.mean for e in estimates]
                ax.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)
        ax.set_title(shown or key)
        if shown is None:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6), fontsize=8,
                   frameon=False)
    if title:
        fig.suptitle(title)
    legend_rows = (len(handles) + 5) // 6
    fig.tight_layout(rect=(0, 0.06 * legend_rows if handles else 0, 1, 1))
    return fig


def _save(fig, out_png: Path) -> Path:
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_curves(run_dirs: list[Path], keys: list[str], out_png: Path, labels: list[str] | None = None,
                smooth: int = 1, title: str | None = None) -> Path:
    """Overlay the curves of `keys` (one panel each; `prefix*` picks the run's first match) from several runs, each
    run one colour on every panel. Runs given the same label are one curve: their mean, with a 95% band."""
    names = labels or [Path(p).name for p in run_dirs]
    if len(names) != len(run_dirs):
        raise ValueError(f"{len(run_dirs)} runs but {len(names)} labels")
    groups: dict[str, list[Path]] = {}
    for run, label in zip(run_dirs, names):
        groups.setdefault(label, []).append(Path(run))
    return _save(curves_figure(groups, keys, smooth, title), out_png)


def plot_mean_curves(groups: dict[str, list[Path]], keys: list[str], out_png: Path, smooth: int = 1,
                     title: str | None = None) -> Path:
    """One curve per group (a method over its seeds): the mean at each step and a 95% band."""
    return _save(curves_figure(groups, keys, smooth, title), out_png)
