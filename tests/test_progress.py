"""Progress is shown on a terminal only, never in pipes (scripts parse our output)."""
import os
import pty
import subprocess
import sys

import pytest

DATA = os.path.join(os.path.dirname(__file__), "data")
# A stream bigger than the 64 MiB progress step (decompressed on the fly).
STREAM = os.path.join(DATA, "q35-mapped-ram.mig.gz")


def _run(stderr_tty: bool):
    if stderr_tty:
        master, slave = pty.openpty()
        p = subprocess.Popen([sys.executable, "-m", "qemuram.cli", "verify", STREAM],
                             stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:          # EIO once the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        out = p.stdout.read()
        p.wait()
        os.close(master)
        return p.returncode, out.decode(), b"".join(chunks).decode(errors="replace")
    r = subprocess.run([sys.executable, "-m", "qemuram.cli", "verify", STREAM],
                       capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def test_progress_on_a_terminal():
    rc, out, err = _run(True)
    assert rc == 0 and "valid mapped-ram stream" in out
    assert "decoding" in err and "MB" in err


def test_no_progress_in_pipes():
    rc, out, err = _run(False)
    assert rc == 0 and "valid mapped-ram stream" in out
    assert err == ""
