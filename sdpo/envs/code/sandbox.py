"""Run untrusted Python in a throw-away sandbox and report what happened.

Every run gets its own processes, its own scratch directory and these limits (see `SandboxLimits`): wall time
(enforced here), CPU time, address space, processes, open files, file size, and a cap on captured stdout (a
program that prints more is killed) and stderr (the tail is kept: that is where the traceback is). The program
never sees the trainer's environment variables. When it ends or times out, everything it started dies with it.

The program's directory also holds the judge's libraries (`JUDGE_PACKAGES`: what LeetCode provides beyond the
standard library, `sortedcontainers`), copied from the trainer's environment, where sdpo's dependencies put them:
the sandbox's interpreter sees the same version in every isolation mode, whatever that interpreter has installed.

Two isolation levels (docs/environments.md has the full guarantee list):

- `bwrap` (bubblewrap, preferred): a read-only view of /usr and the interpreter only, a private size-limited
  tmpfs as the working directory and /tmp, new PID / network / IPC / UTS namespaces (no network at all), and
  `--die-with-parent`. When the program's first process exits, the PID namespace goes away and the kernel kills
  every process left in it, including daemonised grandchildren.
- `process` (fallback where bwrap is missing or cannot create namespaces): a plain child process in its own
  session with the same rlimits. It shares the host filesystem (subject to Unix permissions), the network and the
  PID namespace. Weaker, and said so in a warning.

In both, the launcher stays behind as the run's reaper (PR_SET_CHILD_SUBREAPER): orphans of the program's tree are
re-parented to it, and it kills them all when the program ends or the supervisor's deadline passes (launcher.py).

As root, the launcher drops to a random unprivileged uid after setting the limits: root ignores RLIMIT_NPROC, and
a random uid per run means concurrent sandboxes do not share one process budget or signal each other.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import lru_cache
import importlib.util
import json
import logging
import math
import os
from pathlib import Path
import py_compile
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

log = logging.getLogger(__name__)

ISOLATIONS = ("auto", "bwrap", "process")
_LAUNCHER = Path(__file__).with_name("launcher.py")
_SANDBOX_CODE_DIR = "/code"  # read-only, holds the program (bwrap view)
_SANDBOX_WORK_DIR = "/sandbox"  # writable tmpfs, the working directory (bwrap view)
_UID_RANGE = (200_000, 2_000_000_000)  # unprivileged uids that no account uses
_MIB = 1 << 20
_DRAIN_S = 0.5  # after the program exits, how long its pipes may stay open before we stop reading
_REAP_S = 1.0  # after the deadline, how long the launcher may take to kill the program's tree before SIGKILL
# Importable by every program, next to it in the sandbox (sys.path[0]); declared in pyproject.toml.
JUDGE_PACKAGES = ("sortedcontainers",)


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot run on this machine (the message says how to fix it)."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 6.0
    cpu_s: float | None = None  # None: wall_s + 1 (a CPU-bound loop is caught by either limit)
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    processes: int = 32  # processes and threads of the sandbox uid (RLIMIT_NPROC)
    open_files: int = 64
    file_size_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE)
    scratch_mb: int = 64  # size of the writable tmpfs (bwrap only)
    stdout_bytes: int = 8 * _MIB  # more output than this kills the program ("output_limit")
    stderr_bytes: int = 64 * 1024  # the tail that is kept

    def launcher_json(self, uid: int | None) -> str:
        cpu = self.cpu_s if self.cpu_s is not None else self.wall_s + 1
        return json.dumps(
            {
                "cpu_s": max(1, math.ceil(cpu)),
                "memory_bytes": self.memory_mb * _MIB,
                "file_size_bytes": self.file_size_mb * _MIB,
                "open_files": self.open_files,
                "processes": self.processes,
                "uid": uid,
            }
        )


@dataclass
class RunResult:
    # "ok" (exit 0), "error" (non-zero exit or signal), "timeout" (wall or CPU limit), "memory" (MemoryError),
    # "output_limit" (stdout cap exceeded).
    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    wall_s: float
    detail: str = ""  # e.g. "killed by signal SIGSEGV"


_BWRAP_PROBES: dict[str, str | None] = {}  # bwrap path -> error text (None: works); one probe per process


class Sandbox:
    """Runs `python <main>` over a set of files; one fresh sandbox per `run` call. Picklable (only settings)."""

    def __init__(self, isolation: str = "auto", python: str | None = None, scratch_root: str | None = None) -> None:
        if isolation not in ISOLATIONS:
            raise ValueError(f"sandbox isolation {isolation!r} is not one of {ISOLATIONS}")
        self.requested = isolation
        # The trainer's *base* interpreter, symlinks resolved: a virtualenv (its python is a symlink, its packages
        # a folder the sandbox does not mount) is not visible inside.
        self.python = str(Path(python or getattr(sys, "_base_executable", None) or sys.executable).resolve())
        self.scratch_root = scratch_root
        self._isolation: str | None = None

    # -------------------------------------------------------------------------------------------------------------

    @property
    def isolation(self) -> str:
        """The level actually used: "bwrap" or "process" (resolved and probed on first use)."""
        if self._isolation is None:
            self._isolation = self._resolve()
        return self._isolation

    def _resolve(self) -> str:
        if self.requested != "process":
            error = bwrap_problem(self.python)
            if error is None:
                return "bwrap"
            if self.requested == "bwrap":
                raise SandboxUnavailable(f"env.sandbox=bwrap cannot run here ({error}): fix bubblewrap or "
                                         "env.sandbox_python, or set env.sandbox=auto (the weaker process sandbox "
                                         "where bubblewrap fails)")
            log.warning("bubblewrap unavailable (%s); falling back to the weaker process sandbox", error)
        if os.geteuid() == 0 and not _reachable_by_others(self.python):
            # The dropped uid cannot run an interpreter under e.g. /root (mode 0700); the system one it can.
            system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
            if system is None or not _reachable_by_others(system):
                raise SandboxUnavailable(f"{self.python} is not readable by an unprivileged user; set the sandbox python")
            log.warning("process sandbox: %s is private to root; running programs with %s", self.python, system)
            self.python = str(Path(system).resolve())
        return "process"

    def run(self, files: dict[str, str], main: str, stdin: str | bytes = b"", limits: SandboxLimits = SandboxLimits()) -> RunResult:
        isolation = self.isolation
        stage = Path(tempfile.mkdtemp(prefix="sdpo-sandbox-", dir=self.scratch_root))
        try:
            stage.chmod(0o711)  # the dropped uid may enter, not list
            code_dir = stage / "code"
            code_dir.mkdir()
            run_files = {name: text.encode() for name, text in {**files, "launcher.py": _LAUNCHER.read_text()}.items()}
            for name, data in {**judge_library(), **run_files}.items():
                path = code_dir / name
                for parent in reversed(path.relative_to(code_dir).parents[:-1]):
                    (code_dir / parent).mkdir(mode=0o755, exist_ok=True)
                path.write_bytes(data)
                path.chmod(0o644)
            code_dir.chmod(0o755)
            uid = random.randint(*_UID_RANGE) if os.geteuid() == 0 else None
            if isolation == "bwrap":
                argv = self._bwrap_argv(code_dir, main, limits, uid)
                cwd = None
            else:
                work = stage / "work"
                work.mkdir()
                if uid is not None:
                    os.chown(work, uid, uid)
                argv = self._python_argv(str(code_dir), main, limits, uid)
                cwd = str(work)
            data = stdin.encode() if isinstance(stdin, str) else stdin
            result = _supervise(argv, cwd, data, limits)
            # Tracebacks name "solution.py", not a path that differs between isolation levels or shows the host's.
            inside = _SANDBOX_CODE_DIR if isolation == "bwrap" else str(code_dir)
            result.stderr = hide_host_paths(result.stderr, {inside: "", cwd or _SANDBOX_WORK_DIR: "", str(stage): "",
                                                            str(Path(self.python).parent.parent): "<python>"})
            return result
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    # -------------------------------------------------------------------------------------------------------------

    def _python_argv(self, code_dir: str, main: str, limits: SandboxLimits, uid: int | None) -> list[str]:
        launcher = [self.python, "-I", "-S", f"{code_dir}/launcher.py", limits.launcher_json(uid)]
        # Not -I: the environment is entirely ours, and -I would ignore PYTHONHASHSEED (see _HOST_ENV).
        return [*launcher, self.python, "-s", f"{code_dir}/{main}"]

    def _bwrap_argv(self, code_dir: Path, main: str, limits: SandboxLimits, uid: int | None) -> list[str]:
        argv = [shutil.which("bwrap") or "bwrap", *_bwrap_base_args(self.python)]
        scratch = str(limits.scratch_mb * _MIB)
        argv += ["--size", scratch, "--perms", "1777", "--tmpfs", _SANDBOX_WORK_DIR]
        argv += ["--size", scratch, "--perms", "1777", "--tmpfs", "/tmp"]
        argv += ["--ro-bind", str(code_dir), _SANDBOX_CODE_DIR, "--chdir", _SANDBOX_WORK_DIR]
        argv += ["--setenv", "HOME", _SANDBOX_WORK_DIR, "--setenv", "TMPDIR", "/tmp"]
        if uid is not None:  # privileged bwrap: the launcher needs these two to drop to `uid`, then has none
            argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        return [*argv, "--", *self._python_argv(_SANDBOX_CODE_DIR, main, limits, uid)]


def hide_host_paths(text: str, labels: dict[str, str]) -> str:
    """`text` with each path prefix in `labels` (longest first) replaced by its label ("" makes it relative)."""
    for prefix in sorted(labels, key=len, reverse=True):
        text = text.replace(prefix.rstrip("/") + "/", labels[prefix] + "/" if labels[prefix] else "")
    return text


@lru_cache(maxsize=1)
def judge_library() -> dict[str, bytes]:
    """The files of `JUDGE_PACKAGES` (relative path -> bytes), with unchecked-hash bytecode: no compile per run."""
    files = {}
    for package in JUDGE_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SandboxUnavailable(
                f"the judge's library {package!r} is not installed in the trainer's environment; it is a dependency "
                f"of sdpo: pip install {package} (pinned in constraints-cpu.txt)"
            )
        root = Path(next(iter(spec.submodule_search_locations)))
        for source in sorted(root.rglob("*.py")):
            name = source.relative_to(root.parent)
            files[str(name)] = source.read_bytes()
            with tempfile.TemporaryDirectory() as tmp:
                compiled = py_compile.compile(
                    str(source), cfile=f"{tmp}/c.pyc", dfile=str(name), doraise=True,
                    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
                )
                cache = Path(importlib.util.cache_from_source(str(name)))
                files[str(cache)] = Path(compiled).read_bytes()
    return files


def _bwrap_base_args(python: str) -> list[str]:
    """Namespaces, environment and the read-only system view shared by the probe and real runs."""
    args = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() != 0:
        args.append("--unshare-user")  # unprivileged bwrap needs a user namespace
    args += ["--die-with-parent", "--new-session", "--clearenv"]
    for name, value in _HOST_ENV.items():
        args += ["--setenv", name, value]
    args += ["--proc", "/proc", "--dev", "/dev", "--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        host = Path("/") / top
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            args += ["--ro-bind", str(host), str(host)]
    for path in _interpreter_dirs(python):
        # bwrap creates missing parents with mode 0700 as root; make them traversable for the dropped uid.
        for parent in reversed(path.parents[:-1]):
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", str(path), str(path)]
    return args


def _interpreter_dirs(python: str) -> list[Path]:
    """The interpreter's installation prefix when it lives outside /usr (pyenv, conda, ...), mounted read-only."""
    prefix = Path(python).parent.parent
    return [] if Path("/usr") in (prefix, *prefix.parents) or prefix == Path("/") else [prefix]


