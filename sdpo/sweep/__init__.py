"""Experiments as data: a sweep config (configs/sweep/<name>.yaml) names methods, seeds, shared overrides and
metrics; the runner trains each run in its own process, resumably; the table reports means over seeds with 95%
intervals. scripts/sweep.py and scripts/table.py are the command lines; docs/sweeps.md the format."""

from sdpo.sweep.runner import SweepResult, dry_run, run_sweep
from sdpo.sweep.spec import Metric, Run, Sweep, SweepError, load_sweep, parse_sweep
from sdpo.sweep.table import summarize, write_table

__all__ = ["Metric", "Run", "Sweep", "SweepError", "SweepResult", "dry_run", "load_sweep", "parse_sweep", "run_sweep",
           "summarize", "write_table"]
