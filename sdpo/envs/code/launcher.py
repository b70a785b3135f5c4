"""First process inside the sandbox: apply resource limits, drop root, run the untrusted program, kill what it left.

Standalone on purpose (stdlib only, no sdpo import): it runs under `python -I -S` in a filesystem that only holds
the interpreter. Usage: `python -I -S launcher.py '<limits json>' PROGRAM [ARGS...]`.

The launcher stays behind as the reaper of the run (PR_SET_CHILD_SUBREAPER): it forks the program, waits for it,
and then kills every process still below it. Whatever the program started (a shell that started `sleep` in a new
session, a double-forked daemon) is re-parented to the reaper, not to init, when its parent dies, so nothing
escapes the final kill, in every isolation mode. A SIGTERM (the supervisor's deadline) does the same at once. As
root the reaper also kills every process of the run's own uid (atomically, with kill(-1) as that uid), and the
program, another uid, cannot signal the reaper.

Order matters in the program's child. The limits are set while still privileged, then the uid is dropped: root
ignores RLIMIT_NPROC, so the process limit only holds for the unprivileged uid the program ends up with.
The parent-death signal is set after the uid change because the kernel clears it on credential changes.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


class _Stop(BaseException):
    """SIGTERM from the supervisor: stop waiting and clean up now."""


def _limit(kind: int, value: int) -> None:
    resource.setrlimit(kind, (value, value))


def prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False  # not Linux: the supervisor's process-group kill still applies


def children() -> list[int]:
    """This process's child pids (every thread's; /proc/<pid>/task/<tid>/children, else a scan of /proc)."""
    me, found = os.getpid(), []
    try:
        for tid in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{tid}/children") as f:
                found += [int(pid) for pid in f.read().split()]
        return found
    except OSError:
        pass
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def kill_descendants() -> None:
    """SIGKILL every process below this one and reap it. Needs PR_SET_CHILD_SUBREAPER (orphans come back here)."""
    while True:
        for pid in children():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.001)  # killed, not yet reaped (or re-parented a moment ago): look again
        except ChildProcessError:
            return


def _kill_uid(uid: int) -> None:
    """As root: SIGKILL every process of `uid` at once (kill(-1) is atomic against fork), from a child that is it."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _run_program(limits: dict, program: list[str]) -> None:
    """In the forked child: limits, uid drop, parent-death signal, exec. Never returns."""
    try:
        _limit(resource.RLIMIT_CPU, limits["cpu_s"])
        _limit(resource.RLIMIT_AS, limits["memory_bytes"])
        _limit(resource.RLIMIT_FSIZE, limits["file_size_bytes"])
        _limit(resource.RLIMIT_NOFILE, limits["open_files"])
        _limit(resource.RLIMIT_NPROC, limits["processes"])
        uid = limits.get("uid")
        if uid is not None and os.getuid() == 0:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            if os.getuid() == 0 or os.geteuid() == 0:  # never run the program as root
                raise SystemExit("sandbox launcher: could not drop root")
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.umask(0o077)
        os.execv(program[0], program)
    except BaseException as exc:  # noqa: BLE001 - report and exit; never fall back into the reaper's code
        sys.stderr.write(f"sandbox launcher: {exc}\n")
        sys.stderr.flush()
    os._exit(127)


def _on_term(signum, frame):
    raise _Stop()


def main() -> None:
    limits = json.loads(sys.argv[1])
    program = sys.argv[2:]
    _limit(resource.RLIMIT_CORE, 0)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGTERM, _on_term)
    status = None
    try:
        child = os.fork()
        if child == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _run_program(limits, program)
        while status is None:  # reap re-parented orphans as they end, until the program itself ends
            pid, wait_status = os.waitpid(-1, 0)
            if pid == child:
                status = os.waitstatus_to_exitcode(wait_status)
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup runs to its end
        uid = limits.get("uid")
        if uid is not None and os.getuid() == 0:
            _kill_uid(uid)
        kill_descendants()
    if status is None or status >= 0:
        os._exit(1 if status is None else status)
    # Die of the program's signal, so that the supervisor sees what killed it (no core: RLIMIT_CORE is 0).
    try:
        signal.signal(-status, signal.SIG_DFL)
    except (OSError, ValueError):
        pass  # SIGKILL and SIGSTOP cannot (and need not) be reset
    os.kill(os.getpid(), -status)
    os._exit(128 - status)


if __name__ == "__main__":
    main()
