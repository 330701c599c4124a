#!/usr/bin/env python3
"""Make the container fixtures used by tests/test_containers.py.

Everything here is made by the real programs; nothing is assembled by hand:

* qcow2 internal snapshots (QEMU 10.0 ``savevm``):
  ``qemu-img create`` makes a 64 MiB qcow2, a paused q35 64 MiB guest
  (``-S -nodefaults -display none``) with a 16 KiB pattern planted at guest
  physical 0x100000 (``-device loader``) and the image on a virtio-blk device
  takes two snapshots through QMP (``human-monitor-command savevm``), then quits.
  Two images: ``snap-v3.qcow2.gz`` (default: v3, 64 KiB clusters) and
  ``snap-v2-512.qcow2.gz`` (compat=0.10, i.e. v2, with 512-byte clusters, so the
  VM state crosses hundreds of clusters and several L2 tables).
  The reference for every snapshot's VM state is read by QEMU itself:
  ``qemu-img snapshot -a`` on a scratch copy, then ``qemu-io -c "read -b -v"``
  dumps the VM state area; its sha256 and length go into the manifest.

* libvirt save images (Debian 12's libvirt 9.0 ``virsh save``, driving the same
  QEMU): libvirtd runs as root inside a private mount namespace (``unshare -m``)
  whose /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and
  /var/log/libvirt are bind mounts of a scratch directory, with this qemu.conf::

      user = "root"
      group = "root"
      security_driver = "none"
      namespaces = []
      cgroup_controllers = []
      dynamic_ownership = 0
      remember_owner = 0
      stdio_handler = "file"
      save_image_format = "<raw|gzip|bzip2|xz|lzop|zstd>"

  and a libvirtd.conf that puts the sockets in the scratch directory with
  ``auth_unix_rw = "none"``. libvirt 9.0 resolves its compiled-in default user
  ``libvirt-qemu`` before reading qemu.conf, so that system user must exist
  (ci/install-libvirt.sh creates it; so does this script when it is missing).
  Its domain XML needs ``<features><acpi/></features>``: without it libvirt 9.0
  passes ``-no-acpi``, which QEMU 10 no longer accepts. libvirt 9.0 knows no
  zstd save format ("Invalid save image format"), so there is no zstd image;
  the lzop one is real.
  For every format the daemon is (re)started, a transient domain (q35, 64 MiB,
  no disk, the same pattern planted with a ``<qemu:commandline>`` loader) is
  created paused, and ``virsh save`` writes ``libvirt-<format>.sav``. The
  uncompressed one is committed gzip-compressed (``libvirt-raw.sav.gz``), the
  others as written. The reference sha256 of each embedded QEMU stream is
  computed with the external tools (``tail -c +N | gzip -dc`` etc.), not with
  qemuram.

* ``plain.mig.gz``: a plain stream from ``migrate`` to ``file:`` of the same
  paused guest, gzip-compressed.

The manifest ``manifest.json`` records, per fixture, what the tests check.

Usage: python3 tests/data/containers/make_container_fixtures.py [--only qcow2|libvirt|plain]
Needs root, qemu-system-x86_64, qemu-img, qemu-io and (for libvirt) the packages
ci/install-libvirt.sh installs.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
PATTERN_ADDR = 0x100000
PATTERN_LEN = 16 * 1024


def pattern_bytes() -> bytes:
    """16 KiB of deterministic, incompressible, non-zero-page bytes."""
    out = bytearray()
    i = 0
    while len(out) < PATTERN_LEN:
        out += hashlib.sha256(b"qemuram-container-pattern-%d" % i).digest()
        i += 1
    return bytes(out[:PATTERN_LEN])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gzip_file(src: Path, dst: Path) -> None:
    # mtime=0 and no file name: the .gz is reproducible from the same input.
    with open(src, "rb") as fi, open(dst, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as fo:
            shutil.copyfileobj(fi, fo)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def accel_args() -> list:
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        return ["-accel", "kvm", "-accel", "tcg"]
    return ["-accel", "tcg"]


# --------------------------------------------------------------------------- QMP

class QMP:
    """Minimal line-oriented QMP client over a unix socket."""

    def __init__(self, path: str, timeout: float = 30.0):
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(120)
        self.buf = b""
        self._recv()  # greeting
        self.cmd("qmp_capabilities")

    def _recv(self) -> dict:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("QMP connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name: str, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            rep = self._recv()
            if "event" in rep:
                continue
            if "error" in rep:
                raise RuntimeError(f"QMP {name}: {rep['error']}")
            return rep.get("return")

    def hmp(self, line: str) -> str:
        out = self.cmd("human-monitor-command", **{"command-line": line})
        if out and out.strip():
            raise RuntimeError(f"HMP {line!r}: {out.strip()}")
        return out

    def close(self):
        self.sock.close()


def start_guest(work: Path, pat: Path, extra: list) -> tuple:
    qmp_path = work / "qmp.sock"
    if qmp_path.exists():
        qmp_path.unlink()
    cmd = [QEMU, "-machine", "q35", "-m", "64", "-S", "-display", "none",
           "-nodefaults", "-no-user-config", *accel_args(),
           "-device", f"loader,file={pat},addr={PATTERN_ADDR:#x}",
           "-qmp", f"unix:{qmp_path},server=on,wait=off", *extra]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        q = QMP(str(qmp_path))
    except Exception:
        proc.kill()
        print(proc.stdout.read().decode(errors="replace"))
        raise
    return proc, q


def stop_guest(proc, q) -> None:
    try:
        q.cmd("quit")
    except Exception:
        pass
    q.close()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------- qcow2

HEXLINE = re.compile(r"^([0-9a-f]{8}):((?:\s+[0-9a-f]{2}){1,16})\s\s")


def qemu_io_read_vmstate(image: Path, length: int) -> bytes:
    """Read the active layer's VM state area with ``qemu-io read -b -v``."""
    padded = (length + 511) & ~511  # qemu-io wants whole sectors
    out = run(["qemu-io", "-f", "qcow2", "-r", "-c", f"read -b -v 0 {padded}", str(image)],
              stdout=subprocess.PIPE).stdout.decode()
    data = bytearray(padded)
    seen = 0
    for line in out.splitlines():
        m = HEXLINE.match(line)
        if not m:
            continue
        off = int(m.group(1), 16)
        bs = bytes(int(x, 16) for x in m.group(2).split())
        data[off:off + len(bs)] = bs
        seen += len(bs)
    if seen != padded:
        raise RuntimeError(f"qemu-io dumped {seen} bytes, wanted {padded}")
    return bytes(data[:length])


