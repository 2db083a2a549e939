"""Many concurrent grader calls: every result is right and nothing (process, temp dir) outlives them."""

from __future__ import annotations

import glob
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from vlpost.train.sandbox import RUNNER_MARKER, STAGE_PREFIX, UID_BASE, run_tests

TESTS = "def test_one():\n    assert add(1, 2) == 3\ndef test_two():\n    assert add(-1, 1) == 0\n"
CODES = {
    "pass": ("def add(a, b):\n    return a + b\n", 2),
    "fail": ("def add(a, b):\n    return a + b if a > 0 else 7\n", 1),  # test_one passes, test_two fails
    "loop": ("def add(a, b):\n    while True:\n        pass\n", 0),
    "forkbomb": ("import os\ndef add(a, b):\n    while True:\n        try:\n            os.fork()\n"
                 "        except OSError:\n            pass\n", 0),
}
PLAN = ["pass"] * 12 + ["fail"] * 8 + ["loop"] * 6 + ["forkbomb"] * 6  # 32 calls


def _sandbox_processes() -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid", "uids", "cmdline", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE or info["uids"] is None:
            continue
        if info["uids"].real >= UID_BASE or RUNNER_MARKER in (info["cmdline"] or []):
            found.append(info["pid"])
    return found


def _stage_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), STAGE_PREFIX + "*")))


def _grade(kind: str):
    code, _ = CODES[kind]
    quick = kind in ("loop", "forkbomb")  # these must be cut off; the others get room on a busy machine
    return run_tests(code, TESTS, timeout_s=1.5 if quick else 30.0, mem_mb=256, max_procs=8)


@pytest.mark.skipif(os.geteuid() != 0, reason="fork-bomb containment needs the root sandbox (see sandbox.py)")
def test_32_concurrent_graders_score_right_and_leave_nothing():
    stages_before = _stage_dirs()
    assert _sandbox_processes() == []
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(_grade, PLAN))
    expected_passed = {kind: passed for kind, (_, passed) in CODES.items()}
    for kind, result in zip(PLAN, results):
        assert result.total == 2, kind
        assert result.passed == expected_passed[kind], (kind, result)
        if kind in ("loop", "forkbomb"):
            assert result.error == "timeout after 1.5s", (kind, result.error)
        else:
            assert result.error is None, (kind, result.error)
    assert [r.passed for r in results].count(2) == 12
    assert sum(r.passed for r in results) == 12 * 2 + 8 * 1
    assert psutil.Process().children(recursive=True) == []
    assert _sandbox_processes() == []
    assert _stage_dirs() - stages_before == set()
