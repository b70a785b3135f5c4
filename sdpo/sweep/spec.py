"""A sweep as data: `configs/sweep/<name>.yaml` names methods (each a list of Hydra overrides of scripts/train.py),
seeds, overrides shared by every run and the metrics to report; docs/sweeps.md describes the format.

    description: GRPO vs the hybrid vs pure SDPO on the CPU default task
    overrides: [trainer.total_steps=4, eval.every=2]         # every run
    methods:                                                  # name -> its overrides (at least one)
      grpo: [algorithm=grpo]
      sdpo: [algorithm=sdpo]
    seeds: [0, 1, 2]
    metrics:                                                  # a key, or a mapping
      - {key: eval/avg@4, label: held-out avg@4, reach: 0.8, paper: {grpo: 41.2, sdpo: 48.8}, compare: best}
      - reward/mean
    paper_source: paper Table 4 (LiveCodeBench v6, Qwen3-8B)  # where the `paper:` numbers come from
    keep_checkpoints: false      # delete a done run's checkpoints (default true); the table reads metrics only

Each run is `scripts/train.py <overrides> <method's overrides> trainer.seed=<seed>
trainer.output_dir=<out>/<method>-seed<seed>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import difflib
from pathlib import Path
import re
from typing import Any

import yaml

from sdpo.config import ConfigError

SWEEP_DIR = Path(__file__).resolve().parents[2] / "configs" / "sweep"
TOP_KEYS = ("description", "overrides", "methods", "seeds", "metrics", "paper_source", "keep_checkpoints")
METRIC_KEYS = ("key", "label", "reach", "goal", "paper", "compare", "mean")
# Keys the sweep sets for each run itself.
RESERVED = ("trainer.seed", "trainer.output_dir")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class SweepError(ConfigError):
    """A sweep config that cannot run; the message names the file, the key and what to write instead."""


@dataclass(frozen=True)
class Metric:
    key: str  # as logged in metrics.jsonl: eval/avg@4, reward/mean
    label: str
    reach: float | None = None  # report the first step each run reaches this value
    goal: str = "max"  # max: higher is better (best = the largest value); min: lower is better
    paper: dict[str, float | str] = field(default_factory=dict)  # method -> the paper's reported number
    compare: str = "end"  # which of this run's values stands beside the paper's: end (final) or best
    mean: bool = False  # also report each run's mean over its steps (timings: seconds per step)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.goal == "max" else a < b

    def reached(self, value: float) -> bool:
        assert self.reach is not None
        return value >= self.reach if self.goal == "max" else value <= self.reach


@dataclass(frozen=True)
class Run:
    method: str
    seed: int
    overrides: tuple[str, ...]  # everything but trainer.output_dir, which the runner adds

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}"


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    methods: dict[str, tuple[str, ...]]
    seeds: tuple[int, ...]
    metrics: tuple[Metric, ...]
    overrides: tuple[str, ...] = ()
    description: str = ""
    paper_source: str = ""
    keep_checkpoints: bool = True

    def runs(self, extra: tuple[str, ...] = ()) -> list[Run]:
        """Seed-major (every method at the first seed first): a stopped sweep has every method at its first seeds."""
        return [Run(method, seed, (*self.overrides, *overrides, *extra, f"trainer.seed={seed}"))
                for seed in self.seeds for method, overrides in self.methods.items()]


def sweep_path(name: str) -> Path:
    """`cpu_methods` -> configs/sweep/cpu_methods.yaml; a path to a .yaml file is taken as it is."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise SweepError(f"no sweep config {path}")
        return path
    path = SWEEP_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean sweep={close[0]}?" if close else ""
        raise SweepError(f"unknown sweep {name!r}: configs/sweep/ has {', '.join(known) or 'none'}{hint}")
    return path


def load_sweep(name: str) -> Sweep:
    path = sweep_path(name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML: {exc}") from None
    return parse_sweep(data, path)


def _unknown(where: str, key: str, allowed: tuple[str, ...]) -> SweepError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return SweepError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}{hint}")


def _overrides(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(o, str) and o.strip() for o in value):
        raise SweepError(f"{where} must be a list of Hydra overrides (strings such as algorithm=grpo), got {value!r}")
    for override in value:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in RESERVED:
            raise SweepError(f"{where}: {override!r} sets {key}, which the sweep sets for each run "
                             f"(list seeds under `seeds:`; runs go to runs/<sweep>/<method>-seed<k>)")
        if "=" not in override and not override.startswith("~"):
            raise SweepError(f"{where}: {override!r} is not an override (key=value or group=option)")
    return tuple(value)


