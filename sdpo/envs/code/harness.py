"""Test harness for function-call and assert tests; runs *inside* the sandbox, next to the candidate program.

Standalone on purpose (stdlib only, and launcher.py next to it): it is copied into the sandbox as harness.py. It
reads its spec as JSON from stdin and then closes stdin, so that the tests are not left lying around as a file the
program could open. It writes one JSON record per line to the original stdout; the program's own prints go to
stderr instead.

Spec keys: `mode` ("stdin", "call" or "assert"), `program` (file name of the program, next to this file),
`setup` (trusted code run first, e.g. the data set's imports), `func_name` (call mode), `candidate` (assert mode:
expression bound to the name `candidate`), `prelude` (assert mode: test-module code such as helper functions),
`tests`, `time_limit_s`, `stop_on_error`.

Stdin mode forks one child per test from this warm interpreter (a fresh interpreter costs ~30 ms a test): the child
gets the test input as stdin, runs the program as `__main__` with its own CPU and output-size limits, and its
stdout comes back in the record; the parent compares it, so expected outputs never enter the sandbox. Call mode
reports each return value (encoded, see `encode`), also compared outside. Assert mode has to run the data set's
asserts here, so their expected values are in this process: documented as a limit in docs/environments.md.
"""

import ast
import errno
import io
import json
import math
import os
import resource
import select
import signal
import sys
import sysconfig
import threading
import time
import traceback

_MAX_SHOWN = 1000  # characters of a repr sent back for feedback
_STDERR_TAIL = 4096  # bytes of a stdin-mode test's stderr sent back (a traceback fits: see _short_trace)
_MAX_INT_BITS = 13_300  # about 4000 decimal digits: larger ints travel as a (short) repr
_TRACE_FRAMES = 5  # the program's last frames in a traceback
_TRACE_LINE = 200  # characters per traceback line (a frame's source line can be a whole one-liner program)
_TRACE_MESSAGE = 1000  # characters of the exception line(s): the type and the start of the message


class _TestTimeout(BaseException):
    """Raised by the per-test timer; a BaseException so that `except Exception` in the program does not eat it."""


def _on_alarm(signum, frame):
    raise _TestTimeout()


