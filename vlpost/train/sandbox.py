"""Run untrusted Python (policy completions) against test functions in a contained child process.

``run_tests(code, tests)`` runs ``code`` and then ``tests`` in one fresh namespace (also importable as
``solution``) inside ``python -I -S`` (stdlib only: no site-packages, PYTHON* variables ignored) and calls
each top-level ``test_*`` function of ``tests`` in source order: a test that returns passes, one that
raises anything (SystemExit included) fails. The parent reads the test names itself with ``ast``, so
the child cannot change ``total``. The child side is ``vlpost/train/sandbox_runner.py``.

Protections, and where each applies ("root": the parent runs as root, the usual case in training
containers, and the one the tests cover fully; "user": an ordinary user).

| threat      | root                                                  | user                                        |
|-------------|-------------------------------------------------------|---------------------------------------------|
| time        | wall clock, then every process of the run is killed; RLIMIT_CPU = timeout + 1 s | same              |
| memory      | RLIMIT_AS = mem_mb per process (at most max_procs x mem_mb in all) | same                           |
| processes   | a fresh uid per run (never a real account), RLIMIT_NPROC = max_procs counts that uid only | RLIMIT_NPROC counts all the user's processes: set to their current count + max_procs (approximate) |
| leftovers   | every live process with the run's uid is SIGKILLed by pid (found in /proc) | the runner's session is swept; a process that calls setsid() escapes |
| parent dies | PR_SET_PDEATHSIG kills the runner (its own children are not covered) | same                    |
| writes      | private mount namespace, fresh tmpfs (32 MB) on /tmp, /var/tmp, /dev/shm, /run/lock; cwd on it; all gone with the run. Elsewhere only world-writable paths | cwd is a fresh temp dir (removed); the code can write wherever the user can |
| file size   | RLIMIT_FSIZE 16 MB (CPython ignores SIGXFSZ, so writes raise OSError) | same                       |
| reads       | world-readable files only; a Python kept in a private home (pyenv in /root) is bind-mounted read-only into an empty tmpfs over that home | everything the user can read |
| network     | new network namespace (only a loopback that is down)  | unprivileged user+net namespace when the kernel allows; else socket creation is patched to raise in Python (best effort: ctypes or a subprocess bypass it) |
| environment | env = PATH + LANG; other processes' /proc/<pid>/environ unreadable (other uid) | env stripped; the user's other processes' environ stays readable |
| privileges  | groups dropped, no_new_privs (setuid binaries cannot elevate), no core dumps | no_new_privs, no core dumps |

Run uids are ``UID_BASE + (pid mod 2**20) * 1024 + call count mod 1024``: unique within a process
for 1024 concurrent calls and across processes unless two pids agree mod 2**20.

Result channel: the runner writes ``<nonce> test <i> <0|1> <exception>`` lines to a file descriptor the
parent opened, never to stdout/stderr (which the parent never parses). The nonce is 128 random bits;
a line without it, out of order, repeated or after ``done`` marks the run as tampered and scores 0.
Defeated: printing fake results, blind writes to every fd, early exits (later tests are simply not
reported), monkeypatching builtins/os/json/traceback (the runner binds what it uses before the code
runs, formats with bytes ``%`` and writes each record before any user-controlled code can run),
forked copies of the runner returning into its loop (only the runner's pid reports). Not defeated:
code that deliberately walks the runner's frames or gc to steal the nonce, or returns objects whose
``__eq__`` is always True. Tests share the process with the code, so a determined adversary can lie;
audit high-reward samples if the policy might learn to.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from vlpost.train import sandbox_runner
from vlpost.train.sandbox_runner import RUNNER_MARKER, SandboxError, proc_table

OUTPUT_LIMIT = 4096  # bytes of stdout/stderr kept
RESULT_LIMIT = 65536  # bytes of the result channel read
STAGE_PREFIX = "vlpost-sbx-"
UID_BASE = 3_000_000_000  # run uids: UID_BASE + (pid mod 2**20) * 1024 + slot, below 2**32 - 1
PYTHON = sys.executable  # the runner needs only the stdlib of this interpreter
MIN_MEM_MB = 64  # below this the runner itself cannot work
CHILD_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

_uid_slots = itertools.count()  # next() on it is atomic under the GIL


@dataclass
class GradeResult:
    passed: int
    total: int
    error: str | None = None  # None when every test ran (failures are not errors)
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)  # test name -> exception type name
    isolation: tuple[str, ...] = ()  # protections the runner applied, e.g. ("uid", "mountns", "netns")

    @property
    def reward(self) -> float:
        return self.passed / self.total if self.total else 0.0


def collect_test_names(tests: str) -> list[str]:
    """Top-level ``def test_*`` names in source order: the parent's own count of what must pass."""
    try:
        tree = ast.parse(tests)
    except SyntaxError as exc:
        raise ValueError(f"tests do not parse ({exc}); fix the sample's reward.tests") from exc
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and node.name not in names:
            names.append(node.name)
    return names