def _metric(entry: Any, where: str, methods: dict[str, tuple[str, ...]]) -> Metric:
    if isinstance(entry, str):
        entry = {"key": entry}
    if not isinstance(entry, dict) or "key" not in entry:
        raise SweepError(f"{where}: a metric is a logged key (eval/avg@4) or a mapping with `key:`, got {entry!r}")
    for key in entry:
        if key not in METRIC_KEYS:
            raise _unknown(where, key, METRIC_KEYS)
    goal = entry.get("goal", "max")
    if goal not in ("max", "min"):
        raise SweepError(f"{where}: goal={goal!r}; allowed values: 'max' (higher is better), 'min'")
    compare = entry.get("compare", "end")
    if compare not in ("end", "best"):
        raise SweepError(f"{where}: compare={compare!r}; allowed values: 'end' (the final value), 'best'")
    if not isinstance(entry.get("mean", False), bool):
        raise SweepError(f"{where}: mean must be true or false, got {entry['mean']!r}")
    reach = entry.get("reach")
    if reach is not None and not isinstance(reach, (int, float)):
        raise SweepError(f"{where}: reach must be a number (the value whose first step to report), got {reach!r}")
    paper = entry.get("paper") or {}
    if not isinstance(paper, dict):
        raise SweepError(f"{where}: paper must map method names to the paper's numbers, got {paper!r}")
    for method, value in paper.items():
        if method not in methods:
            raise SweepError(f"{where}: paper names {method!r}, which is not a method of this sweep "
                             f"({', '.join(methods)})")
        if not isinstance(value, (int, float, str)):
            raise SweepError(f"{where}: paper.{method} must be a number or a short text, got {value!r}")
    return Metric(str(entry["key"]), str(entry.get("label") or entry["key"]),
                  None if reach is None else float(reach), goal, dict(paper), compare, entry.get("mean", False))


def parse_sweep(data: Any, path: Path) -> Sweep:
    where = str(path)
    if not isinstance(data, dict):
        raise SweepError(f"{where}: a sweep config is a mapping with keys {', '.join(TOP_KEYS)}")
    for key in data:
        if key not in TOP_KEYS:
            raise _unknown(where, str(key), TOP_KEYS)
    for key in ("methods", "seeds", "metrics"):
        if not data.get(key):
            raise SweepError(f"{where}: `{key}:` is missing or empty")
    raw_methods = data["methods"]
    if not isinstance(raw_methods, dict):
        raise SweepError(f"{where}: methods must map a name to its list of overrides, got {raw_methods!r}")
    methods: dict[str, tuple[str, ...]] = {}
    for method, overrides in raw_methods.items():
        if not isinstance(method, str) or not NAME.match(method):
            raise SweepError(f"{where}: method name {method!r} must be letters, digits, _ . + - (it names the run "
                             "directories)")
        methods[method] = _overrides(overrides, f"{where}: methods.{method}")
        if not methods[method]:
            raise SweepError(f"{where}: method {method!r} has no overrides; give it at least one (algorithm=..., "
                             "say) so that the table says what it ran")
    same = {}
    for method, overrides in methods.items():
        if overrides in same:
            raise SweepError(f"{where}: methods {same[overrides]!r} and {method!r} have the same overrides")
        same[overrides] = method
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f"{where}: seeds must be a list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{where}: seeds repeat: {seeds}")
    if not isinstance(data["metrics"], list):
        raise SweepError(f"{where}: metrics must be a list, got {data['metrics']!r}")
    metrics = tuple(_metric(m, f"{where}: metrics[{i}]", methods) for i, m in enumerate(data["metrics"]))
    if any(m.paper for m in metrics) and not data.get("paper_source"):
        raise SweepError(f"{where}: metrics give `paper:` numbers; say where they come from in `paper_source:` "
                         "(paper Table 4, its setting)")
    keep = data.get("keep_checkpoints", True)
    if not isinstance(keep, bool):
        raise SweepError(f"{where}: keep_checkpoints must be true or false, got {keep!r}")
    return Sweep(name=path.stem, keep_checkpoints=keep, path=path, methods=methods, seeds=tuple(seeds), metrics=metrics,
                 overrides=_overrides(data.get("overrides"), f"{where}: overrides"),
                 description=str(data.get("description") or ""), paper_source=str(data.get("paper_source") or ""))