def _reachable_by_others(path: str) -> bool:
    """Whether a user with no special rights can execute `path` (every parent directory searchable by others)."""
    target = Path(path).resolve()
    dirs_ok = all(os.stat(parent).st_mode & 0o001 for parent in target.parents)
    return dirs_ok and bool(os.stat(target).st_mode & 0o001)


def bwrap_problem(python: str | None = None) -> str | None:
    """Why bwrap cannot sandbox here (None: it works). Probed once per process with a real, trivial run."""
    python = str(Path(python or getattr(sys, "_base_executable", None) or sys.executable).resolve())
    exe = shutil.which("bwrap")
    if exe is None:
        return "the `bwrap` command is not installed (Debian/Ubuntu: apt-get install -y bubblewrap)"
    key = f"{exe}:{python}"
    if key not in _BWRAP_PROBES:
        argv = [exe, *_bwrap_base_args(python), "--", python, "-I", "-S", "-c", "pass"]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=30, env=_HOST_ENV)
            ok = done.returncode == 0
            _BWRAP_PROBES[key] = None if ok else f"bwrap failed: {done.stderr.decode(errors='replace').strip()}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            _BWRAP_PROBES[key] = f"bwrap failed: {exc}"
    return _BWRAP_PROBES[key]


# The only variables the sandbox process starts with (the trainer's own, API keys included, never reach it).
# A fixed hash seed: set and dict-of-str iteration order is then the same in every run, so a reference run and a
# candidate run agree (MBPP+ expected values) and rewards are reproducible.
_HOST_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