def run_tests(code: str, tests: str, timeout_s: float = 4, mem_mb: int = 1024, *,
              max_procs: int = 16, use_netns: bool = True) -> GradeResult:
    """Run ``tests`` against ``code`` in a contained child; ``passed`` counts tests reported passing."""
    if mem_mb < MIN_MEM_MB:
        raise ValueError(f"mem_mb={mem_mb} is below {MIN_MEM_MB}: the sandbox runner needs that much itself")
    names = collect_test_names(tests)
    if not names:
        raise ValueError("tests define no top-level `def test_*` function; fix the sample's reward.tests")
    uid = _run_uid()
    nonce = secrets.token_hex(16)
    start = time.monotonic()
    stage = tempfile.mkdtemp(prefix=STAGE_PREFIX)
    try:
        payload = {"code": code, "tests": tests, "names": names, "nonce": nonce, "uid": uid,
                   "mem_mb": mem_mb, "cpu_s": int(timeout_s) + 1, "max_procs": max_procs,
                   "use_netns": use_netns, "workdir": os.path.join(stage, "work"), "parent_pid": os.getpid()}
        returncode, timed_out = _launch_and_wait(stage, payload, timeout_s)
        result = _build_result(stage, nonce, names, returncode, timed_out, timeout_s)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    result.duration_s = time.monotonic() - start
    return result


def _run_uid() -> int | None:
    """A fresh uid when we are root (see the table above); None runs the code as our own user."""
    return _allocate_uid() if os.geteuid() == 0 else None


def _allocate_uid() -> int:
    return UID_BASE + ((os.getpid() & 0xFFFFF) << 10) + next(_uid_slots) % 1024


