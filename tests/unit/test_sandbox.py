"""The code sandbox: right pass counts, every hostile program contained, the parent and host unharmed."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from vlpost.train import sandbox
from vlpost.train.sandbox import (
    RUNNER_MARKER,
    STAGE_PREFIX,
    UID_BASE,
    SandboxError,
    _parse_channel,
    collect_test_names,
    run_tests,
)

IS_ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not IS_ROOT, reason="uid/namespace protections need root (see module docstring)")
FAST = {"timeout_s": 2.0, "mem_mb": 256}


def sandbox_processes() -> list[tuple[int, str]]:
    """Every live process that belongs to a sandbox run: a run uid or the runner's argv marker."""
    found = []
    for proc in psutil.process_iter(["pid", "uids", "cmdline", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE or info["uids"] is None:
            continue
        if info["uids"].real >= UID_BASE or RUNNER_MARKER in (info["cmdline"] or []):
            found.append((info["pid"], info["status"]))
    return found


def stage_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), STAGE_PREFIX + "*")))


@pytest.fixture(autouse=True)
def leaves_nothing_behind():
    """Every test below also proves: no sandbox process and no staging dir outlives run_tests."""
    before = stage_dirs()
    yield
    assert sandbox_processes() == []
    assert stage_dirs() - before == set()


# ---------------------------------------------------------------- scoring


def test_correct_code_passes_all():
    code = "def add(a, b):\n    return a + b\n"
    tests = ("def test_small():\n    assert add(1, 2) == 3\n"
             "def test_negative():\n    assert add(-4, 1) == -3\n"
             "def test_stdlib_and_import():\n    import math, solution\n    assert solution.add(math.isqrt(16), 0) == 4\n")
    result = run_tests(code, tests, **FAST)
    assert (result.passed, result.total, result.error, result.reward) == (3, 3, None, 1.0)
    assert result.failures == {}
    if IS_ROOT:
        assert set(result.isolation) == {"uid", "mountns", "netns"}


def test_partial_credit_counts_each_test():
    # by hand: add(-1, 1) gives -1 - 1 = -2 (wants 0), add(-2, -2) gives 0 (wants -4); the other two pass
    code = "def add(a, b):\n    return a + b if a >= 0 else a - b\n"
    tests = ("def test_a():\n    assert add(1, 2) == 3\n"
             "def test_b():\n    assert add(-1, 1) == 0\n"
             "def test_c():\n    assert add(0, 5) == 5\n"
             "def test_d():\n    assert add(-2, -2) == -4\n"
             "def helper_not_a_test():\n    raise AssertionError\n")
    result = run_tests(code, tests, **FAST)
    assert (result.passed, result.total, result.error) == (2, 4, None)
    assert result.reward == 0.5
    assert result.failures == {"test_b": "AssertionError", "test_d": "AssertionError"}
    assert "test_b" in result.stderr  # traceback kept for debugging


def test_collect_test_names_is_the_parents_own_count():
    tests = "def test_b(): pass\nx = 1\ndef test_a(): pass\ndef test_b(): pass\nclass T:\n    def test_c(self): pass\n"
    assert collect_test_names(tests) == ["test_b", "test_a"]
    with pytest.raises(ValueError, match="no top-level"):
        run_tests("x = 1", "def check():\n    pass\n", **FAST)
    with pytest.raises(ValueError, match="do not parse"):
        collect_test_names("def test_(:\n")


def test_syntax_error_scores_zero():
    result = run_tests("def add(a, b:\n    return a + b\n", "def test_a():\n    assert add(1, 2) == 3\n"
                       "def test_b():\n    pass\n", **FAST)
    assert (result.passed, result.total) == (0, 2)
    assert result.error == "code raised SyntaxError while loading"


def test_code_that_exits_while_loading_scores_zero():
    result = run_tests("import sys\nsys.exit(0)\n", "def test_a():\n    pass\n", **FAST)
    assert (result.passed, result.error) == (0, "code raised SystemExit while loading")


def test_exit_inside_a_test_keeps_only_earlier_passes():
    code = "import os\ndef quit_now():\n    os._exit(0)\n"
    tests = "def test_a():\n    pass\ndef test_b():\n    quit_now()\ndef test_c():\n    pass\n"
    result = run_tests(code, tests, **FAST)
    assert (result.passed, result.total) == (1, 3)
    assert result.error == "runner exited with code 0 before finishing"


# ---------------------------------------------------------------- resource bombs


def test_infinite_loop_is_killed_on_time_and_keeps_earlier_passes():
    code = "def fast():\n    return 1\ndef slow():\n    while True:\n        pass\n"
    tests = "def test_fast():\n    assert fast() == 1\ndef test_slow():\n    slow()\n"
    result = run_tests(code, tests, timeout_s=1.0, mem_mb=256)
    assert (result.passed, result.total, result.error) == (1, 2, "timeout after 1.0s")
    assert 1.0 <= result.duration_s < 3.0