def encode(value, depth=0):
    """A JSON-safe, tagged form of a return value, decoded by sdpo.envs.code.values.decode in the parent."""
    if depth > 64:
        return {"__repr__": _short_repr(value)}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):  # bit_length, not a comparison with 10**4000: that power costs 30 us per call
        return int(value) if value.bit_length() <= _MAX_INT_BITS else {"__repr__": _short_repr(value)}
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, list):
        return [encode(item, depth + 1) for item in value]
    if isinstance(value, tuple):
        return {"__tuple__": [encode(item, depth + 1) for item in value]}
    if isinstance(value, (set, frozenset)):
        return {"__set__": [encode(item, depth + 1) for item in sorted(value, key=repr)]}
    if isinstance(value, dict):
        return {"__dict__": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if isinstance(value, complex):
        return {"__complex__": [encode(value.real), encode(value.imag)]}
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays
        try:
            return encode(value.tolist(), depth + 1)
        except Exception:
            pass
    return {"__repr__": _short_repr(value)}


def decode(value, opaque=None):
    """Inverse of `encode`: tuples, sets, dicts, non-finite floats and complex numbers survive the JSON trip.

    The one decoder of both sides. Here (test arguments sent in) `opaque` is None: a value the tags cannot rebuild
    stays as it came (a `__repr__` tag or an untagged object is left a dict; unhashable set members or dict keys
    raise TypeError). The trusted scorer (sdpo.envs.code.values.decode) passes `opaque`, which then stands for such a
    value, built from its text; an untagged JSON object (an expected value from data) gets its members decoded.
    """
    if isinstance(value, list):
        return [decode(item, opaque) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(decode(item, opaque) for item in value["__tuple__"])
    if "__set__" in value:
        items = [decode(item, opaque) for item in value["__set__"]]
        try:
            return set(items)
        except TypeError:  # unhashable members cannot form a set; keep the order-free intent
            if opaque is None:
                raise
            return opaque("{" + ", ".join(map(repr, items)) + "}")
    if "__dict__" in value:
        pairs = [(decode(k, opaque), decode(v, opaque)) for k, v in value["__dict__"]]
        try:
            return dict(pairs)
        except TypeError:
            if opaque is None:
                raise
            return opaque(repr(pairs))
    if "__float__" in value:
        return float(value["__float__"])
    if "__complex__" in value:
        real, imag = value["__complex__"]
        return complex(decode(real, opaque), decode(imag, opaque))
    if opaque is None:
        return value
    if "__repr__" in value:
        return opaque(str(value["__repr__"]))
    return {key: decode(item, opaque) for key, item in value.items()}


def _node_to_list(value):
    """LeetCode's ListNode / TreeNode as the list LeetCode prints; other values unchanged."""
    if hasattr(value, "val") and hasattr(value, "next"):
        items, seen = [], 0
        while value is not None and seen < 10000:
            items.append(value.val)
            value, seen = value.next, seen + 1
        return items
    if hasattr(value, "val") and hasattr(value, "left") and hasattr(value, "right"):
        items, queue = [], [value]
        while queue and len(items) < 10000:
            node = queue.pop(0)
            items.append(None if node is None else node.val)
            if node is not None:
                queue += [node.left, node.right]
        while items and items[-1] is None:
            items.pop()
        return items
    return value


def _short_repr(value):
    try:
        text = repr(_node_to_list(value))
    except Exception as exc:
        text = f"<unprintable {type(value).__name__}: {type(exc).__name__}>"
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def _path_labels():
    """Host paths a traceback may show, longest first, and what to show instead ("" makes a path relative)."""
    paths = sysconfig.get_paths()
    labels = {sys.base_prefix: "<python>", sys.prefix: "<python>"}
    labels.update({paths[key]: "<site-packages>" for key in ("platlib", "purelib")})
    labels.update({paths[key]: "<stdlib>" for key in ("platstdlib", "stdlib")})
    labels.update({os.path.dirname(os.path.abspath(__file__)): "", os.getcwd(): ""})
    pairs = [(path.rstrip(os.sep) + os.sep, label) for path, label in labels.items() if path]
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def _hide_paths(text):
    for path, label in _path_labels():
        text = text.replace(path, label + os.sep if label else "")
    return text


def _clip(text, limit):
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_trace(exc):
    """The program's last frames (the harness's own are noise in feedback), no host path, every part bounded.

    The exception line keeps its head (the type and the start of the message): a long message must not push the
    type out of the stderr tail or the feedback.
    """
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename not in (__file__, "test", "candidate")]
    lines = ["Traceback (most recent call last):"] if frames else []
    for line in traceback.format_list(frames[-_TRACE_FRAMES:]):
        lines += [_clip(part, _TRACE_LINE) for part in line.rstrip("\n").split("\n")]
    lines.append(_clip("".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n"), _TRACE_MESSAGE))
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        lines.append(f"(a file grew past the sandbox's file size limit of {limit} bytes)")
    return _hide_paths("\n".join(lines)) + "\n"


def _timed(limit_s, fn):
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _eval(node, ns, name="test"):
    return eval(compile(ast.Expression(node), name, "eval"), ns)


def _run_assert(source, ns):
    """Record fields for one assert statement. `assert f(x) == y` also reports f(x) for the feedback's Output."""
    stmt = ast.parse(source).body[0]
    test = stmt.test if isinstance(stmt, ast.Assert) else None
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
        actual = _eval(test.left, ns)
        expected = _eval(test.comparators[0], ns)
        ok = bool(actual == expected)
        return {"status": "passed" if ok else "failed", "shown": _short_repr(actual)}
    if isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id.startswith("is_same") \
            and len(test.args) == 2 and not test.keywords:
        actual = _eval(test.args[0], ns)
        ok = bool(ns[test.func.id](actual, _eval(test.args[1], ns)))
        return {"status": "passed" if ok else "failed", "shown": _short_repr(actual)}
    try:
        exec(compile(source, "test", "exec"), ns)
    except AssertionError:
        return {"status": "failed"}
    return {"status": "passed"}


def _run_call(args, ns, func_name):
    solution_class = ns.get("Solution")
    if isinstance(solution_class, type) and hasattr(solution_class, func_name):
        target = getattr(solution_class(), func_name)  # a fresh instance per test, like a new submission run
    elif func_name in ns:
        target = ns[func_name]
    else:
        raise NameError(f"the program defines no function or Solution method named {func_name!r}")
    # encode stays inside the timer: it may call the program's own __repr__ (which may loop); it is linear.
    return {"status": "returned", "value": encode(target(*args))}


def _memfd(name, data=b""):
    """An anonymous in-memory file (a test's stdin, stdout or stderr): no file for the program to find by name."""
    fd = os.memfd_create(name)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_fd(fd, limit, tail=False):
    size = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, max(0, size - limit) if tail else 0, os.SEEK_SET)
    chunks, left = [], min(size, limit)
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks).decode(errors="replace")


def _stdin_child(program, path, fds, limit_s, output_cap):
    """In the forked child: wire up the test's files, limit it, run the program as __main__, never return."""
    code = 1
    try:
        os.setpgid(0, 0)
        stdin_fd, out_fd, err_fd, records_fd = fds
        for source, target in ((stdin_fd, 0), (out_fd, 1), (err_fd, 2)):
            os.dup2(source, target)
        for fd in fds:
            os.close(fd)  # the records channel above all: the program must not write verdicts
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; we want the kill at the output cap
        cpu = int(math.ceil(limit_s)) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (output_cap, output_cap))  # more output: SIGXFSZ
        sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8")
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", write_through=True)
        sys.argv = [path]
        try:
            exec(program, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
            for thread in threading.enumerate():  # a program may do its work in a thread (bigger stack)
                if thread is not threading.main_thread() and not thread.daemon:
                    thread.join()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException as exc:  # noqa: BLE001 - the program's own error, shown as a traceback
            sys.stderr.write(_short_trace(exc))
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _wait_child(pid, limit_s):
    """The child's exit code (-N: killed by signal N), or None if it ran past the limit (its group is then killed)."""
    deadline = time.monotonic() + limit_s
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): poll
        fd = None
    if fd is not None:
        ready = bool(select.select([fd], [], [], limit_s)[0])
        os.close(fd)
        if ready:
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    else:
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.002)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    os.waitpid(pid, 0)
    return None


