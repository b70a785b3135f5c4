"""Fault injection: a short run interrupted at random points, resumed each time until done, against the same run
uninterrupted.

    python benchmarks/faults_cpu.py --faults 30                      # the tiny model, synchronous (transformers engine)
    python benchmarks/faults_cpu.py --faults 30 --server-faults 4    # and the server, async_steps=1

Each attempt starts `scripts/train.py ... trainer.resume=auto` (the command the stop line prints) and, at a random
point, sends one fault (each round of faults holds every kind once, in a random order): SIGINT, SIGTERM, SIGINT twice (the second stops at once), SIGKILL of the trainer, or (with
the server) SIGKILL of the vLLM server. The point is aimed at a stage of a step (start-up, generation, update, weight
sync, checkpoint save) from the uninterrupted run's own stage times: the harness waits for a step's metrics row (the
save follows it at once) and then sleeps into the next step's generation, update or sync. What it reports as the
stage is that aim, except "save", which it checks (a staging directory `.tmp-step-*` exists when the fault is sent).

Checked after every episode (one run resumed until it finishes):
- synchronous: the final weights (the last checkpoint's safetensors, byte for byte) and every logged number and sample
  row equal the uninterrupted run's (timings aside: `time/*`, `sync/seconds`);
- asynchronous: each step logged exactly once in metrics.jsonl and samples.jsonl (the numbers differ: docs/scaling.md);
- after every attempt: no process the trainer started still alive (scoring workers, a server), and no file of the
  run's outside its run directory (the working directory and the system's temporary folder).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
import datetime
import json
import os
from pathlib import Path
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe as describe_machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "scripts" / "train.py")
RESULTS = REPO / "benchmarks" / "results" / "faults_cpu.md"
TINY = ["model=tiny", "algorithm=sdpo", "env=arithmetic", "env.score_workers=1", "model.autocast_dtype=none",
        "rollout.num_generations=4", "rollout.max_new_tokens=8", "trainer.questions_per_step=2",
        "trainer.mini_batch_questions=2", "trainer.optim.warmup_steps=0", "trainer.optim.lr=1e-3",
        "trainer.save_every=1", "trainer.keep_last=2", "eval.every=0", "logging.progress_bar=false",
        "logging.samples_every=1", "logging.num_samples=2", "trainer.seed=3"]
CASES = {
    "tiny, hf engine, synchronous": [*TINY, "rollout=hf", "trainer.total_steps=10"],
    "tiny, vllm server, async_steps=1": [*TINY, "rollout=vllm_server", "rollout.async_steps=1",
                                         "rollout.vllm.enforce_eager=true", "rollout.vllm.dtype=float32",
                                         "rollout.vllm.kv_cache_gb=0.25", "rollout.max_prompt_len=128",
                                         "trainer.total_steps=6"],
}
SYNC_FAULTS = ("SIGINT", "SIGTERM", "SIGINT twice", "SIGKILL trainer")
SERVER_FAULTS = (*SYNC_FAULTS, "SIGKILL server")
STAGES = ("start-up", "generation", "update", "sync", "save")
REPORTED = (*STAGES, "first step")
UNTIMED = ("time/", "sync/seconds", "ahead/")
STRAY_AFTER_S = 30.0  # how long the trainer's processes may take to go after it ended


@dataclass
class Attempt:
    fault: str | None
    aimed: str | None
    stage: str | None
    rc: int | None
    line: str
    seconds: float
    strays: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def temp_entries() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("sdpo")}


def stage_times(run_dir: Path) -> dict[str, float]:
    """Mean seconds of the uninterrupted run's step stages, from its metrics rows."""
    got = rows(run_dir)
    mean = lambda key: sum(r.get(key) or 0.0 for r in got) / max(len(got), 1)  # noqa: E731
    return {"generation": mean("time/generate") + mean("time/score"),
            "update": mean("time/teacher_context") + mean("time/update") + mean("time/teacher_forward"),
            "sync": mean("time/sync")}