def qemu_img_snapshots(image: Path) -> list:
    info = json.loads(run(["qemu-img", "info", "--output=json", str(image)],
                          stdout=subprocess.PIPE).stdout)
    return info.get("snapshots", [])


def make_qcow2(work: Path, pat: Path, name: str, create_opts: list, manifest: dict) -> None:
    img = work / f"{name}.qcow2"
    if img.exists():
        img.unlink()
    run(["qemu-img", "create", "-f", "qcow2", *create_opts, str(img), "64M"],
        stdout=subprocess.DEVNULL)
    proc, q = start_guest(work, pat, [
        "-drive", f"file={img},if=none,id=d0,format=qcow2",
        "-device", "virtio-blk-pci,drive=d0"])
    try:
        q.hmp("savevm snap1")
        q.hmp("savevm snap2")
    finally:
        stop_guest(proc, q)
    snaps = qemu_img_snapshots(img)
    entry = {"file": f"{name}.qcow2.gz", "create_options": create_opts,
             "virtual_size": 64 << 20, "snapshots": []}
    for s in snaps:
        size = int(s["vm-state-size"])
        scratch = work / f"{name}-apply.qcow2"
        shutil.copyfile(img, scratch)
        run(["qemu-img", "snapshot", "-a", s["name"], str(scratch)])
        data = qemu_io_read_vmstate(scratch, size)
        scratch.unlink()
        if data[:4] != b"QEVM":
            raise RuntimeError(f"{name} {s['name']}: VM state does not start with QEVM")
        entry["snapshots"].append({
            "id": s["id"], "name": s["name"], "vm_state_size": size,
            "date_sec": s.get("date-sec"), "vmstate_sha256": hashlib.sha256(data).hexdigest(),
            "first_bytes_hex": data[:8].hex(), "last_byte_hex": data[-1:].hex()})
    manifest["qcow2"][name] = entry
    gzip_file(img, HERE / entry["file"])
    entry["image_sha256"] = sha256_file(img)
    entry["image_size"] = img.stat().st_size


# ------------------------------------------------------------------------- plain

