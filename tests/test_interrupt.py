"""A signal stops a run cleanly (sdpo/interrupt.py): the step in progress finishes, its checkpoint is written, one
line says where the run stopped and the command that continues it, and that command continues it to the same
result, each step logged once. A signal during a save never costs the previous checkpoint."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import json
import os
from pathlib import Path
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from sdpo import checkpoint as ckpt
from sdpo.interrupt import StopNow, StopRequests, raise_at_once, signals_deferred
from sdpo.resume import continue_command, drop_rows_after, finished_message

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "scripts" / "train.py")
# The tiny model on the transformers engine, 2 questions x 2 samples of 4 tokens a step.
RUN = ["model=tiny", "algorithm=sdpo", "rollout=hf", "env=arithmetic", "env.score_workers=1",
       "model.autocast_dtype=none", "rollout.num_generations=2", "rollout.max_new_tokens=4",
       "trainer.questions_per_step=2", "trainer.mini_batch_questions=2", "trainer.optim.warmup_steps=0",
       "trainer.optim.lr=1e-3", "eval.every=0", "logging.progress_bar=false", "logging.samples_every=1",
       "logging.num_samples=2"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, TRAIN, *RUN, *args], cwd=cwd, env=env or ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def logged_steps(run_dir: Path, name: str = "metrics.jsonl") -> list[int]:
    path = run_dir / name
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_sigint_stops_after_the_step_and_its_checkpoint_and_the_printed_command_continues_it(tmp_path):
    straight = subprocess.run([sys.executable, TRAIN, *RUN, "trainer.total_steps=6",
                               f"trainer.output_dir={tmp_path / 'straight'}"], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "run"
    proc = start("trainer.total_steps=6", f"trainer.output_dir={run_dir}", cwd=tmp_path)
    wait_for(lambda: 2 in logged_steps(run_dir), proc, "step 2")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    stopped = re.fullmatch(r"stopped by SIGINT after step (\d) of 6 \(checkpoint (\S+)\); continue with: (.*)", last)
    assert stopped, last
    step = int(stopped[1])
    assert 2 <= step < 6 and stopped[2] == str(run_dir / "checkpoints" / f"step-{step:06d}")
    assert [p.name for p in ckpt.checkpoint_dirs(run_dir / "checkpoints")] == [f"step-{step:06d}"]
    command = shlex.split(stopped[3])
    assert command[:2] == ["python", TRAIN] and command[-2:] == [f"trainer.output_dir={run_dir}", "trainer.resume=auto"]

    resumed = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert logged_steps(run_dir, "samples.jsonl") == [s for s in range(1, 7) for _ in range(2)]
    # Synchronous and seeded: the interrupted run logs what the straight one does, bit for bit.
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 6
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time/", "sync/seconds", "score_s"))}  # noqa: E731
                          for r in rows]
    read = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(read(run_dir)) == strip(read(tmp_path / "straight"))
    assert (run_dir / "samples.jsonl").read_text() == (tmp_path / "straight" / "samples.jsonl").read_text()

    # Finished: the same command exits at once, saying so.
    again = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and again.stderr == "", again.stderr[-3000:]
    assert again.stdout.strip() == (f"run {run_dir} is finished: its checkpoint {run_dir / 'checkpoints' / 'step-000006'}"
                                    " holds step 6 of trainer.total_steps=6; nothing to do (raise trainer.total_steps "
                                    "to train further)")


@pytest.mark.parametrize("signals", [1, 2], ids=["one-signal-finishes-the-save", "second-signal-stops-at-once"])
def test_a_signal_during_a_save_keeps_the_previous_checkpoint(tmp_path, signals):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    proc = start("trainer.total_steps=4", "trainer.save_every=1", f"trainer.output_dir={run_dir}", cwd=tmp_path,
                 env={**ENV, ckpt.PAUSE_ENV: "2"})
    staging = ckpt.staging_dir(root, 2)
    wait_for(lambda: (staging / "PAUSED").exists(), proc, "the save of step 2")
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
    if signals == 1:
        time.sleep(1.0)
        assert proc.poll() is None, "one signal lets the save finish"
        assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-000001"]
        (staging / "CONTINUE").touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    command = continue_command(run_dir).removeprefix("continue with: ")
    if signals == 1:
        assert last.startswith(f"stopped by SIGINT after step 2 of 4 (checkpoint {root / 'step-000002'}); ")
        assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-000001", "step-000002"]
        assert not staging.exists()
    else:
        assert last.startswith(f"stopped at once by SIGINT; the newest checkpoint is {root / 'step-000001'}: "
                               "continue with: python "), last
        assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-000001"]
        assert ckpt.load_trainer_state(root / "step-000001")["step"] == 1
    assert last.endswith(f"trainer.output_dir={run_dir} trainer.resume=auto") and command


def test_resume_drops_log_rows_past_the_checkpoint(tmp_path):
    rows = [{"step": s, "reward/mean": s / 10} for s in (0, 1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew')
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"step": s, "response": "x"}) + "\n" for s in (1, 2, 3)))
    assert drop_rows_after(tmp_path, 2) == 1 + 1 + 1  # steps 3 and the torn row; step 3's sample
    assert logged_steps(tmp_path) == [0, 1, 2] and logged_steps(tmp_path, "samples.jsonl") == [1, 2]
    assert drop_rows_after(tmp_path, 2) == 0
    assert drop_rows_after(tmp_path, -1) == 3 + 2  # a fresh start: nothing of the earlier attempt
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_finished_message_only_for_a_checkpoint_at_total_steps(tmp_path):
    step = tmp_path / "checkpoints" / "step-000003"
    step.mkdir(parents=True)
    assert finished_message(tmp_path, "auto", 3) is None  # no marker: not a checkpoint
    (step / ckpt.COMPLETE).write_text("3")
    assert finished_message(tmp_path, "none", 3) is None
    assert finished_message(tmp_path, "auto", 4) is None
    assert finished_message(tmp_path, "auto", 3).startswith(f"run {tmp_path} is finished: its checkpoint {step} holds")
    assert finished_message(tmp_path, str(step), 2) is not None


def test_signals_deferred_holds_a_signal_back_while_other_threads_run():
    # A trainer always has other threads (request pools, the rollouts ahead, torch's): the kernel hands a signal that
    # the main thread blocks to one of them (here, for certain, to the other thread), and Python then runs the
    # handler in the main thread, often inside the block. Twenty tries: each must hold the signal back to the end.
    other = threading.Event()
    thread = threading.Thread(target=other.wait, daemon=True)
    thread.start()
    previous = signal.signal(signal.SIGTERM, raise_at_once)
    try:
        for _ in range(20):
            inside_done = False
            with pytest.raises(StopNow):
                with signals_deferred():
                    signal.pthread_kill(thread.ident, signal.SIGTERM)
                    deadline = time.monotonic() + 0.05
                    while time.monotonic() < deadline:  # bytecodes: where Python runs a pending handler
                        pass
                    inside_done = True
            assert inside_done
    finally:
        signal.signal(signal.SIGTERM, previous)
        other.set()


def silent_weight_server(receive_first: int) -> tuple[ThreadingHTTPServer, threading.Event]:
    """The endpoints of a vLLM server that ServerEngine uses, its one worker joining the weight-sync group for
    real (`WeightReceiver`) and receiving the first `receive_first` syncs; later syncs it never takes part in (a
    server hung, or killed with its engine process left behind) until the returned event is set."""
    from sdpo.rollout.weight_group import WeightReceiver, receive_buckets

    worker, release, syncs = WeightReceiver(), threading.Event(), []
    worker.rank = 0

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.reply({"data": [{"id": "silent"}]} if self.path == "/v1/models" else {})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            method = body.get("method") if self.path == "/collective_rpc" else None
            if method == "sdpo_rank":
                self.reply({"results": [0]})
            elif method == "sdpo_join":
                worker.sdpo_join(*body["args"])
                self.reply({"results": [None]})
            elif method == "sdpo_receive":
                syncs.append(1)
                if len(syncs) <= receive_first:
                    self.reply({"results": [sum(1 for _ in receive_buckets(worker._sdpo_group, torch.device("cpu")))]})
                else:
                    release.wait()
                    self.reply({"results": [0]})
            else:
                self.reply({})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, release


def test_two_sigterms_during_a_weight_sync_that_never_ends_stop_the_trainer_at_once(tiny_path):
    # A weight sync whose peer never takes part (a killed server's engine process lives on and holds the group) waits
    # up to rollout.server.request_timeout_s. Waited in the main thread, in the group's native code, it held off
    # the trainer's signal handlers as long: a trainer ignored two SIGTERMs. The first one now asks for the stop
    # after the step (the wait goes on: the server may yet take part), the second stops at once.
    from transformers import AutoModelForCausalLM

    from sdpo.config import RolloutConfig, ServerConfig, VLLMConfig
    from sdpo.rollout.server import ServerEngine

    timeout_s = 30.0
    server, release = silent_weight_server(receive_first=1)
    config = RolloutConfig(engine="vllm_server", max_prompt_len=16, max_new_tokens=4,
                           vllm=VLLMConfig(dtype="float32", sync_bucket_mb=1),
                           server=ServerConfig(url=f"http://127.0.0.1:{server.server_port}", request_timeout_s=timeout_s))
    engine = ServerEngine(tiny_path, None, config)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    previous = signal.signal(signal.SIGTERM, raise_at_once)  # as the scripts install it (sdpo/cli.py)
    timers = [threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)) for delay in (1.0, 2.0)]
    try:
        engine.sync_weights(model, version=0)  # the group forms, the first sync goes through
        with StopRequests() as stop:  # the training loop's handler
            start = time.monotonic()
            for timer in timers:
                timer.start()
            with pytest.raises(StopNow):
                engine.sync_weights(model, version=1)
            waited = time.monotonic() - start
        assert stop.requested == signal.SIGTERM
        assert 2.0 <= waited < 10.0 < timeout_s, f"the second SIGTERM took {waited:.1f} s to stop the sync"
    finally:
        signal.signal(signal.SIGTERM, previous)
        for timer in timers:
            timer.cancel()
        release.set()
        engine.close()
        server.shutdown()


def test_a_dead_servers_engine_processes_and_shared_memory_go_as_soon_as_its_end_is_seen(tmp_path):
    # vLLM's engine process outlives a server killed with SIGKILL, holding the weight-sync peer and the listening
    # socket (whatever waits on either would wait until rollout.server.request_timeout_s), and shared memory in
    # /dev/shm that nothing removes once its processes are killed.
    from sdpo.rollout.server import ServerProcess

    started = tmp_path / "engine.started"
    (tmp_path / "engine.py").write_text(
        "import os, time\nfrom multiprocessing import shared_memory\n"
        "queue = shared_memory.SharedMemory(create=True, size=4096)\n"
        f"open({str(started)!r}, 'w').write(f'{{os.getpid()}} {{queue.name}}')\ntime.sleep(600)\n")
    (tmp_path / "server.py").write_text(
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, {str(tmp_path / 'engine.py')!r}])\n"
        "time.sleep(600)\n")
    server = ServerProcess([sys.executable, str(tmp_path / "server.py")], {}, log_dir=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() or not started.read_text():
            assert time.monotonic() < deadline, "the fake server did not start its engine process"
            time.sleep(0.05)
        pid, name = started.read_text().split()
        engine, shm = psutil.Process(int(pid)), Path("/dev/shm") / name
        assert server.exited() is None and shm.exists()
        server.process.kill()
        server.process.wait()
        time.sleep(0.5)
        assert engine.is_running() and engine.status() != psutil.STATUS_ZOMBIE  # it outlives the server
        assert server.exited().startswith("the server process was killed by SIGKILL")
        engine.wait(timeout=10)  # gone at once, before anything stops the server
        assert not shm.exists()
    finally:
        server.stop()


def test_a_killed_servers_semaphores_go_with_its_resource_tracker(tmp_path):
    # A semaphore of the killed server's own (vLLM's server makes them with the spawn context) is mapped by no live
    # process; only the resource tracker knows its name, and it unlinks it once the engine process that shares its
    # pipe is gone, unless it is killed with them.
    from sdpo.rollout.server import ServerProcess

    started = tmp_path / "server.started"
    (tmp_path / "server.py").write_text(
        "import multiprocessing, time\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    lock = ctx.Lock()\n"
        "    engine = ctx.Process(target=time.sleep, args=(600,))\n"
        "    engine.start()\n"
        f"    open({str(started)!r}, 'w').write(f'{{engine.pid}} {{lock._semlock.name}}')\n"
        "    time.sleep(600)\n")
    server = ServerProcess([sys.executable, str(tmp_path / "server.py")], {}, log_dir=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() or not started.read_text():
            assert time.monotonic() < deadline, "the fake server did not start its engine process"
            time.sleep(0.05)
        pid, name = started.read_text().split()
        engine, semaphore = psutil.Process(int(pid)), Path("/dev/shm") / f"sem.{name.lstrip('/')}"
        assert semaphore.exists()
        server.process.kill()
        server.process.wait()
        assert server.exited().startswith("the server process was killed by SIGKILL")
        engine.wait(timeout=10)
        assert not semaphore.exists()
    finally:
        server.stop()
