"""The benchmark runner's --quick mode as a smoke test (no timing assertions).

It makes tiny streams with real QEMU, runs QEMU's own load and every qemuram
tool on them, and must print its results table with all tools agreeing on
the memory hashes.
"""
import importlib.util
import os

import pytest

try:
    from . import harness as h
except ImportError:  # pragma: no cover
    from tests.integration import harness as h

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _smoke():
    spec = importlib.util.spec_from_file_location(
        "bench_smoke", os.path.join(ROOT, "benchmarks", "smoke_test.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_quick_mode(tmp_path, monkeypatch):
    h.require(h.qemu_available(), "qemu-system-x86_64")
    smoke = _smoke()
    smoke.check(smoke.run_quick())
