"""Fault injection: a short run interrupted at random points, resumed each time until done, against the same run
uninterrupted.

    python benchmarks/faults_cpu.py --case tiny-hf --faults 8           # one case a call (each under `heavy`)
    python benchmarks/faults_cpu.py --case smollm2-server --faults 4 --seed 2

Cases (`CASES`): the tiny model and SmolLM2-135M-Instruct, each with the transformers engine and the colocated vLLM
engine (synchronous) and with the vLLM server at `rollout.async_steps=1`. Each attempt starts `scripts/train.py ...
trainer.resume=auto` (the command the stop line prints) and, at a random point, sends one fault (each round of
faults holds every kind once, in a random order): SIGINT, SIGTERM, SIGINT twice (the second stops at once), SIGKILL
of the trainer, or (server cases) SIGKILL of the vLLM server.

Where a fault lands is chosen from the uninterrupted run's own timeline: its start-up time (launch to the "run
directory" line) and its per-step stage times (generation, update, weight sync; a step's save follows its metrics
row). A fault aims at start-up, or at a stage of a step the attempt still has to take before its last one: the
harness waits for the metrics row of the step before it, then for that step's save to end, and sleeps into the stage.
The stage reported is that aim, except "save", which is checked (a staging directory `.tmp-step-*` exists when the
fault is sent). "Landed" is checked after the attempt: a signal stopped the run (exit 130 / 143, the stop line), a
SIGKILL of the trainer left it unfinished, a SIGKILL of the server ended it with an error.

Checked after every episode (one run resumed until it finishes):
- synchronous: the final weights (the last checkpoint's safetensors, byte for byte) and every logged number and sample
  row equal the uninterrupted run's (timings aside: `time/*`, `sync/seconds`, `ahead/*`);
- asynchronous (docs/scaling.md, which resumes are exact): each step logged exactly once in metrics.jsonl and
  samples.jsonl, every step's questions those of the uninterrupted run, the steps before the first resumed
  checkpoint equal to it bit for bit, and the first step after each resume sampled by the checkpoint's weights
  (`rollout/staleness` 0): the documented difference, nothing else;
- after every attempt: no process the trainer started still alive (scoring workers, a server and its engine
  processes), and no file of the run's outside its run directory (the working directory, `sdpo*` in the system's
  temporary folder, /dev/shm).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
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
SHORT = ["algorithm=sdpo", "env=arithmetic", "env.score_workers=1", "rollout.num_generations=4",
         "trainer.questions_per_step=2", "trainer.mini_batch_questions=2", "trainer.optim.warmup_steps=0",
         "trainer.save_every=1", "trainer.keep_last=2", "eval.every=0", "logging.progress_bar=false",
         "logging.samples_every=1", "logging.num_samples=2", "trainer.seed=3"]
MODELS = {
    "tiny": ["model=tiny", "model.autocast_dtype=none", "rollout.max_new_tokens=8", "trainer.optim.lr=1e-3",
             "rollout.vllm.dtype=float32"],
    "smollm2": ["model=smollm2", "rollout.max_new_tokens=16"],
}
VLLM = ["rollout.vllm.enforce_eager=true", "rollout.vllm.kv_cache_gb=0.25", "rollout.max_prompt_len=128"]
ENGINES = {
    "hf": ("hf engine, synchronous", ["rollout=hf"]),
    "vllm": ("colocated vllm engine, synchronous", ["rollout=vllm", *VLLM]),
    "server": ("vllm server, async_steps=1", ["rollout=vllm_server", "rollout.async_steps=1", *VLLM]),
}
STEPS = {("tiny", "hf"): 10, ("tiny", "vllm"): 6, ("tiny", "server"): 6}  # SmolLM2: 4 steps (its CPU time)
CASES = {f"{model}-{engine}": (f"{model}, {title}", [*MODELS[model], *SHORT, *args,
                                                    f"trainer.total_steps={STEPS.get((model, engine), 4)}"])
         for model in MODELS for engine, (title, args) in ENGINES.items()}
SYNC_FAULTS = ("SIGINT", "SIGTERM", "SIGINT twice", "SIGKILL trainer")
SERVER_FAULTS = (*SYNC_FAULTS, "SIGKILL server")
STAGES = ("start-up", "generation", "update", "sync", "save")
REPORTED = (*STAGES, "first step")
UNTIMED = ("time/", "sync/seconds", "ahead/")
STRAY_AFTER_S = 30.0  # how long the trainer's processes may take to go after it ended
SHM = Path("/dev/shm")


@dataclass
class Attempt:
    fault: str | None
    aimed: str | None
    stage: str | None
    rc: int | None
    line: str
    seconds: float
    landed: str = "-"  # yes; "last step": a signal asked the run to stop in its last step, which then ended it
    startup_s: float | None = None  # launch to the "run directory" line
    row_times: list[float] = field(default_factory=list)  # seconds from launch at which each new metrics row appeared
    strays: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)


@dataclass
class Timing:
    """The uninterrupted run's timeline: what a fault's aim is computed from."""

    startup_s: float
    stages: dict[str, float]  # mean seconds per step: generation, update, sync
    step_s: float  # mean wall seconds from one metrics row to the next (a step and its save)


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run_dir / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def outside_entries() -> set[str]:
    tmp = {f"{tempfile.gettempdir()}/{p}" for p in os.listdir(tempfile.gettempdir()) if p.startswith("sdpo")}
    return tmp | ({f"{SHM}/{p}" for p in os.listdir(SHM)} if SHM.is_dir() else set())


def stage_times(run_dir: Path) -> dict[str, float]:
    """Mean seconds of the uninterrupted run's step stages, from its metrics rows."""
    got = rows(run_dir)
    mean = lambda key: sum(r.get(key) or 0.0 for r in got) / max(len(got), 1)  # noqa: E731
    return {"generation": mean("time/generate") + mean("time/score") + mean("time/rollout_wait"),
            "update": mean("time/teacher_context") + mean("time/update") + mean("time/teacher_forward"),
            "sync": mean("time/sync")}


