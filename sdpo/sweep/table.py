"""A sweep's results as tables: per metric, start -> end and best, the mean over seeds with a 95% Student t interval,
the per-seed values, the first step that reaches a value, the paper's number beside this run's; which methods'
intervals overlap (not separated); wall time per run; failed runs with their error line; one PNG of the curves
(mean and 95% band per method).

`summarize(out)` reads `<out>/sweep.json` (written by the runner), each run's `sweep_run.json` marker and
`metrics.jsonl`; `markdown(summary)` and `summary_json(summary)` format it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import itertools
import json
from pathlib import Path
import time
from typing import Any

from sdpo.sweep.runner import MARKER, SWEEP_RECORD, read_marker
from sdpo.sweep.spec import Metric, Run, Sweep, SweepError, load_sweep
from sdpo.sweep.stats import Estimate, estimate, separated
from sdpo.tracking import read_metrics


@dataclass
class RunOutcome:
    run: Run
    status: str  # done, failed, not run (no marker: never started, or stopped part-way)
    marker: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def points(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.rows if r.get(key) is not None]


@dataclass
class MetricSummary:
    metric: Metric
    start: dict[str, Estimate]  # method -> over its seeds
    end: dict[str, Estimate]
    best: dict[str, Estimate]
    mean: dict[str, Estimate]  # each run's mean over its steps
    reach: dict[str, list[int | None]]  # method -> first step reaching metric.reach, per seed
    seeds: dict[str, list[int]]  # method -> the seeds behind the estimates


@dataclass
class Summary:
    sweep: Sweep
    out: Path
    record: dict[str, Any]
    outcomes: list[RunOutcome]
    metrics: list[MetricSummary]


def collect(out: Path) -> tuple[Sweep, dict[str, Any], list[RunOutcome]]:
    record_path = out / SWEEP_RECORD
    if not record_path.exists():
        raise SweepError(f"{out} holds no {SWEEP_RECORD}: not a sweep's output directory (scripts/sweep.py writes it)")
    record = json.loads(record_path.read_text())
    sweep = load_sweep(record["config"])
    outcomes = []
    for run in sweep.runs(tuple(record.get("extra", []))):
        marker = read_marker(out / run.name) or {}
        status = marker.get("status", "not run")
        metrics = out / run.name / "metrics.jsonl"
        rows = read_metrics(metrics) if status == "done" and metrics.exists() else []
        outcomes.append(RunOutcome(run, status, marker, rows))
    return sweep, record, outcomes


def first_reach(points: list[tuple[int, float]], metric: Metric) -> int | None:
    return next((step for step, value in points if metric.reached(value)), None)


def summarize_metric(metric: Metric, sweep: Sweep, outcomes: list[RunOutcome]) -> MetricSummary:
    summary = MetricSummary(metric, {}, {}, {}, {}, {}, {})
    for method in sweep.methods:
        series = [(o.run.seed, o.points(metric.key)) for o in outcomes
                  if o.run.method == method and o.status == "done"]
        series = [(seed, points) for seed, points in series if points]
        if not series:
            continue
        pick = max if metric.goal == "max" else min
        summary.seeds[method] = [seed for seed, _ in series]
        summary.start[method] = estimate([points[0][1] for _, points in series])
        summary.end[method] = estimate([points[-1][1] for _, points in series])
        summary.best[method] = estimate([pick(v for _, v in points) for _, points in series])
        summary.mean[method] = estimate([sum(v for _, v in points) / len(points) for _, points in series])
        if metric.reach is not None:
            summary.reach[method] = [first_reach(points, metric) for _, points in series]
    return summary


def summarize(out: Path) -> Summary:
    sweep, record, outcomes = collect(out)
    return Summary(sweep, out, record, outcomes, [summarize_metric(m, sweep, outcomes) for m in sweep.metrics])


def overlaps(estimates: dict[str, Estimate]) -> list[tuple[str, str, bool]]:
    """(method a, method b, separated) for every pair of methods."""
    return [(a, b, separated(estimates[a], estimates[b])) for a, b in itertools.combinations(estimates, 2)]


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _seeds(values: tuple[float, ...]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def _paper(value: float | str | None) -> str:
    return "" if value is None else str(value)


def metric_table(ms: MetricSummary, sweep: Sweep, outcomes: list[RunOutcome]) -> list[str]:
    metric = ms.metric
    better = "higher is better" if metric.goal == "max" else "lower is better"
    lines = [f"### {metric.label} (`{metric.key}`, {better})", ""]
    if not ms.end:
        return lines + ["No finished run logged this metric.", ""]
    paper = bool(metric.paper)
    reach = metric.reach is not None
    head = ["method", "seeds", "start -> end (means)", "end: mean ± 95% CI", "end per seed", "best: mean ± 95% CI",
            "best per seed"]
    head += [f"first step reaching {metric.reach:g} (per seed)"] if reach else []
    head += ["mean over steps: mean ± 95% CI"] if metric.mean else []
    head += ["paper", f"this run ({metric.compare})"] if paper else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in sweep.methods:
        if method not in ms.end:
            failed = sum(o.run.method == method and o.status == "failed" for o in outcomes)
            lines.append(f"| {method} | 0{f' ({failed} failed)' if failed else ''} | "
                         + " | ".join("-" for _ in head[2:]) + " |")
            continue
        start, end, best = ms.start[method], ms.end[method], ms.best[method]
        cells = [method, str(len(end.values)), f"{start.mean:.3f} -> {end.mean:.3f} ({end.mean - start.mean:+.3f})",
                 end.text(), _seeds(end.values), best.text(), _seeds(best.values)]
        if reach:
            cells.append(", ".join("never" if s is None else str(s) for s in ms.reach[method]))
        if metric.mean:
            cells.append(ms.mean[method].text())
        if paper:
            cells += [_paper(metric.paper.get(method)), (best if metric.compare == "best" else end).text()]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for label, estimates in (("end", ms.end), ("best", ms.best)):
        pairs = overlaps(estimates)
        if not pairs:
            continue
        if any(e.half_width is None for e in estimates.values()):
            lines.append(f"- {label}: one seed for some method: no interval, no pair is separated.")
            continue
        apart = [f"{a} > {b}" if metric.better(estimates[a].mean, estimates[b].mean) else f"{b} > {a}"
                 for a, b, s in pairs if s]  # the better one first (for goal: min, "better" means lower)
        together = [f"{a} ~ {b}" for a, b, s in pairs if not s]
        text = f"- {label}: "
        text += ("not separated (95% intervals overlap): " + ", ".join(together)) if together else ""
        text += ("; " if together and apart else "") + ("separated: " + ", ".join(apart) if apart else "")
        lines.append(text)
    return lines + [""]


def runs_table(outcomes: list[RunOutcome]) -> list[str]:
    lines = ["| run | status | steps logged | wall s | CPU s |", "|---|---|---|---|---|"]
    for o in outcomes:
        m = o.marker
        steps = str(o.rows[-1]["step"]) if o.rows else "-"
        wall = _cell(m.get("wall_s"), 0) if "wall_s" in m else "-"
        cpu = _cell(m.get("cpu_s"), 0) if "cpu_s" in m else "-"
        lines.append(f"| {o.run.name} | {o.status} | {steps} | {wall} | {cpu} |")
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        lines += ["", "Failed runs (exit code: error line; the run's terminal.log has the rest):", ""]
        lines += [f"- {o.run.name} (exit {o.marker.get('exit_code')}): `{o.marker.get('error', '')}`" for o in failed]
    missing = [o.run.name for o in outcomes if o.status == "not run"]
    if missing:
        lines += ["", f"Not run yet (or stopped part-way): {', '.join(missing)}."]
    return lines


def markdown(summary: Summary, table_command: str = "", png: Path | None = None) -> str:
    sweep, record = summary.sweep, summary.record
    lines = [f"# Sweep `{sweep.name}`" + (f": {sweep.description}" if sweep.description else ""), ""]
    lines.append(f"- config: `{record['config']}`; runs in `{summary.out}`, one process each, one at a time")
    if record.get("command"):
        lines.append(f"- sweep command: `{record['command']}`")
    if table_command:
        lines.append(f"- table command: `{table_command}`")
    if record.get("machine"):
        lines.append(f"- machine: {record['machine']}")
    if record.get("started"):
        lines.append(f"- sweep started {record['started']}; table written "
                     f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    shared = " ".join((*sweep.overrides, *record.get("extra", []), "<method's overrides>", "trainer.seed=<seed>"))
    lines.append(f"- every run: `scripts/train.py {shared}`; seeds " + ", ".join(map(str, sweep.seeds)))
    lines.append("- intervals: 95% Student t over seeds, mean ± t(0.975, n-1) · s / √n (s: the sample standard "
                 "deviation of the n seeds' values); two methods whose intervals overlap are not separated")
    if sweep.paper_source:
        lines.append(f"- paper: {sweep.paper_source}")
    lines += ["", "## Methods", "", "| method | overrides |", "|---|---|"]
    lines += [f"| {name} | `{' '.join(overrides)}` |" for name, overrides in sweep.methods.items()]
    lines += ["", "## Metrics", ""]
    for ms in summary.metrics:
        lines += metric_table(ms, sweep, summary.outcomes)
    if png is not None:
        lines += [f"Curves (mean over seeds, 95% band): `{png.name}`", ""]
    lines += ["## Runs", "", *runs_table(summary.outcomes)]
    return "\n".join(lines) + "\n"


def summary_json(summary: Summary) -> dict[str, Any]:
    """The table's numbers (no times): two sweeps over the same seeds on the same machine give the same object."""
    def est(e: Estimate) -> dict[str, Any]:
        return {"values": list(e.values), "mean": e.mean, "half_width": e.half_width}

    return {
        "sweep": summary.sweep.name,
        "runs": {o.run.name: o.status for o in summary.outcomes},
        "metrics": {ms.metric.key: {method: {"seeds": ms.seeds[method], "start": est(ms.start[method]),
                                             "end": est(ms.end[method]), "best": est(ms.best[method]),
                                             "mean": est(ms.mean[method]),
                                             "reach": ms.reach.get(method)}
                                    for method in ms.end}
                    for ms in summary.metrics},
    }


def plot(summary: Summary, out_png: Path) -> Path | None:
    from sdpo.tracking import plot_mean_curves

    groups = {}
    for method in summary.sweep.methods:
        dirs = [summary.out / o.run.name for o in summary.outcomes if o.run.method == method and o.status == "done"]
        if dirs:
            groups[method] = dirs
    if not groups:
        return None
    return plot_mean_curves(groups, [m.key for m in summary.sweep.metrics], out_png,
                            title=f"sweep {summary.sweep.name}: mean over seeds, 95% band")


def write_table(out: Path, table_command: str = "") -> tuple[Path, str]:
    """<out>/table.md, table.json and curves.png; returns the markdown's path and text."""
    summary = summarize(out)
    png = plot(summary, out / "curves.png")
    text = markdown(summary, table_command, png)
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps(summary_json(summary), indent=1) + "\n")
    return out / "table.md", text


__all__ = ["MARKER", "Summary", "collect", "markdown", "overlaps", "summarize", "summary_json", "write_table"]
