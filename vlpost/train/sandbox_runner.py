"""The sandbox's runner: the child side of `vlpost.train.sandbox.run_tests` (its docstring has the threat table).

Started as ``python -I -S <this file> vlpost-sandbox-runner <payload.json>``, so it imports nothing but the
standard library: it contains itself (uid, mounts, limits, network), runs the code and the tests, and reports on
the result fd. Everything here runs in the child, first as the parent's user, then as the run's uid.
"""

from __future__ import annotations

import json
import os
import signal
import sys

RUNNER_MARKER = "vlpost-sandbox-runner"  # argv[1] of every runner: lets tests find leftovers
FILE_LIMIT_MB = 16
TMPFS_MB = 32
TMPFS_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the code under test): scoring 0 here would hide a broken setup."""


def proc_table() -> list[tuple[int, int, int, str]]:
    """(pid, real uid, session id, state) of every process, read from /proc."""
    table = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after "(comm)": state ppid pgrp session
            with open(f"/proc/{entry}/status", "rb") as f:
                uid_line = next(line for line in f if line.startswith(b"Uid:"))
        except (OSError, StopIteration, IndexError):
            continue  # exited while we looked
        table.append((int(entry), int(uid_line.split()[1]), int(fields[3]), fields[0].decode()))
    return table


CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 1, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38


def _libc_call(libc, name: str, *args) -> None:
    import ctypes

    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args!r}: {os.strerror(errno)}")


def _hidden_ancestor(path: str) -> str | None:
    """Topmost directory on ``path`` that other users cannot traverse (e.g. /root for a pyenv Python)."""
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & 0o001:
            return current
    return None


def _private_mounts(libc, use_netns: bool) -> list[str]:
    """Root only: new mount (+ network) namespace, fresh tmpfs on world-writable dirs, Python exposed."""
    _libc_call(libc, "unshare", CLONE_NEWNS | (CLONE_NEWNET if use_netns else 0))
    _libc_call(libc, "mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    prefix = os.path.realpath(sys.base_prefix)
    hidden = _hidden_ancestor(prefix)
    prefix_fd = os.open(prefix, os.O_PATH) if hidden else None
    os.chdir("/")
    tmpfs_options = f"size={TMPFS_MB}m,mode=1777".encode()
    for directory in TMPFS_DIRS:
        if os.path.isdir(directory) and not os.path.islink(directory):
            _libc_call(libc, "mount", b"tmpfs", directory.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, tmpfs_options)
    if hidden:
        _libc_call(libc, "mount", b"tmpfs", hidden.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=755")
        os.makedirs(prefix, mode=0o755, exist_ok=True)
        _libc_call(libc, "mount", f"/proc/self/fd/{prefix_fd}".encode(), prefix.encode(), None, MS_BIND | MS_REC, None)
        _libc_call(libc, "mount", b"none", prefix.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
        os.close(prefix_fd)
    return ["mountns"] + (["netns"] if use_netns else [])


def _set_limits(p: dict, nproc: int) -> None:
    import resource

    limits = {resource.RLIMIT_AS: p["mem_mb"] << 20, resource.RLIMIT_CPU: p["cpu_s"],
              resource.RLIMIT_NPROC: nproc, resource.RLIMIT_FSIZE: FILE_LIMIT_MB << 20,
              resource.RLIMIT_CORE: 0, resource.RLIMIT_NOFILE: 64}
    for which, value in limits.items():
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value + 1 if which == resource.RLIMIT_CPU else value))


def _isolate(p: dict) -> list[str]:
    """Namespaces, limits, privilege drop and cwd, in the order the kernel needs them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    uid, applied, nproc = p["uid"], [], p["max_procs"]
    if uid is None:  # RLIMIT_NPROC counts every process of our uid: leave room for the existing ones
        me = os.getuid()  # (counted before a user namespace would show every uid as the overflow uid)
        nproc += sum(1 for _, puid, _, _ in proc_table() if puid == me)
    os.umask(0o022)
    if uid is not None:
        applied += ["uid"] + _private_mounts(libc, p["use_netns"])
        os.makedirs(p["workdir"], mode=0o700, exist_ok=True)  # on the fresh tmpfs (or TMPDIR elsewhere)
        os.chown(p["workdir"], uid, uid)
        os.chmod(os.path.dirname(p["workdir"]), 0o711)  # traversable, not listable
    elif p["use_netns"] and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        applied.append("userns-netns")
    _set_limits(p, nproc)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise SandboxError("privilege drop failed")
    _libc_call(libc, "prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _libc_call(libc, "prctl", PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)  # after setuid, which clears it
    if os.getppid() != p["parent_pid"]:
        raise SandboxError("the parent died before the runner could arm PR_SET_PDEATHSIG")
    os.chdir(p["workdir"])
    os.umask(0o077)
    if "netns" not in applied and "userns-netns" not in applied:
        _block_sockets()
        applied.append("socket-patch")
    return applied


def _block_sockets() -> None:
    import _socket
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the vlpost sandbox")

    for module in (socket, _socket):
        for name in ("socket", "SocketType", "socketpair", "create_connection", "create_server", "fromfd",
                     "getaddrinfo"):
            if hasattr(module, name):
                setattr(module, name, refuse)


def _exception_name(exc, type=type, type_name=type.__dict__["__name__"].__get__, as_str=str.__str__) -> bytes:
    """The class name, read without running any code of the class (no metaclass or str-subclass hooks)."""
    try:
        name = as_str(type_name(type(exc)))
        return ("".join(c for c in name if c.isalnum() or c in "_.")[:60] or "?").encode("ascii", "replace")
    except BaseException:  # noqa: B036 - never let the report fail
        return b"?"


def _call(fn, BaseException=BaseException):  # noqa: N803 - bound before user code runs
    """Run one test; return the exception it raised (SystemExit too), or None when it passed."""
    try:
        fn()
    except BaseException as exc:  # noqa: B036
        return exc
    return None


def _load(source: str, filename: str, namespace: dict, BaseException=BaseException):  # noqa: N803
    try:
        exec(compile(source, filename, "exec"), namespace)
    except BaseException as exc:  # noqa: B036 - SyntaxError, SystemExit ... all mean "did not load"
        return exc
    return None


def _show(exc) -> None:
    """Traceback on stderr for debugging; runs after the record is written (formatting may run user code)."""
    try:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next, limit=5)  # skip our frame
    except BaseException:  # noqa: B036 - only diagnostics
        pass