def checkpoint_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint (0: none)."""
    steps = [int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*")
             if (p / "COMPLETE").exists()]
    return max(steps, default=0)


class Descendants:
    """The processes the trainer started, seen while it ran (a server and scoring workers have their own session)."""

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
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {cmd}")
            except psutil.Error:
                pass
        return left

    def server(self) -> int | None:
        """The server's main process (the trainer's child running the API server; its engine processes below it)."""
        self.poll()
        try:
            for child in self.root.children():
                if any("api_server" in part for part in child.cmdline()):
                    return child.pid
        except psutil.Error:
            pass
        return None


def attempt(args: list[str], run_dir: Path, cwd: Path, fault: str | None, aimed: str | None, timing: Timing | None,
            rng: random.Random, log_dir: Path, index: int, total: int) -> Attempt:
    before, start = outside_entries(), time.monotonic()
    out, err = log_dir / f"{index:03d}.out", log_dir / f"{index:03d}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, TRAIN, *args, f"trainer.output_dir={run_dir}", "trainer.resume=auto"],
                                cwd=cwd, env=env(), stdout=stdout, stderr=stderr, start_new_session=True)
    tree = Descendants(proc.pid)
    stage = None
    if fault is not None and timing is not None:
        stage = aim(proc, tree, run_dir, out, aimed, timing, rng, total)
        if stage is not None:
            send(proc, tree, fault)
    startup_s, row_times, count = None, [], len(rows(run_dir))
    while proc.poll() is None:
        tree.poll()
        now = time.monotonic() - start
        if startup_s is None and "run directory" in out.read_text():
            startup_s = now
        if len(rows(run_dir)) > count:
            count = len(rows(run_dir))
            row_times.append(now)
        time.sleep(0.05)
        if now > 1800:
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
    leftovers = sorted(outside_entries() - before) + sorted(p.name for p in cwd.iterdir() if p != run_dir.parent)
    got = Attempt(fault if stage else None, aimed if stage else None, stage, proc.returncode,
                  (final[-1] if final else (lines[-1] if lines else ""))[:160], time.monotonic() - start,
                  startup_s=startup_s, row_times=row_times, strays=strays, leftovers=leftovers)
    if stage:
        got.landed = landed(got, checkpoint_step(run_dir) < total, "stopping after the step" in err.read_text())
    return got


def landed(got: Attempt, unfinished: bool, asked: bool) -> str:
    """Whether the fault took effect inside the run (not after its work was done)."""
    if got.fault == "SIGKILL trainer":
        took = unfinished
    elif got.fault == "SIGKILL server":
        took = got.rc != 0
    else:
        took = got.rc in (128 + signal.SIGINT, 128 + signal.SIGTERM)
        if not took and asked and got.rc == 0:
            return "last step"
    return "yes" if took else "-"


def aim(proc: subprocess.Popen, tree: Descendants, run_dir: Path, out: Path, aimed: str, timing: Timing,
        rng: random.Random, total: int) -> str | None:
    """Wait until the aimed point; what it is (None if the run ended first)."""
    def wait(condition, timeout: float = 1200) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            tree.poll()
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    if aimed == "start-up":
        time.sleep(rng.uniform(0.1, 0.95) * timing.startup_s)
        return None if proc.poll() is not None else ("start-up" if "run directory" not in out.read_text()
                                                     else "first step")
    if not wait(lambda: "run directory" in out.read_text()):
        return None
    done = checkpoint_step(run_dir)  # the resumed run takes steps done + 1 .. total
    left = total - done
    if aimed == "save" and left < 2:  # the last step's save ends the run: aim at a step before it
        aimed = "generation"
    # Whole steps to let pass first; never into the last step (a signal there only ends the run as planned), unless
    # it is the only one left.
    ahead = rng.randint(1, left - 1) if aimed == "save" else rng.randint(0, max(left - 2, 0))
    staging = lambda: any((run_dir / "checkpoints").glob(".tmp-*"))  # noqa: E731
    if ahead and not wait(lambda: len(rows(run_dir)) >= done + ahead):
        return None
    if aimed == "save":
        if wait(staging, timeout=2.0):
            return "save"
        aimed = "generation"  # the save was over before it was seen: the next step's generation instead
    if ahead:
        wait(lambda: not staging(), timeout=60)
    gen, update, sync = (timing.stages[k] for k in ("generation", "update", "sync"))
    offset = {"generation": rng.uniform(0.1, 0.9) * gen,
              "update": gen + rng.uniform(0.1, 0.9) * update,
              "sync": gen + update + rng.uniform(0.1, 0.9) * sync}[aimed]
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


def compare(reference: Path, run_dir: Path, total: int, exact: bool, resumed_from: list[int]) -> list[str]:
    """What differs from the uninterrupted run beyond what is documented (empty: nothing)."""
    problems = []
    got, want = rows(run_dir), rows(reference)
    steps = [r["step"] for r in got]
    if steps != list(range(1, total + 1)):
        problems.append(f"metrics steps {steps}")
    samples, samples_want = rows(run_dir, "samples.jsonl"), rows(reference, "samples.jsonl")
    if [r["step"] for r in samples] != [r["step"] for r in samples_want]:
        problems.append(f"samples steps {[r['step'] for r in samples]}")
    if [(r["step"], r["problem"]) for r in samples] != [(r["step"], r["problem"]) for r in samples_want]:
        problems.append("the steps' questions differ")
    timed = lambda r: {k: v for k, v in r.items() if not k.startswith(UNTIMED)}  # noqa: E731
    # Exact up to the first resumed checkpoint (async), or everywhere (synchronous).
    exact_to = total if exact else min([s for s in resumed_from if s > 0], default=total)
    for a, b in zip(got, want):
        if b["step"] <= exact_to and timed(a) != timed(b):
            keys = sorted(k for k in timed(b) if timed(a).get(k) != timed(b).get(k))
            problems.append(f"step {b['step']}: {keys[:4]} differ")
    if exact:
        if (run_dir / "samples.jsonl").read_text() != (reference / "samples.jsonl").read_text():
            problems.append("samples.jsonl differs")
        name = f"step-{total:06d}"
        for file in sorted((reference / "checkpoints" / name).glob("*.safetensors")):
            if file.read_bytes() != (run_dir / "checkpoints" / name / file.name).read_bytes():
                problems.append(f"final weights {file.name} differ")
    else:
        by_step = {r["step"]: r for r in got}
        for step in sorted({s + 1 for s in resumed_from if s + 1 <= total}):
            staleness = by_step.get(step, {}).get("rollout/staleness")
            if staleness != 0.0:
                problems.append(f"step {step}, the first after a resume: rollout/staleness {staleness}, not 0")
    return problems


def run_case(key: str, faults: int, rng: random.Random, work: Path) -> Iterator[dict]:
    """The uninterrupted run, then episodes until `faults` were sent; the result so far after each episode."""
    title, args = CASES[key]
    exact = not key.endswith("-server")
    kinds = SYNC_FAULTS if exact else SERVER_FAULTS
    total = int(next(a for a in args if a.startswith("trainer.total_steps=")).split("=")[1])
    cwd, logs = work / key / "cwd", work / key / "logs"
    shutil.rmtree(work / key, ignore_errors=True)
    (cwd / "runs").mkdir(parents=True)
    logs.mkdir()
    reference = cwd / "runs" / "reference"
    first = attempt(args, reference, cwd, None, None, None, rng, logs, 0, total)
    gaps = [b - a for a, b in zip(first.row_times, first.row_times[1:])]
    timing = Timing(first.startup_s or 5.0, stage_times(reference), sum(gaps) / max(len(gaps), 1))
    result = {"key": key, "title": title, "exact": exact, "timing": timing, "first": first, "episodes": []}
    if first.rc != 0:
        yield result
        return
    plan: list[tuple[str, str]] = []
    sent, index = 0, 1
    while sent < faults:
        run_dir = cwd / "runs" / f"episode-{len(result['episodes']) + 1}"
        attempts: list[Attempt] = []
        resumed_from: list[int] = []
        while (not attempts or attempts[-1].rc != 0) and len(attempts) <= 40:
            if sent < faults and not plan:  # every kind in each round, in a random order, each at a random stage
                plan = [(k, rng.choice(STAGES[1:] if k == "SIGKILL server" else STAGES))
                        for k in rng.sample(kinds, len(kinds))]
            fault, aimed = plan.pop() if sent < faults else (None, None)
            resumed_from.append(checkpoint_step(run_dir))
            got = attempt(args, run_dir, cwd, fault, aimed, timing, rng, logs, index, total)
            index += 1
            attempts.append(got)
            sent += got.fault is not None
        problems = compare(reference, run_dir, total, exact, resumed_from)
        result["episodes"].append((run_dir.name, attempts, problems))
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        yield result
    yield result


def section(result: dict, command: str, seconds: float, final: bool) -> list[str]:
    first, timing, exact = result["first"], result["timing"], result["exact"]
    attempts = [a for _, got, _ in result["episodes"] for a in got]
    faults = [a for a in attempts if a.fault]
    by_kind = {k: sum(a.fault == k for a in faults) for k in SERVER_FAULTS if any(a.fault == k for a in faults)}
    by_stage = {s: sum(a.stage == s for a in faults) for s in REPORTED if any(a.stage == s for a in faults)}
    passed = sum(not problems for _, _, problems in result["episodes"])
    strays = sum(len(a.strays) for a in attempts)
    leftovers = sorted({x for a in attempts for x in a.leftovers})
    lines = [
        f"## {result['title']}",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Command: `{command}` (under `heavy`: no "
        "other heavy command ran meanwhile; other sessions' light commands may have). Wall time "
        f"{seconds / 60:.1f} min" + ("." if final else " so far (the run did not finish)."),
        "",
        (f"The uninterrupted run FAILED: {first.line}. " if first.rc != 0 else "")
        + f"Uninterrupted run: {first.seconds:.1f} s, start-up {timing.startup_s:.1f} s, {timing.step_s:.1f} s a step "
        "(row to row); stage times per step (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timing.stages.items()) + ".",
        "",
        f"- faults: {len(faults)}, {sum(a.landed == 'yes' for a in faults)} of them landed inside the run"
        + (f" ({n} more in the last step: the stop it asked for was the run's end)"
           if (n := sum(a.landed == "last step" for a in faults)) else "") + " "
        f"({', '.join(f'{k} {v}' for k, v in by_kind.items())}); by stage: "
        f"{', '.join(f'{k} {v}' for k, v in by_stage.items())}",
        f"- episodes: {len(result['episodes'])}, {passed} of them "
        + ("equal to the uninterrupted run bit for bit (final weights, every logged number, every sample row)" if exact
           else "with every step logged exactly once, the same questions, and no difference but the documented one"),
        f"- attempts: {len(attempts)}; stray processes: {strays}; leftover files: {len(leftovers)}"
        + (f" ({', '.join(leftovers)})" if leftovers else ""),
        "",
        "| episode | attempt | fault | stage | landed | exit | s | what the terminal's last line said |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, got, problems in result["episodes"]:
        for i, a in enumerate(got, 1):
            said = a.line.replace("|", "\\|")
            lines.append(f"| {name} | {i} | {a.fault or '-'} | {a.stage or '-'} | {a.landed} | "
                         f"{a.rc} | {a.seconds:.1f} | {said} |")
        if problems:
            lines.append(f"| {name} | differs | | | | | | {'; '.join(problems)[:300]} |")
    return [*lines, ""]


def write_report(out: Path, result: dict, command: str, seconds: float, final: bool) -> None:
    """Replace this case's section of the results file, keeping the other cases' and the notes."""
    header = [
        "# Fault injection: interrupted runs resumed until done, against the same run uninterrupted",
        "",
        f"Machine: {describe_machine()}. Method: benchmarks/faults_cpu.py's docstring (one case a command).",
        "",
    ]
    sections: dict[str, list[str]] = {}
    if out.exists():
        current = None
        for line in out.read_text().splitlines():
            if line.startswith("## "):
                current = line[3:]
                sections[current] = []
            if current is not None:
                sections[current].append(line)
    sections[result["title"]] = section(result, command, seconds, final)
    notes = sections.pop("Notes", None)
    order = [title for title, _ in CASES.values() if title in sections]
    body = [line for title in order for line in sections[title]]
    out.write_text("\n".join([*header, *body, *(notes or [])]).rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--faults", type=int, default=8, help="faults to send (whole episodes: a few more may go)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "faults_cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args()
    command = f"python benchmarks/faults_cpu.py --case {opts.case} --faults {opts.faults} --seed {opts.seed}"
    started = time.monotonic()
    result = None
    for result in run_case(opts.case, opts.faults, random.Random(opts.seed), opts.work):
        write_report(opts.out, result, command, time.monotonic() - started, final=False)  # a later failure keeps it
    assert result is not None
    write_report(opts.out, result, command, time.monotonic() - started, final=True)
    print("\n".join(section(result, command, time.monotonic() - started, True)))


if __name__ == "__main__":
    main()