class Descendants:
    """The processes the trainer started, seen while it ran (scoring workers have their own session)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.seen: dict[int, str] = {}

    def poll(self) -> None:
        try:
            for child in self.root.children(recursive=True):
                if child.pid not in self.seen:
                    self.seen[child.pid] = " ".join(child.cmdline()[:4])[:120]
        except psutil.Error:
            pass

    def alive(self) -> list[str]:
        left = []
        for pid, cmd in self.seen.items():
            try:
                process = psutil.Process(pid)
                if process.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {cmd}")
            except psutil.Error:
                pass
        return left

    def server(self) -> int | None:
        self.poll()
        for pid, cmd in self.seen.items():
            if "api_server" in cmd and psutil.pid_exists(pid):
                return pid
        return None


def attempt(args: list[str], run_dir: Path, cwd: Path, fault: str | None, aimed: str | None, times: dict[str, float],
            rng: random.Random, log_dir: Path, index: int) -> Attempt:
    before_tmp, start = temp_entries(), time.monotonic()
    out, err = log_dir / f"{index:03d}.out", log_dir / f"{index:03d}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, TRAIN, *args, f"trainer.output_dir={run_dir}", "trainer.resume=auto"],
                                cwd=cwd, env=env(), stdout=stdout, stderr=stderr, start_new_session=True)
    tree = Descendants(proc.pid)
    stage = None
    if fault is not None:
        stage = aim(proc, tree, run_dir, out, aimed, times, rng)
        if stage is not None:
            send(proc, tree, fault)
    while proc.poll() is None:
        tree.poll()
        time.sleep(0.1)
        if time.monotonic() - start > 900:
            proc.kill()
    deadline = time.monotonic() + STRAY_AFTER_S  # what the trainer's exit stops: workers watch their parent, a
    while tree.alive() and time.monotonic() < deadline:  # server gets its parent-death signal and shuts down
        time.sleep(0.2)
    strays = tree.alive()
    for stray in strays:
        try:
            psutil.Process(int(stray.split()[0])).kill()
        except psutil.Error:
            pass
    lines = err.read_text().strip().splitlines() + out.read_text().strip().splitlines()[-1:]
    final = [line for line in lines if line.startswith(("stopped", "error:", "done:")) or " is finished: " in line]
    leftovers = sorted(temp_entries() - before_tmp) + sorted(p.name for p in cwd.iterdir() if p != run_dir.parent)
    return Attempt(fault if stage else None, aimed if stage else None, stage, proc.returncode,
                   (final[-1] if final else (lines[-1] if lines else ""))[:160], time.monotonic() - start, strays,
                   leftovers)


def aim(proc: subprocess.Popen, tree: Descendants, run_dir: Path, out: Path, aimed: str, times: dict[str, float],
        rng: random.Random) -> str | None:
    """Wait until the aimed stage (by the uninterrupted run's stage times); None if the run ended first."""
    def wait(condition, timeout: float = 600) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            tree.poll()
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    if aimed == "start-up":
        time.sleep(rng.uniform(0.5, 5.0))
        started = "run directory" in out.read_text()
        return None if proc.poll() is not None else ("start-up" if not started else "first step")
    if not wait(lambda: "run directory" in out.read_text()):
        return None
    count = len(rows(run_dir))
    if not wait(lambda: len(rows(run_dir)) > count):  # a step ended: its save starts now
        return None
    staging = lambda: any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").glob(".tmp-*"))  # noqa: E731
    if aimed == "save":
        if wait(staging, timeout=2.0):
            return "save"
        aimed = "generation"  # the save was over before it was seen: the next step's generation instead
    wait(lambda: not staging(), timeout=30)
    offset = {"generation": rng.uniform(0.1, 0.9) * times["generation"],
              "update": times["generation"] + rng.uniform(0.1, 0.9) * times["update"],
              "sync": times["generation"] + times["update"] + rng.uniform(0.1, 0.9) * times["sync"]}[aimed]
    time.sleep(offset)
    return None if proc.poll() is not None else aimed


def send(proc: subprocess.Popen, tree: Descendants, fault: str) -> None:
    if fault == "SIGKILL server":
        pid = tree.server()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        return
    if fault == "SIGKILL trainer":
        proc.send_signal(signal.SIGKILL)
        return
    proc.send_signal(signal.SIGTERM if fault == "SIGTERM" else signal.SIGINT)
    if fault == "SIGINT twice":
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)


