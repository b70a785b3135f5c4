"""The default run (README command 1) with each rollout engine: colocated vLLM, the vLLM server, and the server one
step ahead (rollout.async_steps=1), on this CPU: step time, its split, staleness, and the held-out curve.

    python benchmarks/async_cpu.py --results benchmarks/results/async_cpu.md

Each variant is `scripts/train.py` with the defaults plus its overrides, run in a pseudo-terminal as a user would
(benchmarks/default_run.py's runner), one after the other. The step time is the trainer's wall time per step (the
sum of its stages: on the async variant, `rollout_wait` is what the overlap did not hide); `ahead/generate` is the
generation that ran in the background meanwhile. The server variants include the server's own start-up in the wall
time (the engine starts it: rollout.server.url=null).
"""

from __future__ import annotations

import argparse
from pathlib import Path
import shlex
import statistics
import sys

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from default_run import run_in_terminal, screen_lines  # noqa: E402
from machine import describe  # noqa: E402
from sdpo.tracking import read_metrics  # noqa: E402

VARIANTS = {
    "colocated": ["rollout=vllm"],
    "server": ["rollout=vllm_server"],
    "server_async1": ["rollout=vllm_server", "rollout.async_steps=1"],
}
STAGES = ["generate", "score", "rollout_wait", "teacher_context", "update", "sync"]


def run_variant(name: str, overrides: list[str], out: Path) -> dict:
    run_dir = out / name
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    command = [sys.executable, "scripts/train.py", f"trainer.output_dir={run_dir}", *overrides]
    print("running:", shlex.join(command), flush=True)
    wall, text = run_in_terminal(command, out / f"{name}.terminal.log")
    rows = read_metrics(run_dir)
    steps = [r for r in rows if "time/update" in r]
    step_time = [sum(v for k, v in r.items() if k.startswith("time/")) for r in steps]
    return {
        "name": name, "overrides": overrides, "wall": wall, "steps": len(steps),
        "step_mean": statistics.mean(step_time), "step_mean_after_first": statistics.mean(step_time[1:]),
        "stage": {s: statistics.mean(r.get(f"time/{s}", 0.0) for r in steps) for s in STAGES},
        "ahead_generate": statistics.mean(r.get("ahead/generate_seconds", 0.0) for r in steps),
        "staleness": [r.get("rollout/staleness", 0.0) for r in steps],
        "reward": statistics.mean(r["reward/mean"] for r in steps),
        "curve": [(r["step"], v) for r in rows for k, v in r.items() if k.startswith("eval/avg@")],
        "screen": screen_lines(text)[-4:],
    }


def report(results: list[dict], argv: list[str], note: str) -> str:
    out = [
        "# Rollout engines on the default run: colocated vLLM, the vLLM server, the server one step ahead",
        "",
        f"Machine: {describe()}.",
        f"Command: `python benchmarks/async_cpu.py {' '.join(argv)}`".rstrip() + " — each variant is `python "
        "scripts/train.py <overrides>` (README command 1's defaults: SmolLM2-135M-Instruct, arithmetic, 10 steps of "
        "8 questions x 4 rollouts, held-out avg@4 every 2 steps), run one after the other in a pseudo-terminal.",
        f"What else ran: {note}",
        "",
        "| variant | overrides | wall | mean s/step (steps 1-9) | " + " | ".join(STAGES)
        + " | background generate | staleness per step | mean reward | held-out start -> end (best) |",
        "|---|---|---|---|" + "---|" * len(STAGES) + "---|---|---|---|",
    ]
    for r in results:
        values = [v for _, v in r["curve"]]
        curve = f"{values[0]:.3f} -> {values[-1]:.3f} ({max(values):.3f})" if values else "n/a"
        stages = " | ".join(f"{r['stage'][s]:.1f}" for s in STAGES)
        staleness = ",".join(f"{s:.0f}" for s in r["staleness"])
        out.append(f"| {r['name']} | `{' '.join(r['overrides'])}` | {r['wall']:.0f} s | {r['step_mean']:.1f} "
                   f"({r['step_mean_after_first']:.1f}) | {stages} | {r['ahead_generate']:.1f} | {staleness} | "
                   f"{r['reward']:.3f} | {curve} |")
    out += ["", "Held-out avg@4 by step:", "", "| variant | " + " | ".join(str(s) for s, _ in results[0]["curve"]) + " |",
            "|---|" + "---|" * len(results[0]["curve"])]
    for r in results:
        out.append(f"| {r['name']} | " + " | ".join(f"{v:.3f}" for _, v in r["curve"]) + " |")
    for r in results:
        out += ["", f"{r['name']}, the terminal's last lines:", "", "```", *r["screen"], "```"]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="OVERRIDES"',
                        help="a named set of Hydra overrides (repeatable); default: the three above")
    parser.add_argument("--out", default="benchmarks/runs/async_cpu", help="run directories and terminal logs")
    parser.add_argument("--results", help="write the markdown table here")
    parser.add_argument("--note", default="nothing else (run alone under the heavy-run lock).",
                        help="what else ran on the machine meanwhile")
    args = parser.parse_args()
    variants = dict(VARIANTS)
    if args.variant:
        variants = {n: shlex.split(o) for n, o in (v.split("=", 1) for v in args.variant)}
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = [run_variant(name, overrides, out) for name, overrides in variants.items()]
    text = report(results, sys.argv[1:], args.note)
    print(text)
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
