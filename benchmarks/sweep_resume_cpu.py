"""The sweep runner on real CPU runs (scripts/sweep.py, sdpo/sweep/): a sweep run uninterrupted (A), the same sweep
stopped with SIGINT during its fifth run and started again (B), and a sweep with a bad override in one method.

Checks and reports: B's first four runs are not run again (their completion markers are byte for byte the ones
written before the stop), B's table holds the same numbers as A's (table.json, which has no times), and the bad
method is reported as failed with its error line while the other methods complete.

    python benchmarks/sweep_resume_cpu.py --results benchmarks/results/sweep_cpu.md

Run it alone (under the heavy-run lock): the table's wall times are the runs' own.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The bad-override sweep: the tiny model, three methods, one of them with a misspelled key.
BAD_SWEEP = """\
description: one method with a misspelled key (trainer.optim.lrr); the others must complete
overrides: [model=tiny, rollout=hf, rollout.num_generations=4, rollout.max_new_tokens=8, trainer.total_steps=2,
            trainer.questions_per_step=2, trainer.mini_batch_questions=2, eval.every=1, eval.num_questions=4,
            eval.samples_per_question=2, logging.progress_bar=false]
methods:
  grpo: [algorithm=grpo]
  sdpo: [algorithm=sdpo]
  sdpo_typo: [algorithm=sdpo, trainer.optim.lrr=1e-5]
seeds: [0]
keep_checkpoints: false
metrics: [eval/avg@2]
"""


def sweep(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "sweep.py"), *args], cwd=ROOT, env=env, **kwargs)


def markers(out: Path, names: list[str]) -> dict[str, str]:
    return {n: (out / n / "sweep_run.json").read_text() for n in names if (out / n / "sweep_run.json").exists()}


def stop_during(out: Path, name: str, name_arg: str, log: Path) -> tuple[int, float]:
    """Start the sweep, send SIGINT once run `name` has logged a training step; (exit code, seconds into the run)."""
    with log.open("w") as f:
        proc = sweep([f"sweep={name_arg}", "--out", str(out)], stdout=f, stderr=subprocess.STDOUT)
        metrics, started = out / name / "metrics.jsonl", None
        while proc.poll() is None:
            if started is None and (out / name / "terminal.log").exists():
                started = time.time()
            if metrics.exists() and any(json.loads(line)["step"] >= 1 for line in metrics.read_text().splitlines()
                                        if line.strip()):
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.5)
        into = time.time() - (started or time.time())
        return proc.wait(), into


def embedded(table: Path) -> str:
    """A sweep's table.md inside this report: its headings two levels down."""
    return "\n".join("##" + line if line.startswith("#") else line for line in table.read_text().splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default="cpu_methods")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep_resume_cpu"))
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--note", default="nothing else heavy (run under the heavy-run lock)")
    args = parser.parse_args()
    from sdpo.sweep import load_sweep

    names = [r.name for r in load_sweep(args.sweep).runs()]
    a, b, bad = args.out / "A", args.out / "B", args.out / "bad_override"
    for d in (a, b, bad):
        shutil.rmtree(d, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    times = {}
    start = time.time()
    code_a = sweep([f"sweep={args.sweep}", "--out", str(a)], stdout=(args.out / "A.log").open("w"),
                   stderr=subprocess.STDOUT).wait()
    times["A"] = time.time() - start
    start = time.time()
    code_stop, into = stop_during(b, names[4], args.sweep, args.out / "B-stopped.log")
    before = markers(b, names)
    code_b = sweep([f"sweep={args.sweep}", "--out", str(b)], stdout=(args.out / "B-continued.log").open("w"),
                   stderr=subprocess.STDOUT).wait()
    times["B"] = time.time() - start
    after = markers(b, names)
    table_a, table_b = (json.loads((d / "table.json").read_text()) for d in (a, b))
    bad.mkdir(parents=True)
    (bad / "bad_override.yaml").write_text(BAD_SWEEP)
    code_bad = sweep([f"sweep={bad / 'bad_override.yaml'}", "--out", str(bad / "runs")],
                     stdout=(args.out / "bad.log").open("w"), stderr=subprocess.STDOUT).wait()

    from benchmarks.machine import describe

    kept = [n for n in names[:4] if before.get(n) is not None and before.get(n) == after.get(n)]
    lines = ["# A CPU sweep, its table, and the runner's resume (scripts/sweep.py)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {describe()}",
             f"- command: `python benchmarks/sweep_resume_cpu.py {' '.join(sys.argv[1:])}`; what else ran: {args.note}",
             f"- A: `python scripts/sweep.py sweep={args.sweep} --out {a}` uninterrupted: exit "
             f"{code_a}, {times['A'] / 60:.1f} min",
             f"- B: the same into `{b}`, SIGINT {into:.0f} s into its fifth run ({names[4]}): exit "
             f"{code_stop} with {len(before)} runs marked; started again: exit {code_b}, "
             f"{times['B'] / 60:.1f} min in all",
             f"- B's runs 1-4 not run again (markers unchanged by the second start): {len(kept)} of 4 "
             f"({', '.join(kept)})",
             f"- {names[4]} marked before the second start: {names[4] in before} (a stopped run is left unmarked and "
             "restarted)",
             f"- A's and B's table.json (every number of the table but times): "
             f"{'identical' if table_a == table_b else 'DIFFERENT'}", ""]
    if table_a != table_b:
        lines += ["```", json.dumps(table_a, indent=1), json.dumps(table_b, indent=1), "```", ""]
    lines += ["## A's table", "", embedded(a / "table.md"), "",
              "## B's table (after the stop and the second start)", "", embedded(b / "table.md"), "",
              f"## A sweep with a bad override in one method (exit {code_bad})", "",
              "```", BAD_SWEEP.rstrip(), "```", "", embedded(bad / "runs" / "table.md")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        args.results.write_text(text)
        shutil.copyfile(a / "curves.png", args.results.with_suffix(".png"))
        print(f"wrote {args.results} and {args.results.with_suffix('.png')}")


if __name__ == "__main__":
    main()
