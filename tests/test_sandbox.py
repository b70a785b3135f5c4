"""Hostile programs, run only inside the bubblewrap sandbox (issue #4); the process-tree kill in every mode (#11).

Each program is a stdin problem whose expected output is what a successful escape would print, so containment
shows as reward 0 with the matching feedback. Every test also checks: finished within the time limit plus a
margin, no process left behind, nothing written outside, and the next program still scores normally.

These tests never run hostile code bare: if bwrap is missing they FAIL (install: apt-get install -y bubblewrap).
The one test that also runs in the weaker process mode runs a harmless program (a detached `sleep`).
"""

from __future__ import annotations

import os
from pathlib import Path
import socket
import threading
import time
import uuid

import pytest

from sdpo.envs.base import Problem
from sdpo.envs.code.codecontests import CodeContestsConfig, CodeContestsEnv
from sdpo.envs.code.sandbox import bwrap_problem

TIME_LIMIT_S = 2.0
MARGIN_S = 1.5  # sandbox start and teardown on a loaded 2-core machine


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="module")
def env(scratch) -> CodeContestsEnv:
    problem = bwrap_problem()
    if problem is not None:
        pytest.fail(f"bubblewrap is required for the hostile-program tests and does not work here: {problem}")
    config = CodeContestsConfig(sandbox="bwrap", time_limit_s=TIME_LIMIT_S, memory_mb=256, sandbox_scratch_dir=str(scratch))
    return CodeContestsEnv(config)


def stdin_problem(expected: str, test_input: str = "") -> Problem:
    data = {"mode": "stdin", "tests": [{"input": test_input, "output": expected}], "total_tests": 1}
    return Problem(id="hostile", messages=[{"role": "user", "content": "?"}], data=data)


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def left_after_a_moment(marker: str) -> list[int]:
    """Processes with `marker` still there after up to a second (a kill is not instant)."""
    deadline = time.monotonic() + 1.0
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return processes_with(marker)


def sandbox_dirs(env: CodeContestsEnv) -> set[str]:
    return {p.name for p in Path(env.config.sandbox_scratch_dir).iterdir()}


def run_hostile(env: CodeContestsEnv, program: str, expected: str = "ESCAPED", marker: str | None = None):
    """Score the program, check the common guarantees, return the Score."""
    before = sandbox_dirs(env)
    start = time.monotonic()
    score = env.score_program(stdin_problem(expected), program)
    elapsed = time.monotonic() - start
    assert score.reward == 0.0, score
    assert score.feedback, score
    assert elapsed <= TIME_LIMIT_S + MARGIN_S, f"took {elapsed:.2f} s"
    if marker is not None:
        assert left_after_a_moment(marker) == [], "a process of the program outlived it"
    assert sandbox_dirs(env) - before == set(), "scratch directories left behind"
    after = env.score_program(stdin_problem("3", "1 2"), "print(sum(map(int, input().split())))")
    assert after.reward == 1.0, f"the next program did not score normally: {after}"
    return score


def test_infinite_loop(env):
    score = run_hostile(env, "while True:\n    pass\n")
    assert score.feedback.startswith("Time Limit Exceeded") and score.info["status"] == "time_limit"


def test_sleep(env):
    score = run_hostile(env, "import time\ntime.sleep(1000)\nprint('ESCAPED')\n")
    assert score.feedback.startswith("Time Limit Exceeded")


def test_memory_bomb(env):
    program = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n"
    score = run_hostile(env, program)
    assert score.feedback.startswith("Memory Limit Exceeded") and "MemoryError" in score.feedback


def test_fork_bomb(env):
    marker = f"sdpo-forkbomb-{uuid.uuid4().hex}"
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    program = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {bomb!r}, {marker!r}])\n"
    score = run_hostile(env, program, marker=marker)
    assert score.info["status"] in ("time_limit", "runtime_error")


def test_huge_stdout(env):
    score = run_hostile(env, "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n")
    assert score.feedback.startswith("Output Limit Exceeded")


def test_writes_and_reads_outside_scratch(env, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o777)  # only the sandbox, not file permissions, protects this folder
    canary = outside / "canary"
    canary.write_text("keep me")
    canary.chmod(0o666)
    program = f"""
import os, shutil
escaped = []
for attempt in (
    lambda: open({str(outside / 'pwned')!r}, 'w').write('x'),
    lambda: os.remove({str(canary)!r}),
    lambda: shutil.rmtree(os.path.dirname(os.getcwd())),
    lambda: open({str(Path(__file__).resolve())!r}).read(),
    lambda: open('/etc/hostname').read(),
):
    try:
        attempt()
        escaped.append(True)
    except Exception:
        pass
open('scratch-file', 'w').write('fine')  # the scratch directory itself is writable
print('ESCAPED' if escaped else 'contained')
"""
    score = run_hostile(env, program)
    assert score.info["status"] == "wrong_answer" and "contained" in score.feedback
    assert canary.read_text() == "keep me"
    assert list(outside.iterdir()) == [canary]
    assert Path(__file__).exists()