def test_memory_bomb_fails_the_test_not_the_parent():
    parent_rss = psutil.Process().memory_info().rss
    code = "def grab():\n    return bytearray(2 * 1024 ** 3)\n"
    tests = ("def test_grab():\n    grab()\n"
             "def test_grow():\n    hog = []\n    while True:\n        hog.append(bytearray(16 * 1024 ** 2))\n"
             "def test_still_alive():\n    assert sum(range(10)) == 45\n")
    result = run_tests(code, tests, timeout_s=3.0, mem_mb=128)
    assert (result.passed, result.total, result.error) == (1, 3, None)
    assert result.failures == {"test_grab": "MemoryError", "test_grow": "MemoryError"}
    assert psutil.Process().memory_info().rss < parent_rss + 64 * 1024 ** 2


@root_only
def test_process_count_is_capped_and_sleepers_are_swept():
    # the children sleep for 60 s, long after the runner exits: the sweep must kill them
    code = ("import os, time\n"
            "def spawn(limit):\n    pids = []\n    try:\n        for _ in range(limit):\n"
            "            pid = os.fork()\n            if pid == 0:\n                time.sleep(60)\n"
            "                os._exit(0)\n            pids.append(pid)\n    except OSError:\n        pass\n"
            "    return pids\n")
    tests = "def test_capped():\n    assert len(spawn(100)) < 8\n"
    result = run_tests(code, tests, timeout_s=3.0, mem_mb=256, max_procs=8)
    assert (result.passed, result.error) == (1, None)


@root_only
def test_fork_bomb_is_contained():
    code = "import os\ndef bomb():\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n"
    result = run_tests(code, "def test_bomb():\n    bomb()\n", timeout_s=1.5, mem_mb=256, max_procs=8)
    assert (result.passed, result.error) == (0, "timeout after 1.5s")
    assert result.duration_s < 3.5


def test_output_is_captured_and_truncated():
    result = run_tests("print('x' * 10000)\nimport sys\nprint('err', file=sys.stderr)\n",
                       "def test_a():\n    pass\n", **FAST)
    assert result.stdout.startswith("x" * 4096)
    assert result.stdout.endswith("[truncated 5905 bytes]")  # 10000 x + newline = 10001 bytes
    assert result.stderr == "err\n"


# ---------------------------------------------------------------- isolation


@root_only
def test_writes_outside_the_work_dir_do_not_reach_the_host():
    escape = f"/tmp/sandbox_escape_{uuid.uuid4().hex}"
    repo_file = os.path.join(os.path.dirname(__file__), f"sandbox_escape_{uuid.uuid4().hex}")
    tests = (f"def test_tmp_write_lands_in_private_tmpfs():\n    open({escape!r}, 'w').write('x')\n"
             "def test_cwd_is_writable():\n    open('local.txt', 'w').write('y')\n"
             f"def test_repo_is_read_only():\n    open({repo_file!r}, 'w').write('x')\n"
             "def test_huge_file_refused():\n    open('big', 'wb').write(bytes(20 * 1024 ** 2))\n"
             "def test_root_home_hidden():\n    import os\n    assert os.listdir('/root') == ['.pyenv']\n")
    result = run_tests("", tests, **FAST)
    # the repo is read-only (PermissionError) or, when the checkout lives under /tmp, hidden behind the private
    # tmpfs (FileNotFoundError): either way the write cannot reach the host
    assert set(result.failures) == {"test_repo_is_read_only", "test_huge_file_refused"}
    assert result.failures["test_repo_is_read_only"] in ("PermissionError", "FileNotFoundError")
    assert result.failures["test_huge_file_refused"] == "OSError"
    assert not os.path.exists(escape)
    assert not os.path.exists(repo_file)
    if os.path.realpath(sys.base_prefix).startswith("/root/"):
        assert result.passed == 3
    else:  # the home overlay only happens for a Python kept under a private home
        assert result.passed >= 2


