"""The table of a sweep's runs: per metric, start -> end and best with 95% intervals over seeds, per-seed values,
steps to reach a value, the paper's numbers beside this run's, which methods are not separated, wall time per run,
failed runs with their error line, and the curves (mean and 95% band per method).

    python scripts/table.py runs/cpu_methods                  # writes runs/cpu_methods/table.md, table.json, curves.png
    python scripts/table.py runs/cpu_methods --copy benchmarks/results/sweep_cpu.md    # and a copy (+ .png)

scripts/sweep.py writes it at the end of a sweep; this rebuilds it at any time (a sweep still running: the finished
runs).
"""

from __future__ import annotations

import _prelude  # noqa: F401 - this checkout's sdpo first; no hub downloads

import argparse
from pathlib import Path
import shlex
import shutil
import sys

from sdpo.sweep import SweepError, write_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the sweep's directory (runs/<sweep>)")
    parser.add_argument("--copy", type=Path, default=None, help="also copy table.md here (and curves.png beside it)")
    args = parser.parse_args()
    try:
        path, text = write_table(args.out, shlex.join(["python", "scripts/table.py", *sys.argv[1:]]))
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    if args.copy:
        args.copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.copy)
        if (args.out / "curves.png").exists():
            shutil.copyfile(args.out / "curves.png", args.copy.with_suffix(".png"))
    print(f"wrote {path}" + (f" and {args.copy}" if args.copy else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
