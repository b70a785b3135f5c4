"""One real run of examples/own_data.ipynb on SmolLM2-135M-Instruct, and its results file.

    python benchmarks/own_data_example.py                 # execute the notebook in place (outputs saved), summarize
    python benchmarks/own_data_example.py --summarize examples/runs/<run>   # only rewrite the results file

The notebook runs as a user would run it (its default parameters: SmolLM2, 6 steps, held-out eval every 3); the
results file gets the curve per step, the step times, the machine, and the number of lines of user code in the
notebook (code cells without blank and comment lines, the parameters cell that the tests use left out).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import shutil
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "own_data.ipynb"
RESULTS = REPO / "benchmarks" / "results" / "own_data_example.md"


def execute_notebook() -> float:
    import nbformat
    from nbclient import NotebookClient

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    start = time.time()
    NotebookClient(notebook, timeout=5400, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    nbformat.write(notebook, NOTEBOOK)
    return time.time() - start


def user_code_lines() -> tuple[int, list[str]]:
    import nbformat

    cells = [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    lines = [line for cell in cells[1:] for line in cell.source.splitlines()  # cells[0]: the parameters
             if line.strip() and not line.strip().startswith("#")]
    return len(lines), lines


def newest_run() -> Path:
    return max((REPO / "examples" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)


def summarize(run_dir: Path, seconds: float | None) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/avg@4"] for r in rows if r.get("eval/avg@4") is not None}
    steps = [r for r in rows if r.get("reward/mean") is not None]
    count, lines = user_code_lines()
    png = RESULTS.with_suffix(".png")
    shutil.copy(run_dir / "reward_curve.png", png)
    step_time = lambda r: sum(v for k, v in r.items() if k.startswith("time/") and v is not None)  # noqa: E731
    table = ["| step | reward/mean (train, 8 questions x 4) | feedback in the reprompt | eval/avg@4 (12 held out) | step seconds |",
             "|---|---|---|---|---|"]
    if 0 in evals:
        table.append(f"| 0 | | | {evals[0]:.3f} | |")
    for r in steps:
        ev = f"{evals[r['step']]:.3f}" if r["step"] in evals else ""
        table.append(f"| {r['step']} | {r['reward/mean']:.3f} | {r.get('teacher/feedback_fraction', 0):.2f} | {ev} | "
                     f"{step_time(r):.0f} |")
    text = f"""# The own-data example on SmolLM2-135M-Instruct

Date: {time.strftime('%Y-%m-%d')}. Machine: {describe()}; shared with other jobs during the run (load average 8-14
on 2 cores), so the step times are not a speed measurement.
Command: `python benchmarks/own_data_example.py` (executes examples/own_data.ipynb in place with nbclient, its
default parameters: SmolLM2-135M-Instruct, 6 steps, held-out avg@4 every 3; the committed notebook holds this run's outputs).
Setup: the library's CPU defaults (`algorithm=sdpo_grpo`, the lambda = 0.9 advantage-level hybrid with an EMA teacher;
`rollout=vllm`; 8 questions x 4 rollouts per step, at most 48 new tokens; lr 3e-5), 36 training and 12 held-out
unit-conversion questions made in the notebook, a reward function returning `(reward, feedback)` whose feedback
names the unit size ("7 is not correct: one hour has 60 minutes.").
{f'Wall time of the whole notebook: {seconds / 60:.1f} min.' if seconds else ''}

User code: **{count} lines** (code cells without blank and comment lines; the 3-line parameters cell, which lets
the tests run the notebook on the tiny model, left out):

```python
{chr(10).join(lines)}
```

## The curve

![curves]({png.name})

{chr(10).join(table)}
"""
    RESULTS.write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summarize", type=Path, help="a finished run directory: only rewrite the results file")
    args = parser.parse_args()
    seconds = None
    if args.summarize is None:
        seconds = execute_notebook()
    summarize(args.summarize or newest_run(), seconds)


if __name__ == "__main__":
    main()