def _exceeded(stdout_fd, stderr_fd, cap):
    """Which file hit the size limit (RLIMIT_FSIZE = the output cap) when a test died of SIGXFSZ."""
    for name, fd in (("stdout", stdout_fd), ("stderr", stderr_fd)):
        if os.fstat(fd).st_size >= cap:
            return name
    return "file"  # a file the program wrote


def _run_stdin_tests(spec, program, path, records_fd, emit):
    # Each test's leftovers (a daemon, a shell's background job in its own session) die before the next test:
    # this harness is their subreaper, so they come back here when their parents end.
    from launcher import PR_SET_CHILD_SUBREAPER, kill_descendants, prctl  # next to this file in the sandbox

    prctl(PR_SET_CHILD_SUBREAPER, 1)
    limit = float(spec["time_limit_s"])
    for i, test in enumerate(spec["tests"]):
        emit(event="start", i=i)
        cap = int(test["output_cap"])
        fds = (_memfd("stdin", test["input"].encode()), _memfd("stdout"), _memfd("stderr"), records_fd)
        pid = os.fork()
        if pid == 0:
            _stdin_child(program, path, fds, limit, cap)
        code = _wait_child(pid, limit)
        kill_descendants()
        if code is None:
            record = {"status": "timeout"}
        else:
            stdout = _read_fd(fds[1], cap)
            record = {"status": "exited", "code": code, "stdout": stdout, "stderr": _read_fd(fds[2], _STDERR_TAIL, tail=True)}
            if code == -signal.SIGXFSZ:
                record.update(exceeded=_exceeded(fds[1], fds[2], cap), limit_bytes=cap)
        for fd in fds[:3]:
            os.close(fd)
        emit(event="result", i=i, **record)
        if (code is None or code != 0) and spec.get("stop_on_error", True):
            return


def _not_dumpable():
    """Same-uid processes (the forked tests) may then not open /proc/<harness>/fd or read its memory."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        pass


def main():
    spec = json.loads(sys.stdin.read())
    _not_dumpable()
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # fd 0 again, now empty
    records = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the program's print() output must not mix with the records

    def emit(**record):
        records.write(json.dumps(record, ensure_ascii=False) + "\n")

    signal.signal(signal.SIGALRM, _on_alarm)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), spec["program"])
    with open(path) as f:
        program = compile(f.read(), "solution.py", "exec")
    if spec["mode"] == "stdin":
        emit(event="load", status="ok")
        _run_stdin_tests(spec, program, path, records.fileno(), emit)
        return
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    limit = float(spec["time_limit_s"])
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    exec(compile(spec.get("setup") or "", "setup", "exec"), ns)
    try:
        _timed(limit, lambda: exec(program, ns))
        if spec["mode"] == "assert":
            exec(compile(spec.get("prelude") or "", "prelude", "exec"), ns)
            if spec.get("candidate"):
                ns["candidate"] = _eval(ast.parse(spec["candidate"], mode="eval").body, ns, "candidate")
    except _TestTimeout:
        emit(event="load", status="timeout")
        return
    except BaseException as exc:  # noqa: BLE001 - SystemExit at import is a failed load too
        emit(event="load", status="error", error=_short_trace(exc))
        return
    emit(event="load", status="ok")
    for i, test in enumerate(spec["tests"]):
        emit(event="start", i=i)
        try:
            if spec["mode"] == "assert":
                record = _timed(limit, lambda: _run_assert(test["source"], ns))
            else:
                args = decode(test["args"])  # the judge's work, not the program's: outside the timer
                record = _timed(limit, lambda: _run_call(args, ns, spec["func_name"]))
        except _TestTimeout:
            record = {"status": "timeout"}
        except MemoryError as exc:
            record = {"status": "memory", "error": _short_trace(exc)}
        except BaseException as exc:  # noqa: BLE001 - includes SystemExit from the program
            record = {"status": "error", "error": _short_trace(exc)}
        emit(event="result", i=i, **record)
        if record["status"] in ("timeout", "memory", "error") and spec.get("stop_on_error", True):
            return


if __name__ == "__main__":
    main()