def test_parent_environment_is_invisible(monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("VLPOST_SANDBOX_SECRET", secret)
    tests = ("import os\n"
             f"def test_own_env_clean():\n    assert sorted(os.environ) == ['LANG', 'PATH']\n"
             "def test_no_process_environ_shows_it():\n    for pid in os.listdir('/proc'):\n"
             "        try:\n            data = open(f'/proc/{pid}/environ', 'rb').read()\n"
             "        except OSError:\n            continue\n"
             f"        assert {secret.encode()!r} not in data, pid\n")
    result = run_tests("", tests, **FAST)
    if IS_ROOT:
        assert (result.passed, result.total) == (2, 2)
    else:  # documented gap: the same user's /proc/<pid>/environ stays readable
        assert result.failures.get("test_own_env_clean") is None


@pytest.mark.parametrize("use_netns", [True, False], ids=["netns", "socket-patch"])
def test_network_is_unreachable(use_netns):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    tests = ("def test_connect_fails():\n    import socket\n    try:\n"
             f"        socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
             "    except OSError:\n        return\n    raise AssertionError('connected')\n")
    try:
        result = run_tests("", tests, use_netns=use_netns, **FAST)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()
    assert (result.passed, result.total) == (1, 1)
    if IS_ROOT:
        assert ("netns" in result.isolation) is use_netns
        assert ("socket-patch" in result.isolation) is not use_netns


@root_only
def test_network_namespace_holds_even_without_the_socket_module():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    parent_netns = os.readlink("/proc/self/ns/net")
    tests = ("import ctypes, os, struct\n"
             "def test_raw_libc_connect_fails():\n    libc = ctypes.CDLL(None)\n"
             "    fd = libc.socket(2, 1, 0)\n    assert fd >= 0\n"
             f"    addr = struct.pack('!HH4s8x', 2, {port}, bytes([127, 0, 0, 1]))\n"
             "    addr = struct.pack('=H', 2) + addr[2:]\n"
             "    assert libc.connect(fd, addr, len(addr)) != 0\n"
             f"def test_other_namespace():\n    assert os.readlink('/proc/self/ns/net') != {parent_netns!r}\n")
    try:
        result = run_tests("", tests, **FAST)
    finally:
        listener.close()
    assert (result.passed, result.total, result.error) == (2, 2, None)


# ---------------------------------------------------------------- forging the result


def test_printed_fake_results_are_ignored():
    code = ("print('passed 3/3')\nprint('{\"passed\": 3, \"total\": 3}')\n"
            "for i in range(3):\n    print(f'0123456789abcdef test {i} 1 -')\n")
    tests = "def test_a():\n    assert False\ndef test_b():\n    assert False\ndef test_c():\n    assert False\n"
    result = run_tests(code, tests, **FAST)
    assert (result.passed, result.total, result.error) == (0, 3, None)


def test_blind_writes_to_every_fd_mark_the_run_tampered():
    code = ("import os\nfor fd in range(3, 1024):\n    try:\n"
            "        os.write(fd, b'deadbeef test 0 1 -\\n')\n    except OSError:\n        pass\n")
    result = run_tests(code, "def test_a():\n    assert False\n", **FAST)
    assert result.passed == 0
    assert result.error.startswith("result channel tampered (line 2: missing nonce)")


def test_patching_the_runners_tools_does_not_flip_failures():
    code = ("import os, builtins, json\n_write = os.write\n"
            "os.write = lambda fd, data: _write(fd, data.replace(b' 0 ', b' 1 '))\n"
            "builtins.enumerate = lambda names: [(0, 'test_ok')] * 3\nbuiltins.len = lambda x: 0\n"
            "json.dumps = lambda *a, **k: 'forged'\n")
    tests = ("def test_ok():\n    pass\ndef test_bad():\n    assert False\ndef test_worse():\n    assert 1 == 2\n")
    result = run_tests(code, tests, **FAST)
    assert (result.passed, result.total, result.error) == (1, 3, None)


def test_forked_copies_of_the_runner_never_report():
    # the child returns the right answer into a copy of the runner; the runner itself exits quietly
    code = "import os\ndef inc(x):\n    if os.fork() == 0:\n        return x + 1\n    os._exit(0)\n"
    result = run_tests(code, "def test_a():\n    assert inc(1) == 2\n", **FAST)
    assert (result.passed, result.error) == (0, "runner exited with code 0 before finishing")


def test_a_hostile_exception_class_cannot_hide_its_failure():
    code = ("import os\nclass Meta(type):\n    @property\n    def __name__(cls):\n        os._exit(0)\n"
            "class Boom(Exception, metaclass=Meta):\n    def __str__(self):\n        os._exit(0)\n"
            "def explode():\n    raise Boom()\n")
    tests = "def test_a():\n    explode()\ndef test_b():\n    pass\n"
    result = run_tests(code, tests, **FAST)
    # the name is read without the metaclass hook, and the record is written before the traceback
    # (whose formatting calls __str__, which exits) is printed
    assert (result.passed, result.failures) == (0, {"test_a": "Boom"})
    assert result.error == "runner exited with code 0 before finishing"


def test_channel_parser_rejects_reordered_or_extra_records():
    nonce, names = "n0", ["test_a", "test_b"]
    good = b"n0 ready uid\nn0 test 0 1 -\nn0 test 1 0 AssertionError\nn0 done\n"
    report = _parse_channel(good, nonce, names)
    assert (report["passes"], report["failures"], report["done"], report["tampered"]) == (
        1, {"test_b": "AssertionError"}, True, None)
    for bad, why in [(b"n0 ready uid\nn0 test 1 1 -\n", "line 2: malformed 'test' record"),
                     (b"n0 test 0 1 -\n", "line 1: unexpected 'test'"),
                     (b"n0 ready uid\nn0 ready uid\n", "line 2: unexpected 'ready'"),
                     (good + b"n0 test 2 1 -\n", "line 5: unexpected 'test'"),
                     (b"n0 ready uid\nn0 test 0 1 -\nn0 test 0 1 -\n", "line 3: malformed 'test' record")]:
        assert _parse_channel(bad, nonce, names)["tampered"] == why
    assert _parse_channel(b"n0 ready uid\nn0 test 0 1 -\nn0 te", nonce, names)["passes"] == 1  # torn tail


def test_broken_runner_setup_raises_instead_of_scoring_zero(monkeypatch):
    monkeypatch.setattr(sandbox, "PYTHON", "/bin/false")  # a runner that dies before reporting "ready"
    with pytest.raises(SandboxError, match=r"before running any code \(runner exited with code 1"):
        run_tests("", "def test_a():\n    pass\n", **FAST)
    with pytest.raises(ValueError, match="mem_mb=8 is below 64"):
        run_tests("", "def test_a():\n    pass\n", timeout_s=1, mem_mb=8)


# ---------------------------------------------------------------- concurrency


def test_concurrent_runs_are_independent():
    code = "def f(x):\n    if x == 0:\n        while True:\n            pass\n    return x * 2\n"

    def grade(i):
        tests = "".join(f"def test_{j}():\n    assert f({j + 1}) == {(j + 1) * 2 if j < i % 4 else -1}\n"
                        for j in range(3))
        tests += "def test_loop():\n    f(0)\n" if i % 4 == 3 else ""
        return run_tests(code, tests, timeout_s=3.0, mem_mb=256)

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(grade, range(8)))
    for i, result in enumerate(results):
        # i % 4 = 0,1,2 -> that many of the 3 asserts are right; 3 -> 3 right, then a loop that times out
        expected_total = 4 if i % 4 == 3 else 3
        assert (result.passed, result.total) == (min(i % 4, 3), expected_total), i
        assert result.error == ("timeout after 3.0s" if i % 4 == 3 else None), i
    assert time.monotonic() - start < 12