def make_plain(work: Path, pat: Path, manifest: dict) -> None:
    out = work / "plain.mig"
    if out.exists():
        out.unlink()
    proc, q = start_guest(work, pat, [])
    try:
        q.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        q.cmd("migrate", uri=f"file:{out}")
        for _ in range(600):
            st = q.cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.1)
        if st.get("status") != "completed":
            raise RuntimeError(f"migrate: {st}")
    finally:
        stop_guest(proc, q)
    gzip_file(out, HERE / "plain.mig.gz")
    manifest["plain"] = {"file": "plain.mig.gz", "size": out.stat().st_size,
                         "sha256": sha256_file(out)}


# ----------------------------------------------------------------------- libvirt

FORMATS = ["raw", "gzip", "bzip2", "xz", "lzop", "zstd"]
DECOMPRESS = {"gzip": ["gzip", "-dc"], "bzip2": ["bzip2", "-dc"], "xz": ["xz", "-dc"],
              "lzop": ["lzop", "-dc"], "zstd": ["zstd", "-dc"]}

DOMAIN_XML = """<domain type='{virt}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>qemuram-fixture</name>
  <uuid>5c0e3d3e-6a11-4c36-9e1a-0b0b0b0b0b0b</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{qemu}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='loader,file={pat},addr={addr:#x}'/>
  </qemu:commandline>
</domain>
"""


