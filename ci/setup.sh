#!/usr/bin/env bash
# Prepare a fresh machine for the whole test suite: QEMU 10 (backports),
# hugepages + hugetlbfs mounts, and a virtualenv (.venv) with qemuram and its
# test dependencies.  Idempotent; run as root (CI runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install-qemu.sh
bash ci/setup-hugepages.sh || echo "ci/setup.sh: hugepage setup incomplete (see above)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c 'import qemuram, numpy, pytest, hypothesis, qemu.qmp; print("ci/setup.sh: python env ready, numpy", numpy.__version__)'
