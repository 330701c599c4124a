#!/usr/bin/env python3
"""Make q35-7.2-compress.mig.gz: a real stream with COMPRESS_PAGE records.

QEMU removed the `compress` capability in 9.1, so this uses Debian 12's own
QEMU 7.2 package, unpacked beside the installed QEMU 10 (no install needed):

    apt-get download qemu-system-x86/bookworm && dpkg -x qemu-system-x86_*.deb root
    python3 tests/data/legacy/make_qemu72_compress.py root/usr/bin/qemu-system-x86_64

A paused 64 MiB pc-q35-7.2 guest with 64 KiB of seeded random bytes planted at
0x100000 migrates with `compress` on through `exec:cat > FILE` (7.2 has no
file: URI).  pmemsave of the planted range is checked against the pattern and
the pattern's sha256 is written to compress.json beside the stream.
"""
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from qemu.qmp.legacy import QEMUMonitorProtocol

HERE = os.path.dirname(os.path.abspath(__file__))


def main(qemu: str) -> None:
    work = tempfile.mkdtemp(prefix="qemu72-")
    rnd = random.Random(72)
    pattern = bytes(rnd.getrandbits(8) for _ in range(65536))
    pat = os.path.join(work, "pat.bin")
    with open(pat, "wb") as f:
        f.write(pattern)
    sock = os.path.join(work, "qmp.sock")
    out = os.path.join(work, "stream.mig")
    proc = subprocess.Popen(
        [qemu, "-L", "/usr/share/seabios", "-L", "/usr/share/qemu", "-M", "pc-q35-7.2",
         "-accel", "kvm", "-m", "64", "-S", "-display", "none", "-nodefaults",
         "-device", f"loader,file={pat},addr=0x100000,force-raw=on",
         "-qmp", f"unix:{sock},server=on,wait=on"], stderr=subprocess.DEVNULL)
    while not os.path.exists(sock):
        time.sleep(0.05)
    q = QEMUMonitorProtocol(sock)
    q.connect()
    q.cmd("migrate-set-capabilities", capabilities=[{"capability": "compress", "state": True}])
    q.cmd("migrate-set-parameters", **{"max-bandwidth": 10 ** 10})
    q.cmd("migrate", uri=f"exec:cat > {out}")
    while q.cmd("query-migrate").get("status") not in ("completed", "failed"):
        time.sleep(0.05)
    assert q.cmd("query-migrate")["status"] == "completed"
    dump = os.path.join(work, "pm.bin")
    q.cmd("pmemsave", val=0x100000, size=len(pattern), filename=dump)
    version = q.cmd("query-version")["qemu"]
    q.cmd("quit")
    proc.wait()
    with open(dump, "rb") as f:
        assert f.read() == pattern, "pmemsave differs from the planted pattern"
    raw = open(out, "rb").read()
    with open(os.path.join(HERE, "q35-7.2-compress.mig.gz"), "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0) as g:
            g.write(raw)
    meta = {"qemu_version": f"{version['major']}.{version['minor']}.{version['micro']}",
            "machine": "pc-q35-7.2", "capabilities": ["compress"],
            "stream_sha256": hashlib.sha256(raw).hexdigest(),
            "planted": [{"block": "pc.ram", "block_offset": 0x100000, "length": len(pattern),
                         "sha256": hashlib.sha256(pattern).hexdigest()}]}
    with open(os.path.join(HERE, "compress.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "qemu-system-x86_64")