# ---------------------------------------------------------------- fallbacks and lifetime


@pytest.mark.parametrize("use_netns", [True, False])
def test_user_mode_fallback_still_contains_network_and_leftovers(monkeypatch, use_netns):
    """The path taken when the parent is not root: no uid switch; session sweep; netns or socket patch."""
    monkeypatch.setattr(sandbox, "_run_uid", lambda: None)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    code = "import subprocess\nsleeper = subprocess.Popen(['sleep', '30'])\nprint(sleeper.pid)\n"
    tests = ("import os, socket\n"
             "def test_cwd_is_the_fresh_work_dir():\n"
             f"    assert os.getcwd().endswith('/work') and {STAGE_PREFIX!r} in os.getcwd()\n"
             "def test_connect_fails():\n    try:\n"
             f"        socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
             "    except OSError:\n        return\n    raise AssertionError('connected')\n")
    try:
        result = run_tests(code, tests, use_netns=use_netns, **FAST)
    finally:
        listener.close()
    assert (result.passed, result.total, result.error) == (2, 2, None)
    expected = {("userns-netns",), ("socket-patch",)} if use_netns else {("socket-patch",)}
    assert result.isolation in expected
    sleeper = int(result.stdout.split()[0])
    assert not psutil.pid_exists(sleeper) or psutil.Process(sleeper).status() == psutil.STATUS_ZOMBIE


def test_runner_dies_with_its_parent():
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = ("from vlpost.train.sandbox import run_tests\n"
              "run_tests('', 'def test_spin():\\n    while True:\\n        pass\\n', timeout_s=60, mem_mb=256)\n")
    before = stage_dirs()
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=repo)
    try:
        deadline = time.monotonic() + 15
        while not any(p.ppid() == parent.pid for p in map(psutil.Process, dict(sandbox_processes()))):
            assert time.monotonic() < deadline, "runner never started"
            time.sleep(0.05)
        parent.send_signal(signal.SIGKILL)  # no chance to clean up: only PR_SET_PDEATHSIG acts
        parent.wait()
        deadline = time.monotonic() + 3
        while sandbox_processes():
            assert time.monotonic() < deadline, sandbox_processes()
            time.sleep(0.05)
    finally:
        parent.kill()
        for stage in stage_dirs() - before:  # the killed parent could not remove its staging dir
            shutil.rmtree(stage)
