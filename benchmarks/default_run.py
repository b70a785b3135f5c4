"""The README's default run (command 1 after setup), timed as a user sees it, on each precision path.

Runs `scripts/train.py` in a pseudo-terminal (so the progress bar and the quiet-terminal behaviour are what a person
sees), once per variant, and writes the wall time, the per-step split, the held-out curve and the terminal's screen
to one markdown file with the machine's CPU and flags:

    python benchmarks/default_run.py --results benchmarks/results/default_run.md

By default two variants run: `auto` (the default: precision chosen from the machine) and `float32` (forced, so that
the float32 path has numbers even on a machine with native bf16). `--variant NAME="overrides ..."` replaces them.
"""

from __future__ import annotations

import argparse
import fcntl
import os
from pathlib import Path
import pty
import re
import shlex
import statistics
import struct
import subprocess
import sys
import termios
import time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe  # noqa: E402
from sdpo.tracking import read_metrics  # noqa: E402

VARIANTS = {
    "auto": [],
    "float32": ["model.autocast_dtype=none"],  # the engine's `auto` follows the trainer: float32 everywhere
}
STAGES = ["generate", "score", "teacher_context", "teacher_forward", "update", "sync"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROGRESS = re.compile(r"\d+/\d+ \[")


def run_in_terminal(command: list[str], log_path: Path) -> tuple[float, str]:
    """Run `command` with a pseudo-terminal as its stdout and stderr; (wall seconds, everything it wrote)."""
    controller, terminal = pty.openpty()
    # A terminal of 120 x 48 characters: a new pseudo-terminal has 0 columns, where tqdm draws an empty bar.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 48, 120, 0, 0))
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO once the child has closed its side
            break
        if not data:
            break
        chunks.append(data)
    rc = proc.wait()
    wall = time.perf_counter() - start
    os.close(controller)
    text = b"".join(chunks).decode(errors="replace")
    log_path.write_text(text)
    if rc != 0:
        raise SystemExit(f"{shlex.join(command)} exited {rc}; its output is in {log_path}")
    return wall, text


def screen_lines(text: str) -> list[str]:
    """The lines a terminal would show at the end: carriage returns overwrite, colour codes dropped."""
    lines = []
    for raw in ANSI.sub("", text).replace("\r\n", "\n").split("\n"):
        shown = [part for part in raw.split("\r") if part.strip()]
        lines.append(shown[-1] if shown else raw.strip("\r"))
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def run_variant(name: str, overrides: list[str], out: Path) -> dict:
    run_dir = out / name
    command = [sys.executable, "scripts/train.py", f"trainer.output_dir={run_dir}", *overrides]
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    print("running:", shlex.join(command), flush=True)
    wall, text = run_in_terminal(command, out / f"{name}.terminal.log")
    lines = screen_lines(text)
    first_bar = next((i for i, line in enumerate(lines) if PROGRESS.search(line)), len(lines))
    rows = read_metrics(run_dir)
    curve = [(r["step"], v) for r in rows for k, v in r.items() if k.startswith("eval/avg@")]
    steps = [r for r in rows if "time/update" in r]
    stage = {s: statistics.median(r.get(f"time/{s}", 0.0) for r in steps) for s in STAGES}
    return {
        "name": name, "command": shlex.join(["python", "scripts/train.py", *overrides]), "wall": wall,
        "lines_before_bar": first_bar, "screen": lines, "curve": curve, "steps": len(steps),
        "step_median": statistics.median(sum(r.get(f"time/{s}", 0.0) for s in STAGES) for r in steps),
        "stage": stage,
    }


def report(results: list[dict], args: argparse.Namespace) -> str:
    out = [
        "# The default run (README command 1), timed as a user sees it",
        "",
        f"Machine: {describe()}.",
        f"Command: `python benchmarks/default_run.py {' '.join(args.argv)}`".rstrip() + " (each variant in a"
        " pseudo-terminal; wall time is the whole `scripts/train.py` process: start-up, model load, engine, training,"
        " evaluations, checkpoint, plot).",
        "",
        "| variant | overrides | wall time | steps | median s/step | " + " | ".join(STAGES) + " | held-out start -> end (best) |",
        "|---|---|---|---|---|" + "---|" * len(STAGES) + "---|",
    ]
    for r in results:
        values = [v for _, v in r["curve"]]
        curve = f"{values[0]:.3f} -> {values[-1]:.3f} ({max(values):.3f})" if values else "n/a"
        stages = " | ".join(f"{r['stage'][s]:.1f}" for s in STAGES)
        overrides = r["command"].removeprefix("python scripts/train.py").strip() or "(none)"
        out.append(f"| {r['name']} | `{overrides}` | {r['wall'] / 60:.1f} min ({r['wall']:.0f} s) | {r['steps']} | "
                   f"{r['step_median']:.1f} | {stages} | {curve} |")
    for r in results:
        out += ["", f"## {r['name']}: held-out curve", "",
                "step | " + " | ".join(str(s) for s, _ in r["curve"]),
                "---|" + "---|" * len(r["curve"]),
                "avg | " + " | ".join(f"{v:.3f}" for _, v in r["curve"]),
                "", f"Terminal ({r['lines_before_bar']} lines before the progress bar), as shown at the end:", "",
                "```", *r["screen"], "```"]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="OVERRIDES"',
                        help="a named set of Hydra overrides (repeatable); default: auto and float32")
    parser.add_argument("--out", default="benchmarks/runs/default_run", help="run directories and terminal logs")
    parser.add_argument("--results", help="write the markdown table here")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    variants = dict(VARIANTS)
    if args.variant:
        variants = {n: shlex.split(o) for n, o in (v.split("=", 1) for v in args.variant)}
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = [run_variant(name, overrides, out) for name, overrides in variants.items()]
    text = report(results, args)
    print(text)
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
