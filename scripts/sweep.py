"""Run a sweep: every method of configs/sweep/<name>.yaml at every seed, each `scripts/train.py` in its own process,
one at a time, into runs/<name>/<method>-seed<k>/; then the table (scripts/table.py).

    python scripts/sweep.py sweep=cpu_methods                 # run (or continue) the sweep, then its table
    python scripts/sweep.py sweep=cpu_methods --dry-run       # compose and check every run's config, train nothing
    python scripts/sweep.py sweep=cpu_methods rollout=hf      # more overrides for every run
    python scripts/sweep.py sweep=cpu_methods --out runs/x --retry-failed

Started again, a sweep skips the finished runs (a `sweep_run.json` marker in the run directory) and continues a run
that was stopped part-way (from its last checkpoint, or from scratch). Ctrl-C (SIGINT) stops it cleanly. A run that
fails is recorded with its error line and the sweep goes on. docs/sweeps.md describes the format.
"""

from __future__ import annotations

import _prelude  # noqa: F401 - this checkout's sdpo first; no hub downloads

import argparse
from pathlib import Path
import shlex
import sys
import time

from sdpo.sweep import SweepError, dry_run, load_sweep, run_sweep, write_table


def machine() -> str:
    from benchmarks.machine import describe

    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return describe() + (f"; GPUs: {', '.join(gpus)}" if gpus else "; no GPU")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="sweep=<name> (required), then Hydra overrides for every run")
    parser.add_argument("--dry-run", action="store_true", help="compose and check every run's config; train nothing")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default runs/<sweep>)")
    parser.add_argument("--retry-failed", action="store_true", help="run the failed runs again")
    parser.add_argument("--no-table", action="store_true", help="do not write the table at the end")
    args = parser.parse_args()
    names = [o.split("=", 1)[1] for o in args.overrides if o.startswith("sweep=")]
    extra = [o for o in args.overrides if not o.startswith("sweep=")]
    if len(names) != 1:
        parser.error("name one sweep: sweep=<name> (a file of configs/sweep/, or a path to a .yaml)")
    try:
        sweep = load_sweep(names[0])
        out = args.out or Path("runs") / sweep.name
        if args.dry_run:
            results = dry_run(sweep, out, extra)
            for run, problem in results:
                print(f"{run.name}: {'ok' if problem is None else 'ERROR ' + problem}")
            bad = sum(problem is not None for _, problem in results)
            print(f"{sweep.name}: {len(results) - bad} of {len(results)} runs compose"
                  + (f"; {bad} do not" if bad else ""))
            return 1 if bad else 0
        command = shlex.join(["python", "scripts/sweep.py", *sys.argv[1:]])
        record = {"command": command, "machine": machine(),
                  "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        result = run_sweep(sweep, out, extra, retry_failed=args.retry_failed, record=record)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{sweep.name}: {len(result.done)} run(s) done now, {len(result.skipped)} finished before, "
          f"{len(result.failed)} failed")
    if result.stopped:
        print(f"stopped during {result.interrupted}; run the same command to continue", file=sys.stderr)
        return 130
    if not args.no_table:
        path, text = write_table(out, shlex.join(["python", "scripts/table.py", str(out)]))
        print(text)
        print(f"wrote {path}, {path.with_suffix('.json').name} and curves.png in {out}")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
