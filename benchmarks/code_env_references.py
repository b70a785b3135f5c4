"""Reference solutions and broken variants on the full code data sets: pass counts and time per program.

    python benchmarks/code_env_references.py [--datasets leetcode,humaneval] [--limit N] [--loop-sample 10]
        [--variant-limit N] [--workers 2] [--out benchmarks/results/code_env_references.md]

For every data set the reference of each problem (eval split: all tests) should get reward 1; a wrong-answer
variant (the reference with its result perturbed, or an extra output line), a crash (an exception before the
reference) and an infinite loop should get 0 with "Wrong Answer", "Runtime Error" and "Time Limit Exceeded"
feedback. The loop variant costs the full time limit, so it runs on the first `--loop-sample` problems only; the
wrong and crash variants run on the first `--variant-limit` problems (default: all).
CodeContests ships no reference programs: its row uses the hand-written solutions of tests/test_env_code.py, and
the `codecontests-all` row runs the broken variants of an empty program on every problem.
Scoring goes through `env.score_batch` (the process pool and the sandbox), as in training.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
from collections import Counter
import datetime as dt
from pathlib import Path
import platform
import statistics
import sys
import time

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name  # noqa: E402
from sdpo.envs import ENVIRONMENTS  # noqa: E402
from tests.test_env_code import CODECONTESTS_SOLUTIONS, fenced, wrong_variant  # noqa: E402

DATASETS = {  # name -> (environment, config overrides, split)
    "codecontests": ("codecontests", {}, "test"),
    "codecontests-all": ("codecontests", {}, "test"),  # every problem, broken variants of an empty program
    "leetcode": ("leetcode", {}, "test"),
    "humaneval": ("humaneval", {}, "test"),
    "mbpp": ("mbpp", {"variant": "full"}, "all"),
    "mbpp-sanitized": ("mbpp", {"variant": "sanitized"}, "all"),
    "mbppplus": ("mbppplus", {}, "test"),
}
EXPECTED = {"wrong": "wrong_answer", "crash": "runtime_error", "loop": "time_limit"}


def variants(problem, program: str) -> dict[str, str]:
    return {
        "reference": program,
        "wrong": wrong_variant(program, problem.data),
        "crash": "raise ValueError('broken on purpose')\n" + program,
        "loop": "while True:\n    pass\n" + program,
    }


def run_dataset(name: str, args) -> dict:
    env_name, overrides, split = DATASETS[name]
    cls = ENVIRONMENTS.get(env_name)
    env = cls(cls.config_class(score_workers=args.workers, **overrides))
    problems = env.load(split)
    kinds = ["reference", "wrong", "crash", "loop"]
    if name == "codecontests":
        problems = [p for p in problems if p.id in CODECONTESTS_SOLUTIONS]
        programs = [CODECONTESTS_SOLUTIONS[p.id] for p in problems]
    elif name == "codecontests-all":  # no references: check that every problem's tests run and reject
        programs, kinds = ["import sys\nsys.stdin.read()\n"] * len(problems), kinds[1:]
    else:
        programs = [p.data["reference"] for p in problems]
    problems, programs = problems[: args.limit], programs[: args.limit]
    result = {"problems": len(problems), "isolation": None}
    for kind in kinds:
        sample = {"reference": None, "loop": args.loop_sample}.get(kind, args.variant_limit)
        chosen = list(zip(problems, programs))[:sample]
        responses = [fenced(variants(p, prog)[kind]) for p, prog in chosen]
        start = time.monotonic()
        scores = env.score_batch([p for p, _ in chosen], responses, [False] * len(chosen))
        wall = time.monotonic() - start
        times = [s.info.get("score_s", 0.0) for s in scores]
        result[kind] = {
            "n": len(scores),
            "reward_1": sum(s.reward == 1.0 for s in scores),
            "statuses": Counter(s.info.get("status") for s in scores),
            "mean_s": statistics.mean(times) if times else 0.0,
            "median_s": statistics.median(times) if times else 0.0,
            "p95_s": sorted(times)[int(0.95 * (len(times) - 1))] if times else 0.0,
            "wall_s": wall,
            "failures": [(p.id, s.info.get("status"), s.feedback[:120]) for (p, _), s in zip(chosen, scores) if (s.reward == 1.0) != (kind == "reference")],
        }
        result["isolation"] = result["isolation"] or next((s.info.get("isolation") for s in scores if "isolation" in s.info), None)
        print(f"{name} {kind}: {result[kind]['reward_1']}/{len(scores)} reward 1, {wall:.1f} s", flush=True)
    return result


def report(results: dict, args, started: dt.datetime, elapsed: float) -> str:
    lines = [
        "# Code environments: references and broken variants on the full data sets",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; total wall time {elapsed / 60:.1f} min",
        f"- Machine: {cpu_name()}, {os.cpu_count()} logical cores, {platform.platform()}, Python {platform.python_version()}",
        f"- Command: `python benchmarks/code_env_references.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- Scoring: `env.score_batch`, {args.workers} pool workers; sandbox isolation: "
        f"{next(iter(results.values()))['isolation']}; limits: 6 s per test, 1024 MiB, 32 processes (defaults)",
        f"- Loop variant: first {args.loop_sample} problems per data set (each costs the 6 s time limit); wrong and crash "
        f"variants: {'all problems' if args.variant_limit is None else f'first {args.variant_limit} problems'} per data set",
        "",
        "Seconds per program are the pool's `score_s`: one response, all of its tests, sandbox start-up included.",
        "CodeContests ships no reference programs: its row scores the 3 hand-written solutions of "
        "tests/test_env_code.py; `codecontests-all` runs the broken variants of an empty program on the 224 problems "
        "(as many as the variant limit allows).",
        "",
        "| data set | problems | reference: reward 1 | s/program mean (median, p95) | wrong -> Wrong Answer | crash -> Runtime Error | loop -> Time Limit |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ref = r.get("reference")
        cells = [name, str(r["problems"])]
        cells += [f"{ref['reward_1']}/{ref['n']}", f"{ref['mean_s']:.3f} ({ref['median_s']:.3f}, {ref['p95_s']:.3f})"] if ref else ["n/a", "n/a"]
        for kind in ("wrong", "crash", "loop"):
            v = r[kind]
            cells.append(f"{v['statuses'][EXPECTED[kind]]}/{v['n']} (reward 1: {v['reward_1']})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Statuses and exceptions", ""]
    for name, r in results.items():
        for kind in [k for k in ("reference", "wrong", "crash", "loop") if k in r]:
            v = r[kind]
            lines.append(f"- {name} / {kind}: " + ", ".join(f"{k}: {c}" for k, c in v["statuses"].most_common()))
            for pid, status, feedback in v["failures"][:8]:
                lines.append(f"  - `{pid}` {status}: {feedback.splitlines()[0] if feedback else ''}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--limit", type=int, default=None, help="first N problems per data set (default: all)")
    parser.add_argument("--loop-sample", type=int, default=10)
    parser.add_argument("--variant-limit", type=int, default=None, help="wrong/crash variants on the first N problems")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "code_env_references.md"))
    args = parser.parse_args()
    started, start = dt.datetime.now(dt.timezone.utc), time.monotonic()
    results = {name: run_dataset(name, args) for name in args.datasets.split(",")}
    text = report(results, args, started, time.monotonic() - start)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
