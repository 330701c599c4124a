"""Smoke test of the benchmark runner: tiny guests, one round, no timing claims.

Runs ``benchmarks/run.py --quick --cases ...`` with real QEMU and checks that it
exits 0 and prints its results table.  Usable from pytest (``test_quick``) or as
a script (``python benchmarks/smoke_test.py``); needs qemu-system-x86_64.
"""
from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.environ.get("QEMURAM_BENCH_SMOKE_CASES", "quick-random,quick-zero,quick-mapped-ram")


def run_quick(cases: str = CASES, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(HERE, "run.py"), "--quick",
                           "--cases", cases, "--markdown"],
                          capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess, cases: str = CASES) -> None:
    out = proc.stdout
    assert proc.returncode == 0, f"run.py exited {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "x QEMU load" in out and "peak RSS" in out, f"no results table:\n{out}"
    assert "| case | stream | tool |" in out, f"no Markdown table:\n{out}"
    for case in cases.split(","):
        assert case in out, f"case {case} missing from the table:\n{out}"
        assert f"{case}  -          unavailable" not in out, f"case {case} unavailable:\n{out}"
    for tool in ("qemu load", "extract", "verify", "info --hash", "convert ->"):
        assert tool in out, f"tool {tool!r} missing from the table:\n{out}"
    assert "agree: True" in out, f"extract / info --hash / sha256 disagree:\n{out}"


def test_quick():
    import shutil
    import pytest
    if not shutil.which(os.environ.get("QEMURAM_QEMU", "qemu-system-x86_64")):
        pytest.skip("qemu-system-x86_64 not installed")
    check(run_quick())


if __name__ == "__main__":
    proc = run_quick()
    sys.stdout.write(proc.stdout)
    check(proc)
    print("smoke test passed")