def compare(reference: Path, run_dir: Path, total: int, exact: bool) -> list[str]:
    """What differs from the uninterrupted run (empty: nothing)."""
    problems = []
    got, want = rows(run_dir), rows(reference)
    steps = [r["step"] for r in got]
    if steps != list(range(1, total + 1)):
        problems.append(f"metrics steps {steps}")
    sample_steps = sorted({r["step"] for r in rows(run_dir, "samples.jsonl")})
    if sample_steps != list(range(1, total + 1)) or len(rows(run_dir, "samples.jsonl")) != len(rows(reference, "samples.jsonl")):
        problems.append(f"samples steps {[r['step'] for r in rows(run_dir, 'samples.jsonl')]}")
    if not exact:
        return problems
    timed = lambda r: {k: v for k, v in r.items() if not k.startswith(UNTIMED)}  # noqa: E731
    for a, b in zip(got, want):
        if timed(a) != timed(b):
            keys = sorted(k for k in timed(b) if timed(a).get(k) != timed(b).get(k))
            problems.append(f"step {b['step']}: {keys[:4]} differ")
    if (run_dir / "samples.jsonl").read_text() != (reference / "samples.jsonl").read_text():
        problems.append("samples.jsonl differs")
    name = f"step-{total:06d}"
    for file in sorted((reference / "checkpoints" / name).glob("*.safetensors")):
        if file.read_bytes() != (run_dir / "checkpoints" / name / file.name).read_bytes():
            problems.append(f"final weights {file.name} differ")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=30, help="faults on the synchronous tiny run")
    parser.add_argument("--server-faults", type=int, default=0, help="faults on the async server run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "faults_cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    shutil.rmtree(opts.work, ignore_errors=True)
    opts.work.mkdir(parents=True)
    started = time.monotonic()
    report = []
    for (case, args), budget in zip(CASES.items(), (opts.faults, opts.server_faults)):
        if budget <= 0:
            continue
        exact = "async" not in case
        kinds = SYNC_FAULTS if exact else SERVER_FAULTS
        total = int(next(a for a in args if a.startswith("trainer.total_steps=")).split("=")[1])
        case_dir = opts.work / case.split(",")[0].replace(" ", "") / ("sync" if exact else "async")
        cwd, logs = case_dir / "cwd", case_dir / "logs"
        (cwd / "runs").mkdir(parents=True)
        logs.mkdir()
        reference = cwd / "runs" / "reference"
        first = attempt(args, reference, cwd, None, None, {}, rng, logs, 0)
        times = stage_times(reference)
        episodes, faults, index = [], 0, 1
        plan: list[tuple[str, str]] = []
        report.append((case, exact, times, first, episodes))
        if first.rc != 0:  # reported as such; the other case still runs
            write_report(opts, report, time.monotonic() - started)
            continue
        while faults < budget:
            run_dir = cwd / "runs" / f"episode-{len(episodes) + 1}"
            attempts: list[Attempt] = []
            while not attempts or attempts[-1].rc != 0:
                if len(attempts) > 40:
                    break
                if faults < budget and not plan:  # every kind and stage in each round, in a random order
                    plan = [(k, rng.choice(STAGES)) for k in rng.sample(kinds, len(kinds))]
                fault, aimed = plan.pop() if faults < budget else (None, None)
                if fault == "SIGKILL server" and aimed == "start-up":
                    aimed = "generation"
                got = attempt(args, run_dir, cwd, fault, aimed, times, rng, logs, index)
                index += 1
                attempts.append(got)
                faults += got.fault is not None
            problems = compare(reference, run_dir, total, exact)
            episodes.append((run_dir.name, attempts, problems))
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            write_report(opts, report, time.monotonic() - started)  # so far: a later failure keeps what was done
    write_report(opts, report, time.monotonic() - started, final=True)


def write_report(opts: argparse.Namespace, report: list, seconds: float, final: bool = False) -> None:
    lines = [
        "# Fault injection: interrupted runs resumed until done, against the same run uninterrupted",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {describe_machine()}.",
        f"Command: `python benchmarks/faults_cpu.py --faults {opts.faults} --server-faults {opts.server_faults} "
        f"--seed {opts.seed}` (under `heavy`: nothing else heavy ran on the machine meanwhile; other agents' light "
        f"commands may have). Wall time {seconds / 60:.1f} min" + ("." if final else " so far (the run did not finish)."),
        "",
        "Each attempt runs `scripts/train.py ... trainer.resume=auto`; a fault is aimed at a stage from the "
        "uninterrupted run's stage times (\"save\" is checked: a staging directory existed when it was sent). "
        f"Stray: a process the trainer started still alive {STRAY_AFTER_S:g} s after it ended. Leftover: a `sdpo*` entry new in the "
        "system's temporary folder, or anything beside the run directories in the working directory.",
        "",
    ]
    for case, exact, times, first, episodes in report:
        attempts = [a for _, got, _ in episodes for a in got]
        faults = [a for a in attempts if a.fault]
        by_kind = {k: sum(a.fault == k for a in faults) for k in SERVER_FAULTS if any(a.fault == k for a in faults)}
        by_stage = {s: sum(a.stage == s for a in faults) for s in REPORTED if any(a.stage == s for a in faults)}
        passed = sum(not problems for _, _, problems in episodes)
        strays = sum(len(a.strays) for a in attempts)
        leftovers = sorted({x for a in attempts for x in a.leftovers})
        lines += [
            f"## {case}",
            "",
            (f"The uninterrupted run FAILED: {first.line}" if first.rc != 0 else "") +
            f"Uninterrupted run: {first.seconds:.1f} s; stage times per step (s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in times.items()) + ".",
            "",
            f"- faults: {len(faults)} ({', '.join(f'{k} {v}' for k, v in by_kind.items())}); by stage: "
            f"{', '.join(f'{k} {v}' for k, v in by_stage.items())}",
            f"- episodes: {len(episodes)}, {passed} of them "
            + ("equal to the uninterrupted run bit for bit (final weights, every logged number, every sample row)"
               if exact else "with every step logged exactly once (metrics and samples)"),
            f"- attempts: {len(attempts)}; stray processes: {strays}; leftover files: {len(leftovers)}"
            + (f" ({', '.join(leftovers)})" if leftovers else ""),
            "",
            "| episode | attempt | fault | stage | exit | s | what the terminal's last line said |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, got, problems in episodes:
            for i, a in enumerate(got, 1):
                said = a.line.replace("|", "\\|")
                lines.append(f"| {name} | {i} | {a.fault or '-'} | {a.stage or '-'} | {a.rc} | {a.seconds:.1f} | "
                             f"{said} |")
            if problems:
                lines.append(f"| {name} | differs | | | | | {'; '.join(problems)[:300]} |")
        lines.append("")
    opts.out.write_text("\n".join(lines) + "\n")
    if final:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
