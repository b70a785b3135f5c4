"""Learning curves of one or several runs, overlaid, as a PNG: reward, held-out accuracy, response length, KL.

    python scripts/plot.py runs/sdpo-arithmetic-1 runs/grpo-arithmetic-1 --labels SDPO GRPO --out curves.png
    python scripts/plot.py runs/*/ --keys reward/mean eval/pass@4 --smooth 5

Reads each run directory's metrics.jsonl (written whatever the wandb setting). Default panels: reward/mean,
eval/avg@* (the run's held-out avg@k), response/length_mean, distill/student_teacher_kl (GRPO runs have none: the
panel shows only the others). A resumed run's re-logged steps count once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _prelude  # noqa: F401 - this checkout's sdpo first; no hub downloads

from sdpo.tracking import CURVES, plot_curves


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with a metrics.jsonl)")
    parser.add_argument("--labels", nargs="+", help="legend labels, one per run (default: the directory names)")
    parser.add_argument("--keys", nargs="+", default=CURVES, help="metric names, one panel each; 'prefix*' matches")
    parser.add_argument("--smooth", type=int, default=1, help="trailing moving-average window in logged points")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="output PNG")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").exists()]
    if missing:
        parser.error(f"no metrics.jsonl in: {', '.join(missing)}")
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"{len(args.labels)} labels for {len(args.runs)} runs")
    out = plot_curves(args.runs, args.keys, args.out, args.labels, smooth=max(1, args.smooth), title=args.title)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