class Libvirtd:
    """libvirtd as root in a private mount namespace with a private config."""

    BINDS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
             "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}

    def __init__(self, root: Path):
        self.root = root
        self.proc = None
        for sub in (*self.BINDS, "sock"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for target in self.BINDS.values():
            os.makedirs(target, exist_ok=True)  # mount points
        self.uri = f"qemu:///system?socket={root}/sock/libvirt-sock"

    @staticmethod
    def ensure_default_user() -> None:
        # libvirt 9.0 looks up its compiled-in default user before qemu.conf.
        if subprocess.run(["getent", "passwd", "libvirt-qemu"],
                          stdout=subprocess.DEVNULL).returncode != 0:
            for grp in ("kvm", "libvirt-qemu"):
                if subprocess.run(["getent", "group", grp],
                                  stdout=subprocess.DEVNULL).returncode != 0:
                    run(["groupadd", "-r", grp])
            run(["useradd", "-r", "-g", "libvirt-qemu", "-G", "kvm", "-d", "/var/lib/libvirt",
                 "-s", "/usr/sbin/nologin", "libvirt-qemu"])

    def start(self, save_format: str) -> None:
        etc = self.root / "etc"
        (etc / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.root}/sock"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            f'log_outputs = "3:file:{self.root}/libvirtd.log"\n')
        (etc / "qemu.conf").write_text(
            'user = "root"\ngroup = "root"\nsecurity_driver = "none"\n'
            'namespaces = []\ncgroup_controllers = []\n'
            'dynamic_ownership = 0\nremember_owner = 0\nstdio_handler = "file"\n'
            f'save_image_format = "{save_format}"\n')
        if Path("/etc/libvirt/libvirt.conf").exists() and not (etc / "libvirt.conf").exists():
            shutil.copyfile("/etc/libvirt/libvirt.conf", etc / "libvirt.conf")
        script = "".join(f"mount --bind {self.root / sub} {target} || exit 1\n"
                         for sub, target in self.BINDS.items())
        script += "exec libvirtd -f /etc/libvirt/libvirtd.conf\n"
        sock = self.root / "sock" / "libvirt-sock"
        if sock.exists():
            sock.unlink()
        self.proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script],
                                     start_new_session=True)
        for _ in range(300):
            if sock.exists() and self.virsh("version", check=False).returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("libvirtd did not come up; see " + str(self.root / "libvirtd.log"))

    def virsh(self, *args, check=True) -> subprocess.CompletedProcess:
        r = subprocess.run(["virsh", "-c", self.uri, *args],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {r.stderr.strip()}")
        return r

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def stream_sha256_external(path: Path, offset: int, fmt: str) -> tuple:
    """sha256 and length of the QEMU stream at ``offset``, decompressed by the
    real tool for ``fmt``."""
    tail = subprocess.Popen(["tail", "-c", f"+{offset + 1}", str(path)], stdout=subprocess.PIPE)
    src = tail.stdout
    dec = None
    if fmt != "raw":
        dec = subprocess.Popen(DECOMPRESS[fmt], stdin=tail.stdout, stdout=subprocess.PIPE)
        tail.stdout.close()
        src = dec.stdout
    h = hashlib.sha256()
    n = 0
    first = b""
    for chunk in iter(lambda: src.read(1 << 20), b""):
        if not first:
            first = chunk[:8]
        h.update(chunk)
        n += len(chunk)
    for p in (tail, dec):
        if p is not None and p.wait() != 0 and p is dec:
            raise RuntimeError(f"{DECOMPRESS[fmt]} failed on {path}")
    return h.hexdigest(), n, first


def make_libvirt(work: Path, pat: Path, manifest: dict) -> None:
    Libvirtd.ensure_default_user()
    d = Libvirtd(work / "libvirt")
    virt = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
    xml = work / "domain.xml"
    xml.write_text(DOMAIN_XML.format(virt=virt, qemu=QEMU, pat=pat, addr=PATTERN_ADDR))
    manifest["libvirt"] = {"version": subprocess.run(["libvirtd", "--version"], text=True,
                                                     stdout=subprocess.PIPE).stdout.strip(),
                           "images": {}, "unsupported": []}
    for fmt in FORMATS:
        label = fmt
        if fmt != "raw" and shutil.which(DECOMPRESS[fmt][0]) is None:
            print(f"skipping {fmt}: no {DECOMPRESS[fmt][0]}")
            continue
        out = work / f"libvirt-{label}.sav"
        if out.exists():
            out.unlink()
        d.start(fmt)
        try:
            d.virsh("create", "--paused", str(xml))
            r = d.virsh("save", "qemuram-fixture", str(out), check=False)
            if r.returncode != 0:
                d.virsh("destroy", "qemuram-fixture", check=False)
        finally:
            d.stop()
        if r.returncode != 0:
            if "Invalid save image format" in r.stderr:
                # e.g. zstd is newer than libvirt 9.0
                print(f"skipping {fmt}: this libvirt does not know it")
                manifest["libvirt"]["unsupported"].append(fmt)
                continue
            raise RuntimeError(f"virsh save ({fmt}): {r.stderr}")
        raw = out.read_bytes()[:92]
        data_len = int.from_bytes(raw[20:24], "little")
        sha, n, first = stream_sha256_external(out, 92 + data_len, fmt)
        if first[:4] != b"QEVM":
            raise RuntimeError(f"{out}: embedded stream does not start with QEVM")
        if fmt == "raw":
            dest = f"libvirt-{label}.sav.gz"
            gzip_file(out, HERE / dest)
        else:
            dest = f"libvirt-{label}.sav"
            shutil.copyfile(out, HERE / dest)
        manifest["libvirt"]["images"][label] = {
            "file": dest, "size": out.stat().st_size, "data_len": data_len,
            "format": fmt, "stream_offset": 92 + data_len,
            "magic": raw[:16].decode("latin-1"),
            "version": int.from_bytes(raw[16:20], "little"),
            "was_running": int.from_bytes(raw[24:28], "little"),
            "compression_id": int.from_bytes(raw[28:32], "little"),
            "cookie_offset": int.from_bytes(raw[32:36], "little"),
            "stream_sha256": sha, "stream_size": n, "domain_name": "qemuram-fixture"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["qcow2", "libvirt", "plain"], action="append")
    ap.add_argument("--work", help="scratch directory (default: a new temporary one)")
    args = ap.parse_args()
    only = set(args.only or ["qcow2", "libvirt", "plain"])
    work = Path(args.work or tempfile.mkdtemp(prefix="qemuram-containers-"))
    work.mkdir(parents=True, exist_ok=True)
    mpath = HERE / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {}
    manifest.setdefault("qcow2", {})
    pat_data = pattern_bytes()
    pat = work / "pat.bin"
    pat.write_bytes(pat_data)
    manifest["pattern"] = {"addr": PATTERN_ADDR, "length": PATTERN_LEN,
                           "sha256": hashlib.sha256(pat_data).hexdigest(),
                           "recipe": "concat sha256(b'qemuram-container-pattern-%d' % i), i=0.."}
    manifest["qemu"] = subprocess.run([QEMU, "--version"], text=True,
                                      stdout=subprocess.PIPE).stdout.splitlines()[0]
    if "qcow2" in only:
        make_qcow2(work, pat, "snap-v3", [], manifest)
        make_qcow2(work, pat, "snap-v2-512", ["-o", "compat=0.10,cluster_size=512"], manifest)
    if "plain" in only:
        make_plain(work, pat, manifest)
    if "libvirt" in only:
        make_libvirt(work, pat, manifest)
    mpath.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print("wrote", mpath)
    return 0


if __name__ == "__main__":
    sys.exit(main())