def _launch_and_wait(stage: str, payload: dict, timeout_s: float) -> tuple[int, bool]:
    """Start the runner, enforce the wall clock, then kill whatever the run left behind."""
    os.mkdir(payload["workdir"], 0o700)
    files = {name: open(os.path.join(stage, name), "wb") for name in ("stdout", "stderr", "result")}
    try:
        payload["result_fd"] = files["result"].fileno()  # pass_fds keeps the number in the child
        payload_path = os.path.join(stage, "payload.json")
        with open(os.open(payload_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(payload, f)
        proc = subprocess.Popen(
            [PYTHON, "-I", "-S", os.path.abspath(sandbox_runner.__file__), RUNNER_MARKER, payload_path],
            stdin=subprocess.DEVNULL, stdout=files["stdout"], stderr=files["stderr"],
            pass_fds=(payload["result_fd"],), env=dict(CHILD_ENV), cwd=payload["workdir"],
            start_new_session=True)
    finally:
        for f in files.values():
            f.close()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # runner not reaped yet, so its group id is still ours
        except ProcessLookupError:
            pass
        proc.wait()
    finally:
        _kill_leftovers(payload["uid"], session=proc.pid)
    return proc.returncode, timed_out


def _run_processes(uid: int | None, session: int) -> list[int]:
    """Live processes of one run: its uid (root mode) or its session and our uid (user mode)."""
    if uid is not None:
        return [pid for pid, puid, _, state in proc_table() if puid == uid and state != "Z" and pid > 1]
    me = os.getuid()
    return [pid for pid, puid, sid, state in proc_table()
            if sid == session and puid == me and state != "Z" and pid > 1 and pid != os.getpid()]


def _kill_leftovers(uid: int | None, session: int, deadline_s: float = 5.0) -> None:
    """SIGKILL the run's processes by exact pid until none is alive (a fork bomb needs a few rounds)."""
    if uid is not None and uid < UID_BASE:
        raise SandboxError(f"refusing to sweep uid {uid}: not a sandbox uid")
    end = time.monotonic() + deadline_s
    while pids := _run_processes(uid, session):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > end:
            raise SandboxError(f"sandbox processes {pids[:5]} survived SIGKILL for {deadline_s}s")
        time.sleep(0.01)


def _read_limited(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    size = os.path.getsize(path)
    text = data[:limit].decode("utf-8", "replace")
    return text + f"\n...[truncated {size - limit} bytes]" if size > limit else text


def _parse_channel(raw: bytes, nonce: str, names: list[str]) -> dict:
    """Validate the runner's lines; anything unexpected means the code wrote to the channel."""
    report = {"ready": False, "passes": 0, "failures": {}, "load_error": None, "done": False,
              "tampered": None, "isolation": ()}
    lines = raw.decode("ascii", "replace").split("\n")[:-1]  # an unterminated tail never counts
    for number, line in enumerate(lines, start=1):
        parts = line.split(" ")
        problem = _check_line(parts, nonce, names, report)
        if problem:
            report["tampered"] = f"line {number}: {problem}"
            return report
    return report


def _check_line(parts: list[str], nonce: str, names: list[str], report: dict) -> str | None:
    next_test = report["passes"] + len(report["failures"])
    if parts[0] != nonce:
        return "missing nonce"
    kind, args = (parts[1] if len(parts) > 1 else ""), parts[2:]
    expected_ready = not report["ready"]  # "ready" comes first and only once
    if report["done"] or report["load_error"] or (kind == "ready") != expected_ready:
        return f"unexpected {kind!r}"
    if kind == "ready" and len(args) == 1:
        report["ready"], report["isolation"] = True, tuple(filter(None, args[0].split(",")))
    elif kind in ("code_error", "tests_error") and len(args) == 1 and next_test == 0:
        report["load_error"] = f"{kind.split('_')[0]} raised {args[0]} while loading"
    elif kind == "test" and len(args) == 3 and args[0] == str(next_test) and args[1] in ("0", "1"):
        if next_test >= len(names):
            return "more tests than defined"
        if args[1] == "1":
            report["passes"] += 1
        else:
            report["failures"][names[next_test]] = args[2]
    elif kind == "done" and not args and next_test == len(names):
        report["done"] = True
    else:
        return f"malformed {kind!r} record"
    return None


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-returncode}"
        hint = {"SIGKILL": " (memory or CPU limit?)", "SIGXCPU": " (CPU limit)", "SIGXFSZ": " (file size limit)"}
        return f"runner killed by {name}{hint.get(name, '')}"
    return f"runner exited with code {returncode} before finishing"


def _build_result(stage: str, nonce: str, names: list[str], returncode: int, timed_out: bool,
                  timeout_s: float) -> GradeResult:
    with open(os.path.join(stage, "result"), "rb") as f:
        report = _parse_channel(f.read(RESULT_LIMIT), nonce, names)
    stdout = _read_limited(os.path.join(stage, "stdout"), OUTPUT_LIMIT)
    stderr = _read_limited(os.path.join(stage, "stderr"), OUTPUT_LIMIT)
    if not report["ready"] and not report["tampered"]:
        why = f"timed out after {timeout_s}s" if timed_out else _exit_reason(returncode)
        raise SandboxError(f"sandbox runner failed before running any code ({why}); stderr: {stderr[-800:]}")
    if report["tampered"]:
        error, passed = f"result channel tampered ({report['tampered']}); scored 0", 0
    else:
        passed = report["passes"]
        error = (f"timeout after {timeout_s}s" if timed_out else report["load_error"]
                 or (None if report["done"] else _exit_reason(returncode)))
    return GradeResult(passed=passed, total=len(names), error=error, stdout=stdout, stderr=stderr,
                       failures=report["failures"], isolation=report["isolation"])
