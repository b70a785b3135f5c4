"""Distillation from a better teacher on the CPU default task (issue #40): does on-policy distillation move a policy?

The teacher is README command 1's recipe (`scripts/train.py`, experiment=cpu: SmolLM2-135M-Instruct, arithmetic, the
lambda = 0.9 hybrid) trained for 30 steps instead of 10; the students are fresh SmolLM2s trained 10 steps by each
method of configs/sweep/distill_cpu.yaml: plain on-policy distillation from the teacher (algorithm=opd, no reward),
the same with the reprompt, the default hybrid, GRPO and SRPO routing (algorithm=srpo). The sweep's runner runs them
(markers, resume, the table); this script adds what a sweep cannot:

1. the teacher: `--teacher PATH` links a trained run (or checkpoint) at runs/distill_cpu/teacher, where the sweep's
   opd methods read it; without one, it trains the teacher there first (30 steps of the default recipe).
2. one run per `--wrap` command (e.g. `--wrap heavy`, a lock that serialises CPU-heavy jobs): other jobs can run between
   two runs, never during one.
3. diagnostics of each run's final policy, before its checkpoint is deleted: the mean per-token log-prob of the
   teacher's own answers to the held-out questions (sampled once, at the training temperature) under the teacher and
   under the student, start and end; their gap is the teacher-student cross-entropy excess on the teacher's data.
   The on-policy student-teacher KL per step is the opd runs' `distill/student_teacher_kl` metric.

    python benchmarks/distill_cpu.py --teacher runs/my-teacher-run --wrap heavy --methods hybrid,grpo,srpo --seeds 0
    python benchmarks/distill_cpu.py --wrap heavy                     # every method and seed that is not done yet
    python benchmarks/distill_cpu.py --served --wrap heavy            # opd scored in the update vs by a vLLM server (one seed)
    python benchmarks/distill_cpu.py --report                         # the table and the diagnostics only

Results: benchmarks/results/distill_cpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
import shlex
import subprocess
import sys
import time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "runs" / "distill_cpu"
SERVED = ROOT / "runs" / "distill_cpu_served"  # configs/sweep/distill_cpu_served.yaml: the teacher on a vLLM server
TEACHER = OUT / "teacher"  # the path configs/sweep/distill_cpu.yaml names (relative to the repository root)
TEACHER_STEPS = 30


def final_checkpoint(path: Path) -> Path:
    """A model folder as given, or a run directory's last checkpoint."""
    from sdpo.checkpoint import latest_checkpoint

    if (path / "config.json").exists():
        return path
    found = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").exists() else None
    if found is None:
        raise SystemExit(f"error: {path} is neither a model folder nor a run directory with a checkpoint")
    return found


def ensure_teacher(given: Path | None, wrap: list[str]) -> Path:
    """runs/distill_cpu/teacher -> the teacher's final checkpoint; trained here when none is given or linked yet."""
    if TEACHER.exists():
        return final_checkpoint(TEACHER.resolve())
    OUT.mkdir(parents=True, exist_ok=True)
    if given is None:
        run_dir = OUT / "teacher-run"
        argv = [*wrap, sys.executable, str(ROOT / "scripts" / "train.py"), f"trainer.total_steps={TEACHER_STEPS}",
                "logging.progress_bar=false", f"trainer.output_dir={run_dir}"]
        print("training the teacher:", shlex.join(argv), flush=True)
        subprocess.run(argv, cwd=ROOT, check=True)
        given = run_dir
    TEACHER.symlink_to(final_checkpoint(given.resolve()))
    return final_checkpoint(TEACHER.resolve())


def run_methods(methods: list[str] | None, seeds: list[int] | None, wrap: list[str], retry_failed: bool,
                sweep_name: str = "distill_cpu", out: Path = OUT) -> None:
    """The sweep's runs, restricted to `methods` and `seeds`, one wrapped process each, each diagnosed when done."""
    from sdpo.sweep.runner import run_sweep, train_command
    from sdpo.sweep.spec import load_sweep

    sweep = load_sweep(sweep_name)
    unknown = set(methods or []) - set(sweep.methods)
    if unknown:
        raise SystemExit(f"error: no method {sorted(unknown)} in the sweep; it has {sorted(sweep.methods)}")
    from benchmarks.machine import describe

    for seed in seeds or list(sweep.seeds):
        for method in methods or list(sweep.methods):
            one = dataclasses.replace(sweep, methods={method: sweep.methods[method]}, seeds=(seed,))
            record = {"command": shlex.join(["python", "benchmarks/distill_cpu.py", *sys.argv[1:]]),
                      "machine": describe(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            result = run_sweep(one, out, retry_failed=retry_failed, progress=False, record=record,
                               command=lambda run, run_dir: [*wrap, *train_command(run, run_dir)])
            if result.stopped:
                raise SystemExit(130)
            run_dir = out / f"{method}-seed{seed}"
            if (run_dir / "checkpoints").exists() and not (run_dir / "diagnostics.json").exists():
                diagnose_wrapped(run_dir, wrap)


def diagnose_wrapped(run_dir: Path, wrap: list[str]) -> None:
    argv = [*wrap, sys.executable, str(Path(__file__).resolve()), "--diagnose", str(run_dir)]
    subprocess.run(argv, cwd=ROOT, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=None, help="a trained teacher run or checkpoint to link")
    parser.add_argument("--methods", default=None, help="comma-separated methods of the sweep (default: all)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the sweep's)")
    parser.add_argument("--wrap", default="", help="a command each run is started under (e.g. heavy)")
    parser.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    parser.add_argument("--served", action="store_true",
                        help="run configs/sweep/distill_cpu_served.yaml (the teacher on a vLLM server) instead")
    parser.add_argument("--report", action="store_true", help="only write the table and print the diagnostics")
    parser.add_argument("--diagnose", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks.distill_diagnostics import diagnose, report

    if args.diagnose is not None:
        diagnose(args.diagnose, final_checkpoint(TEACHER.resolve()), OUT)
        return 0
    if not args.report:
        wrap = shlex.split(args.wrap)
        ensure_teacher(args.teacher, wrap)
        methods = args.methods.split(",") if args.methods else None
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        if args.served:
            run_methods(methods, seeds, wrap, args.retry_failed, "distill_cpu_served", SERVED)
        else:
            run_methods(methods, seeds, wrap, args.retry_failed)
    print(report(OUT))
    if SERVED.exists():
        print(report(SERVED, OUT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
