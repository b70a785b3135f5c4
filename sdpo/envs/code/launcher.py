"""First process inside the sandbox: apply resource limits, drop root, then exec the untrusted program.

Standalone on purpose (stdlib only, no sdpo import): it runs under `python -I -S` in a filesystem that only holds
the interpreter. Usage: `python -I -S launcher.py '<limits json>' PROGRAM [ARGS...]`.

Order matters. The limits are set while still privileged, then the uid is dropped: root ignores RLIMIT_NPROC, so
the process limit only holds for the unprivileged uid the program ends up with (issue #4). The parent-death signal
is set after the uid change because the kernel clears it on credential changes.
"""

import ctypes
import json
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1


def _limit(kind: int, value: int) -> None:
    resource.setrlimit(kind, (value, value))


def main() -> None:
    limits = json.loads(sys.argv[1])
    program = sys.argv[2:]
    _limit(resource.RLIMIT_CORE, 0)
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
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's process-group kill still applies
    os.umask(0o077)
    os.execv(program[0], program)


if __name__ == "__main__":
    main()