def _finish(exit_now) -> None:
    """Flush what the code printed, then exit without running its atexit hooks or thread joins."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: B036 - the code may have replaced or closed them
        pass
    exit_now(0)


def _runner_main(payload_path: str) -> None:
    """Read the payload, contain ourselves, run code + tests, report on the result fd, exit hard.

    Everything the reporting path uses is bound to locals before user code runs; between a test's end
    and its record no user-controllable code runs; a forked copy of the runner never reports.
    """
    import types

    with open(payload_path) as f:
        p = json.load(f)
    os.unlink(payload_path)
    write, fd, nonce, exit_now, getpid = os.write, p["result_fd"], p["nonce"].encode(), os._exit, os.getpid
    call, load, show, finish, exception_name = _call, _load, _show, _finish, _exception_name
    names, count = p["names"], len(p["names"])
    applied = _isolate(p)
    runner_pid = getpid()
    write(fd, b"%s ready %s\n" % (nonce, ",".join(applied).encode()))
    module = types.ModuleType("solution")
    sys.modules["solution"] = module
    namespace = module.__dict__
    for kind, source, filename in ((b"code_error", p["code"], "solution.py"), (b"tests_error", p["tests"], "tests.py")):
        exc = load(source, filename, namespace)
        if getpid() != runner_pid:
            exit_now(0)  # a fork of the runner made by the code: only the runner reports
        if exc is not None:
            write(fd, b"%s %s %s\n" % (nonce, kind, exception_name(exc)))
            show(exc)
            finish(exit_now)
    index = 0
    while index < count:  # no builtins here: user code may have replaced enumerate/range/len
        exc = call(namespace.get(names[index]))
        if getpid() != runner_pid:
            exit_now(0)
        if exc is None:
            write(fd, b"%s test %d 1 -\n" % (nonce, index))
        else:
            write(fd, b"%s test %d 0 %s\n" % (nonce, index, exception_name(exc)))
            show(exc)
        index += 1
    write(fd, b"%s done\n" % nonce)
    finish(exit_now)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == RUNNER_MARKER:
    _runner_main(sys.argv[2])
