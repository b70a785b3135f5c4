"""Guards against a run that gets worse: keep the best checkpoint by a held-out metric, stop on collapse.

`trainer.keep_best.metric` (a name `sdpo.evaluation.evaluate` logs, e.g. `eval/avg@4`) and `maximize` choose what
"best" means. After each evaluation the trainer asks `BestCheckpoint.observe`: an improvement is saved as the
checkpoint `checkpoints/best/` (beside the `step-*` ones, which `keep_last` rotates; `best/` is never rotated), and
with `trainer.collapse_drop` set, a value that many units worse than the best stops the run (SDPO runs are reported
to collapse after a few hundred steps: docs/algorithm.md §10). The best value, its step and its path are in the trainer
state of every checkpoint and in `checkpoints/best/BEST.json` (what the closing summary reads), so a resumed run
keeps them; since `best/` is only ever replaced by a better value, its record wins over an older checkpoint's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
import json
from pathlib import Path
from typing import Any

from sdpo.config import KeepBestConfig

BEST_DIR = "best"
RECORD_FILE = "BEST.json"


@dataclass
class Verdict:
    improved: bool = False  # save the best checkpoint now
    collapsed: bool = False  # stop the run


@dataclass
class BestRecord:
    metric: str
    value: float
    step: int
    path: str


class BestCheckpoint:
    def __init__(self, config: KeepBestConfig, collapse_drop: float | None, root: Path) -> None:
        self.config, self.collapse_drop, self.root = config, collapse_drop, root
        self.best: BestRecord | None = None

    @property
    def enabled(self) -> bool:
        return self.config.metric is not None

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.config.maximize else value < than

    def observe(self, metrics: dict[str, float], step: int) -> Verdict:
        """After an evaluation: is this the best value so far, and has it fallen `collapse_drop` below the best?"""
        if not self.enabled:
            return Verdict()
        metric = self.config.metric
        if metric not in metrics:
            evaluated = sorted(k for k in metrics if k.startswith("eval/"))
            raise ValueError(f"trainer.keep_best.metric={metric!r} is not among the held-out metrics this run "
                             f"produces ({', '.join(evaluated) or 'none'}): set it to one of them")
        value = float(metrics[metric])
        if self.best is None or self._better(value, self.best.value):
            self.best = BestRecord(metric, value, step, str(self.root / BEST_DIR))
            return Verdict(improved=True)
        drop = self.best.value - value if self.config.maximize else value - self.best.value
        return Verdict(collapsed=self.collapse_drop is not None and drop >= self.collapse_drop)

    def write_record(self, checkpoint: Path) -> None:
        """Beside the best checkpoint's weights: what it scored (read by `read_record` and the summary)."""
        assert self.best is not None
        (checkpoint / RECORD_FILE).write_text(json.dumps(asdict(self.best)))

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.best) if self.best is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's record, or the best checkpoint's own where it exists (it only ever holds the best value)."""
        on_disk = read_record(self.root)
        state = on_disk if on_disk is not None else state
        self.best = BestRecord(**state) if state else None


def read_record(root: Path) -> dict[str, Any] | None:
    """The record of the complete best checkpoint under `root` (a run's `checkpoints/`), or None."""
    from sdpo.checkpoint import COMPLETE

    best = Path(root) / BEST_DIR
    if not (best / COMPLETE).exists() or not (best / RECORD_FILE).exists():
        return None
    return json.loads((best / RECORD_FILE).read_text())