def test_trainer_environment_is_hidden(env, monkeypatch):
    secret = f"sdpo-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("SDPO_TRAINER_SECRET", secret)
    program = """
import os
found = [os.environ.get('SDPO_TRAINER_SECRET', '')]
for pid in os.listdir('/proc'):
    try:
        found.append(open(f'/proc/{pid}/environ').read())
    except Exception:
        pass
print(''.join(found))
"""
    score = run_hostile(env, program, expected=secret)
    shown_output = score.feedback.split("\nExpected\n")[0]  # Expected is the secret itself
    assert score.info["status"] == "wrong_answer" and secret not in shown_output


def test_network_is_unreachable(env):
    token = f"HELLO-{uuid.uuid4().hex}"
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.settimeout(10)

    def serve():
        try:
            conn, _ = server.accept()
            conn.sendall(token.encode())
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    program = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint(s.recv(100).decode())\n"
    try:
        score = run_hostile(env, program, expected=token)
    finally:
        server.close()
    assert score.info["status"] == "runtime_error"
    assert "Error" in score.feedback and token not in score.feedback


def test_killing_its_parent(env):
    # Through the process pool, so that the program's parents include the scoring worker.
    program = "import os, signal, time\nfor pid in (os.getppid(), -1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\ntime.sleep(1000)\n"
    start = time.monotonic()
    [score] = env.score_batch([stdin_problem("ESCAPED")], [f"```python\n{program}```"], [False])
    assert time.monotonic() - start <= TIME_LIMIT_S + MARGIN_S + 5.0  # + worker start-up
    # It can only reach processes inside its sandbox (it may kill the in-sandbox test harness: a runtime error).
    assert score.reward == 0.0 and score.info["status"] in ("time_limit", "runtime_error"), score
    assert score.info["status"] != "scorer_error"  # the scoring worker, outside the sandbox, survived
    [again] = env.score_batch([stdin_problem("3", "1 2")], ["```python\nprint(sum(map(int, input().split())))\n```"], [False])
    assert again.reward == 1.0


def test_child_that_outlives_it(env):
    marker = f"sdpo-orphan-{uuid.uuid4().hex}"
    program = f"""
import os, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])
    os._exit(0)
print('parent done')
"""
    score = run_hostile(env, program, marker=marker)
    assert score.info["status"] == "wrong_answer"


# -- every isolation mode kills the whole process tree (issue #11) ---------------------------------------------

# A shell starts a shell in a session (so a process group) of its own and exits: the second shell is re-parented.
# The program prints "started" only once that shell runs, so a pass proves there was something to kill.
DETACHED_CHILD = """
import os, subprocess
daemon = "setsid sh -c 'echo $$; while :; do sleep 1; done' {marker} &"
shell = subprocess.Popen(["sh", "-c", daemon], stdout=subprocess.PIPE, text=True)
pid = int(shell.stdout.readline())  # the detached shell keeps the pipe open: read its line, not to the end
shell.wait()
detached = os.getsid(pid) != os.getsid(0) and b"{marker}" in open(f"/proc/{{pid}}/cmdline", "rb").read()
print("started" if detached else "no")
"""


def detached_runs(marker: str) -> list[tuple[str, Problem, str, str]]:
    """(what, problem, program, status): ends normally / stopped by the harness's per-test limit, both test kinds."""
    program = DETACHED_CHILD.format(marker=marker)
    as_call = program.replace('print("started"', 'RESULT = ("started"') + "\ndef f():\n    return RESULT\n"
    call = Problem(id="call", messages=[], data={"mode": "call", "tests": [{"args": [], "expected_value": "started"}],
                                                 "total_tests": 1, "func_name": "f"})
    return [
        ("stdin", stdin_problem("started"), program, "passed"),
        ("stdin, loops", stdin_problem("started"), program + "while True:\n    pass\n", "time_limit"),
        ("call", call, as_call, "passed"),
    ]


@pytest.mark.parametrize("mode", ["bwrap", "process", "process-unprivileged"])
@pytest.mark.slow
def test_a_detached_process_tree_dies_in_every_mode(mode, monkeypatch):
    from sdpo.envs.code import sandbox as sandbox_module

    if mode == "bwrap" and bwrap_problem() is not None:
        pytest.fail(f"bubblewrap does not work here: {bwrap_problem()}")
    if mode == "process" and os.geteuid() != 0:
        pytest.skip("the uid drop of the process sandbox needs root")
    if mode == "process-unprivileged":  # no uid of its own to kill: the launcher's subreaper alone must do it
        monkeypatch.setattr(sandbox_module.os, "geteuid", lambda: 1000)
    isolation = mode.split("-")[0]
    env = CodeContestsEnv(CodeContestsConfig(sandbox=isolation, time_limit_s=TIME_LIMIT_S))
    marker = f"sdpo-detached-{uuid.uuid4().hex}"
    runs = detached_runs(marker)
    if mode == "process-unprivileged":  # the harness cannot stop this one: the sandbox's deadline does (SIGTERM)
        what, problem, program, _ = runs[-1]
        deaf = "import signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])\n" + program
        runs.append(("call, deaf to the harness's timer", problem, deaf + "while True:\n    pass\n", "time_limit"))
    for what, problem, program, status in runs:
        score = env.score_program(problem, program)
        assert score.info["status"] == status and score.info["isolation"] == isolation, (what, score)
        assert left_after_a_moment(marker) == [], f"{mode}, {what}: a detached process outlived the program"