def _supervise(argv: list[str], cwd: str | None, stdin: bytes, limits: SandboxLimits) -> RunResult:
    """Start the process tree, pump its output under the caps, kill the whole tree at the end or the deadline."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as stdin_file:  # unlinked at once: the program cannot find it by name
        stdin_file.write(stdin)
        stdin_file.seek(0)
        proc = subprocess.Popen(
            argv, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=_HOST_ENV,
            start_new_session=True, close_fds=True,
        )
    stdout, stderr = bytearray(), deque()
    stderr_len = 0
    reason = None
    deadline = start + limits.wall_s
    exited_at = None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        while sel.get_map() and reason is None:
            now = time.monotonic()
            if now >= deadline:
                reason = "timeout"
                break
            if exited_at is not None and now - exited_at > _DRAIN_S:
                break  # process mode: a descendant that left the group still holds the pipes
            for key, _ in sel.select(timeout=min(deadline - now, 0.25)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data == "out":
                    stdout += chunk
                    if len(stdout) > limits.stdout_bytes:
                        reason = "output_limit"
                        break
                else:  # keep only the tail of stderr
                    stderr.append(chunk)
                    stderr_len += len(chunk)
                    while stderr_len - len(stderr[0]) >= limits.stderr_bytes:
                        stderr_len -= len(stderr.popleft())
            if exited_at is None and proc.poll() is not None:
                exited_at = time.monotonic()
                _kill_group(proc)  # process mode: children still in the group go now
    if reason is not None:
        _stop(proc)
    _kill_group(proc)
    proc.wait()
    wall = time.monotonic() - start
    proc.stdout.close()
    proc.stderr.close()
    err_text = b"".join(stderr)[-limits.stderr_bytes :].decode(errors="replace")
    out_text = bytes(stdout[: limits.stdout_bytes]).decode(errors="replace")
    return _classify(proc.returncode, reason, out_text, err_text, wall)


def _stop(proc: subprocess.Popen) -> None:
    """Ask the launcher (the run's reaper) to kill the program's whole tree, then wait for it a moment."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=_REAP_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    # The session leader's group: bwrap (whose PID namespace then dies with it), or the program in process mode.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(code: int | None, reason: str | None, stdout: str, stderr: str, wall: float) -> RunResult:
    if reason is not None:
        detail = "wall time limit" if reason == "timeout" else "stdout limit"
        return RunResult(reason, None, stdout, stderr, wall, detail)
    sig = -code if code is not None and code < 0 else (code - 128 if code is not None and code > 128 else None)
    last_line = stderr.strip().rsplit("\n", 1)[-1] if stderr.strip() else ""
    if code == 0:
        return RunResult("ok", 0, stdout, stderr, wall)
    if sig == signal.SIGXCPU:
        return RunResult("timeout", code, stdout, stderr, wall, "CPU time limit")
    if last_line.startswith("MemoryError"):
        return RunResult("memory", code, stdout, stderr, wall, "memory limit")
    detail = f"killed by signal {signal.Signals(sig).name}" if sig in signal.valid_signals() else f"exit code {code}"
    return RunResult("error", code, stdout, stderr, wall, detail)
