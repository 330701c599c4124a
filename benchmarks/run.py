#!/usr/bin/env python3
"""Benchmark qemuram against QEMU's own load of the same migration stream.

    python benchmarks/run.py [--quick] [--rounds N] [--cases a,b] [--cache DIR]
                             [--markdown] [--json FILE] [--profile] [--list]

Streams are made with real QEMU (tests/integration/harness.py) and cached under
``benchmarks/cache/`` (git-ignored), keyed by the case's parameters and the
QEMU version.  For every case, each round runs, one after the other:

  qemu load          a fresh ``-incoming defer`` destination; wall time from
                     ``migrate-incoming file:STREAM`` to query-migrate saying
                     "completed" (QEMU's incoming side reports no total-time)
  extract            ``python -m qemuram.cli extract STREAM -o DIR``
  sha256 (bound)     ``openssl dgst -sha256`` (``sha256sum`` when there is no
                     openssl) of the extracted block files: exactly the bytes
                     ``info --hash`` hashes, a bound for it and a correctness check
  verify             ``qemuram verify STREAM``
  info --hash        ``qemuram info --hash --json STREAM``
  convert ->LAYOUT   ``qemuram convert STREAM OUT --to`` the other layout
  convert ->BACK     the previous output converted back to the input's layout

Rounds are interleaved (round 1 of every case, then round 2, ...).  Page cache:
before every measurement the input file is read once (so QEMU and qemuram both
read a warm page cache), and dirty pages from the previous step are synced.
qemuram writes its scratch files under /tmp/bench-work (TMPDIR for the tools).

Peak RSS is GNU time's %M for the child (it counts touched pages of
memory-mapped files too); "peak anon" samples RssAnon from /proc every 20 ms.
For QEMU it is the destination's VmHWM (guest RAM included).

``--quick`` runs tiny guests, one round: a smoke test, no timing claims.
``--profile`` additionally samples the slowest qemuram command of each case
with py-spy (native frames on) and writes a text summary to benchmarks/profiles/.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
WORK = os.environ.get("QEMURAM_BENCH_WORK", "/tmp/bench-work")
CHUNK = 256 * MiB            # largest single -device loader file
CACHE_VERSION = 1            # bump when the way streams are made changes

# --------------------------------------------------------------------------- cases
#
# kind: "random" (paused guest, random data planted with -device loader),
#       "live-xbzrle" (running guest dirtying memory, XBZRLE, several iterations)
# plant: [(guest-physical address, bytes)], each filled with seeded random data
# caps: migration capabilities of source and destination

def _few_pages_16g():
    return [(a, 4096) for a in (0x1000000, 0x40000000, 0x7ff00000, 0x100000000,
                                0x200000000, 0x300000000, 0x47ffff000)] + [(0x180000000, 64 * KiB)]


CASES: Dict[str, dict] = {
    "random-1g-in-2g": dict(kind="random", memory=2 * GiB, plant=[(0x10000000, 1 * GiB)],
                           note="q35 2 GiB, 1 GiB random, paused"),
    "random-1g-in-2g-mapped-ram": dict(kind="random", memory=2 * GiB,
                                      plant=[(0x10000000, 1 * GiB)], caps=["mapped-ram"],
                                      note="case 1 written with mapped-ram"),
    "random-3g-in-4g": dict(kind="random", memory=4 * GiB,
                           plant=[(0x20000000, 1536 * MiB), (0x100000000, 1536 * MiB)],
                           note="q35 4 GiB, 3 GiB random below 2 GiB and above 4 GiB"),
    "zero-16g": dict(kind="random", memory=16 * GiB, plant=_few_pages_16g(),
                     note="q35 16 GiB, 8 random pages + 64 KiB: millions of ZERO records"),
    "xbzrle-live": dict(kind="live-xbzrle", memory=512 * MiB, plant=[(0x10000000, 128 * MiB)],
                        dirty=(0x200000, 64 * MiB), syncs=40, accel="tcg",
                        note="running TCG guest dirtying memory, XBZRLE, 40+ iterations"),
    "xbzrle-heavy": dict(kind="live-xbzrle", memory=512 * MiB, plant=[], workload="own",
                         dirty=(0x200000, 64 * MiB), syncs=10, accel="tcg",
                         note="running TCG guest rewriting 64 MiB (own loop): ~140k XBZRLE "
                              "records, the per-record stress test"),
    "scale-0.5g": dict(kind="random", memory=1 * GiB, plant=[(0x10000000, 512 * MiB)],
                       series="scale", x=0.5),
    "scale-1g": dict(alias="random-1g-in-2g", series="scale", x=1),
    "scale-2g": dict(kind="random", memory=4 * GiB,
                     plant=[(0x20000000, 1 * GiB), (0x100000000, 1 * GiB)], series="scale", x=2),
    "scale-4g": dict(kind="random", memory=8 * GiB,
                     plant=[(0x20000000, 1536 * MiB), (0x100000000, 2560 * MiB)],
                     series="scale", x=4),
    # --quick: tiny guests for a smoke test
    "quick-random": dict(kind="random", memory=128 * MiB, plant=[(0x1000000, 32 * MiB)],
                         quick=True),
    "quick-mapped-ram": dict(kind="random", memory=128 * MiB, plant=[(0x1000000, 32 * MiB)],
                             caps=["mapped-ram"], quick=True),
    "quick-zero": dict(kind="random", memory=256 * MiB,
                       plant=[(0x1000000, 4096), (0x8000000, 4096)], quick=True),
    "quick-xbzrle": dict(kind="live-xbzrle", memory=128 * MiB, plant=[(0x1000000, 8 * MiB)],
                         dirty=(0x200000, 16 * MiB), syncs=6, accel="tcg", quick=True),
}
FULL_DEFAULT = [n for n, c in CASES.items() if not c.get("quick")]
QUICK_DEFAULT = [n for n, c in CASES.items() if c.get("quick")]


def resolve(name: str) -> Tuple[str, dict]:
    c = CASES[name]
    while "alias" in c:
        name = c["alias"]
        c = CASES[name]
    return name, c


# --------------------------------------------------------------------------- utilities

def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def human(n: Optional[float], unit: str = "B") -> str:
    if n is None:
        return "-"
    for suffix, div in (("G", GiB), ("M", MiB), ("K", KiB)):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}i{unit}"
    return f"{n:.0f} {unit}"


def fmt_s(t: Optional[float]) -> str:
    if t is None:
        return "-"
    return f"{t:.3f} s" if t < 10 else f"{t:.2f} s" if t < 100 else f"{t:.1f} s"


def warm(path: str) -> None:
    """Read a file (or every file under a directory) once, into the page cache."""
    paths = [path]
    if os.path.isdir(path):
        paths = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    buf = bytearray(8 * MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def rm(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def disk_usage(path: str) -> int:
    total = 0
    for d, _, fs in os.walk(path):
        for f in fs:
            try:
                total += os.lstat(os.path.join(d, f)).st_blocks * 512
            except OSError:
                pass
    return total


def qemu_version_line() -> str:
    from tests.integration.harness import qemu_binary
    b = qemu_binary()
    if not b:
        return "none"
    out = subprocess.run([b, "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0].strip() if out.stdout else "unknown"


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    import numpy
    from tests.integration.harness import kvm_usable
    qv = qemu_version_line()
    m = re.search(r"version (\S+)", qv)
    return (f"{cpu}, {os.cpu_count()} cores, {mem / GiB:.0f} GiB RAM, Linux "
            f"{platform.release()}, Python {platform.python_version()}, numpy "
            f"{numpy.__version__}, QEMU {m.group(1) if m else qv} "
            f"({'KVM' if kvm_usable() else 'TCG'}); {datetime.date.today().isoformat()}")


# --------------------------------------------------------------------------- measured child

TIME_BIN = "/usr/bin/time"


class Measured:
    """A measured child process.

    Peak RSS comes from GNU time (``/usr/bin/time -f %M``) when installed, else
    from the sampled VmHWM: the ru_maxrss that os.wait4 reports for a child
    forked straight from this (large) Python process is never below this
    process's own RSS at fork time, since Linux carries the high-water mark
    over exec.  RssAnon is sampled every 20 ms from /proc."""

    def __init__(self, cmd: List[str], env=None, cwd=None, stdout_path=None):
        self.cmd = cmd
        self.env = env
        self.cwd = cwd
        self.stdout_path = stdout_path or os.path.join(WORK, "child.out")
        self.stderr_path = self.stdout_path + ".err"
        self.rusage_path = self.stdout_path + ".rusage"

    @staticmethod
    def _child_of(pid: int) -> Optional[int]:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = f.read().split()
            return int(kids[0]) if kids else None
        except (OSError, ValueError):
            return None

    def run(self, timeout: float = 3600) -> dict:
        peak = {"anon": 0, "hwm": 0}
        use_time = os.access(TIME_BIN, os.X_OK)
        cmd = ([TIME_BIN, "-f", "%M %U %S %R %F", "-o", self.rusage_path, *self.cmd]
               if use_time else self.cmd)
        rm(self.rusage_path)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=out, stderr=err, env=self.env, cwd=self.cwd,
                                 stdin=subprocess.DEVNULL)
            stop = threading.Event()

            def sample():
                target = None
                while not stop.is_set():
                    if target is None:
                        target = self._child_of(p.pid) if use_time else p.pid
                    if target is not None:
                        try:
                            with open(f"/proc/{target}/status") as f:
                                for line in f:
                                    if line.startswith("RssAnon:"):
                                        peak["anon"] = max(peak["anon"], int(line.split()[1]) * KiB)
                                    elif line.startswith("VmHWM:"):
                                        peak["hwm"] = max(peak["hwm"], int(line.split()[1]) * KiB)
                        except (OSError, ValueError):
                            pass
                    stop.wait(0.02)

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            stop.set()
            th.join()
            p.returncode = os.waitstatus_to_exitcode(status)
        with open(self.stdout_path, "rb") as f:
            stdout = f.read().decode("utf-8", "replace")
        with open(self.stderr_path, "rb") as f:
            stderr = f.read().decode("utf-8", "replace")
        r = {"wall": wall, "rc": p.returncode, "maxrss": peak["hwm"] or None,
             "anon": peak["anon"] or None, "user": ru.ru_utime, "sys": ru.ru_stime,
             "minflt": ru.ru_minflt, "majflt": ru.ru_majflt, "stdout": stdout, "stderr": stderr}
        if use_time:
            try:
                with open(self.rusage_path) as f:
                    last = f.read().strip().splitlines()[-1].split()
                r.update(maxrss=int(last[0]) * KiB, user=float(last[1]), sys=float(last[2]),
                         minflt=int(last[3]), majflt=int(last[4]))
            except (OSError, ValueError, IndexError):
                pass
        return r


LIB_DIR = REPO          # where the measured qemuram package is imported from
LIB_DESC = "work tree"


def snapshot_library(which: str) -> None:
    """Freeze the qemuram package measured by this run (others may be editing
    the work tree meanwhile): "worktree" copies the work tree's qemuram/,
    "head" exports the committed one, "live" uses the work tree as it changes,
    anything else is a directory holding a qemuram/ package."""
    global LIB_DIR, LIB_DESC
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or "?"
        dirty = bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain", "qemuram"],
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        head, dirty = "?", False
    if which == "live":
        LIB_DIR, LIB_DESC = REPO, f"work tree at {head}{'+changes' if dirty else ''} (live)"
        return
    if which not in ("worktree", "head"):
        LIB_DIR, LIB_DESC = os.path.abspath(which), f"qemuram from {which}"
        return
    dest = os.path.join(WORK, f"lib-{os.getpid()}")
    rm(dest)
    os.makedirs(dest)
    if which == "head":
        git = subprocess.Popen(["git", "-C", REPO, "archive", "HEAD", "qemuram"],
                               stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", dest], stdin=git.stdout, check=True)
        git.wait()
        LIB_DESC = f"commit {head}"
    else:
        shutil.copytree(os.path.join(REPO, "qemuram"), os.path.join(dest, "qemuram"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        LIB_DESC = f"work tree at {head}{' with uncommitted changes' if dirty else ''}"
    LIB_DIR = dest


def tool_env() -> dict:
    env = dict(os.environ)
    env["TMPDIR"] = os.path.join(WORK, "tmp")
    env["PYTHONPATH"] = LIB_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                   else "")
    return env


def qemuram_cmd(*args: str) -> List[str]:
    return [sys.executable, "-m", "qemuram.cli", *args]


# --------------------------------------------------------------------------- stream making

def plant_file(addr: int, size: int) -> str:
    """A file of seeded random bytes for guest address ``addr`` (reused across cases)."""
    import numpy as np
    d = os.path.join(WORK, "plant")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"plant-{addr:x}-{size:x}.bin")
    if not os.path.exists(path) or os.path.getsize(path) != size:
        rng = np.random.default_rng(addr)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            left = size
            while left:
                n = min(left, 64 * MiB)
                f.write(rng.bytes(n))
                left -= n
        os.replace(tmp, path)
    return path


def loader_args(plant: List[Tuple[int, int]]) -> List[str]:
    args = []
    for addr, size in plant:
        off = 0
        while off < size:
            n = min(CHUNK, size - off)
            args += ["-device", f"loader,file={plant_file(addr + off, n)},addr={addr + off:#x},"
                                "force-raw=on"]
            off += n
    return args


def multiboot_kernel(start: int, end: int, load: int = 0x100000) -> bytes:
    """A multiboot (a.out kludge) kernel for ``-kernel``: in 32-bit protected
    mode it loops forever writing a sweep counter to every 64th byte of
    [start, end).  Each sweep changes one byte in 64 of every page: a good
    XBZRLE delta.  (Real-mode code is emulated very slowly under nested KVM,
    and the mode switch hangs there, so SeaBIOS's multiboot loader does it.)"""
    code = bytearray(b"\x31\xDB")                                # xor ebx,ebx
    outer = len(code)
    code += b"\xBF" + struct.pack("<I", start)                   # mov edi,start
    inner = len(code)
    code += b"\x89\x1F\x83\xC7\x40"                              # mov [edi],ebx; add edi,64
    code += b"\x81\xFF" + struct.pack("<I", end)                 # cmp edi,end
    code += b"\x72" + bytes([(inner - (len(code) + 2)) & 0xFF])  # jb inner
    code += b"\x43"                                              # inc ebx
    code += b"\xEB" + bytes([(outer - (len(code) + 2)) & 0xFF])  # jmp outer
    magic, flags = 0x1BADB002, 0x00010000
    hdr = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF,
                      load, load, 0, 0, load + 32)
    return hdr + bytes(code)


def workload(c: dict) -> Tuple[str, bytes, str]:
    """(QEMU option, image, description) of the live case's guest program.

    tests/integration/workload (another part of this project) when it is there
    and builds: a -bios image rewriting an 8 MiB region in three XBZRLE-shaped
    zones; else this file's own multiboot loop over ``c["dirty"]``."""
    try:
        if c.get("workload") == "own":
            raise LookupError("own loop asked for")
        from tests.integration.workload import build as wb
        return "-bios", wb.build(), "tests/integration/workload -bios image"
    except Exception as exc:  # noqa: BLE001 - absent or mid-edit: use our own
        start, size = c["dirty"]
        return ("-kernel", multiboot_kernel(start, start + size),
                f"benchmarks multiboot loop over {human(size)} ({type(exc).__name__})")


def case_key(c: dict, qemu: str) -> str:
    params = {k: c.get(k) for k in ("kind", "memory", "plant", "caps", "dirty", "syncs", "accel")}
    if c.get("workload"):
        params["workload_kind"] = c["workload"]
    if c.get("kind") == "live-xbzrle":
        params["workload"] = hashlib.sha256(workload(c)[1]).hexdigest()
    blob = json.dumps([CACHE_VERSION, params, qemu], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def case_dir(cache: str, name: str, c: dict, qemu: str) -> str:
    mem = f"{c['memory'] // MiB}m"
    caps = "-" + "-".join(c["caps"]) if c.get("caps") else ""
    return os.path.join(cache, f"{c['kind']}-{mem}{caps}-{case_key(c, qemu)}")


def guest_extra(c: dict, d: str) -> List[str]:
    """Extra QEMU arguments that source and destination must share."""
    if c["kind"] == "live-xbzrle":
        with open(os.path.join(d, "workload.json")) as f:
            return [json.load(f)["option"], os.path.join(d, "workload.bin")]
    return []


def expected_size(c: dict) -> int:
    data = sum(s for _, s in c.get("plant", []))
    if c["kind"] == "live-xbzrle":
        return data + c["dirty"][1] * 2
    return int(data * 1.003) + c["memory"] // 4096 * 9


def evict(cache: str, need: int, limit: int, keep: set) -> None:
    if not os.path.isdir(cache):
        return
    entries = []
    for e in os.listdir(cache):
        p = os.path.join(cache, e)
        if os.path.isdir(p) and p not in keep:
            meta = os.path.join(p, "meta.json")
            used = os.path.getmtime(meta) if os.path.exists(meta) else 0
            entries.append((used, p))
    usage = disk_usage(cache)
    for _, p in sorted(entries):
        if usage + need <= limit:
            break
        size = disk_usage(p)
        log(f"cache over {human(limit)}: evicting {os.path.basename(p)} ({human(size)})")
        rm(p)
        usage -= size


def make_stream(name: str, c: dict, d: str) -> dict:
    from tests.integration.harness import Guest
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "stream.mig")
    tmp = path + ".part"
    rm(tmp)
    t0 = time.monotonic()
    log(f"{name}: making stream with QEMU ({human(c['memory'])} guest, "
        f"{human(sum(s for _, s in c.get('plant', [])))} planted) -> {d}")
    extra = loader_args(c.get("plant", []))
    info: dict = {}
    if c["kind"] == "random":
        timeout = 120 + c["memory"] / GiB * 60
        with Guest(machine="q35", memory=c["memory"], paused=True, extra_args=extra,
                   accel=c.get("accel", "auto"), start_timeout=300) as g:
            if c.get("caps"):
                g.set_capabilities({k: True for k in c["caps"]})
            info = g.save(tmp, timeout=timeout)
            accel = g.accel
    elif c["kind"] == "live-xbzrle":
        option, image, desc = workload(c)
        with open(os.path.join(d, "workload.bin"), "wb") as f:
            f.write(image)
        with open(os.path.join(d, "workload.json"), "w") as f:
            json.dump({"option": option, "description": desc}, f)
        log(f"{name}: guest program: {desc}")
        for attempt in range(3):
            rm(tmp)
            try:
                # less bandwidth on each retry: a lower switch-over threshold
                info, accel = _live_xbzrle(c, d, tmp, option, extra,
                                           bandwidth=(256, 32, 4)[attempt] * MiB)
                break
            except _Converged as exc:
                log(f"{name}: attempt {attempt + 1}: {exc}")
        else:
            raise RuntimeError(f"the live migration sent no XBZRLE page in 3 attempts")
    else:
        raise ValueError(c["kind"])
    os.replace(tmp, path)
    meta = {"case": name, "params": {k: v for k, v in c.items() if k != "note"},
            "qemu": qemu_version_line(), "accel": accel, "made": time.time(),
            "make_seconds": round(time.monotonic() - t0, 1),
            "stream_size": os.path.getsize(path),
            "source_migration": {k: v for k, v in info.items() if k in ("total-time", "downtime",
                                                                         "ram", "xbzrle-cache")}}
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    log(f"{name}: stream {human(meta['stream_size'])} made in {meta['make_seconds']} s")
    return meta


class _Converged(RuntimeError):
    pass


def _live_xbzrle(c: dict, d: str, tmp: str, option: str, extra: List[str],
                 bandwidth: int = 256 * MiB):
    from tests.integration.harness import Guest
    with Guest(machine="q35", memory=c["memory"], paused=False,
               extra_args=extra + guest_extra(c, d), accel=c.get("accel", "auto")) as g:
        if option == "-bios":
            from tests.integration.workload import build as wb
            probe, ready = wb.STATUS_ADDR, lambda v: int.from_bytes(v, "little") >= 3
        else:
            probe, ready = c["dirty"][0] + c["dirty"][1] - 64, lambda v: v != bytes(4)
        deadline = time.monotonic() + 120
        while not ready(g.pmemsave(probe, 4)):        # a few passes done
            if time.monotonic() > deadline:
                raise RuntimeError("the dirtying workload did not start within 120 s")
            time.sleep(0.05)
        time.sleep(0.5)
        g.set_capabilities(xbzrle=True)
        # a modest bandwidth keeps bandwidth x downtime-limit (the switch-over
        # threshold) far below the dirty set, so QEMU keeps iterating
        g.set_parameters(downtime_limit=1, xbzrle_cache_size=256 * MiB,
                         max_bandwidth=bandwidth)
        g.migrate(f"file:{tmp}")
        deadline = time.monotonic() + 600
        while True:
            q = g.query_migrate()
            if q.get("status") in ("completed", "failed", "cancelled"):
                break
            if q.get("ram", {}).get("dirty-sync-count", 0) >= c["syncs"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("live migration did not reach the wanted iterations")
            time.sleep(0.01)
        g.set_parameters(downtime_limit=600000, max_bandwidth=1 << 40)   # converge now
        info = g.wait_migration(300)
        if not info.get("xbzrle-cache", {}).get("pages"):
            raise _Converged("no XBZRLE page: QEMU converged after "
                             f"{info.get('ram', {}).get('dirty-sync-count')} syncs")
        return info, g.accel


def ensure_stream(name: str, cache: str, qemu: str, limit: int, keep: set) -> Tuple[str, dict]:
    real, c = resolve(name)
    d = case_dir(cache, real, c, qemu)
    path = os.path.join(d, "stream.mig")
    meta_path = os.path.join(d, "meta.json")
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        os.utime(meta_path)
        return d, meta
    rm(d)
    evict(cache, expected_size(c), limit, keep)
    return d, make_stream(real, c, d)


# --------------------------------------------------------------------------- measurements

def measure_qemu_load(c: dict, d: str, meta: dict) -> dict:
    from tests.integration.harness import Guest
    path = os.path.join(d, "stream.mig")
    with Guest(machine="q35", memory=c["memory"], incoming=True, paused=True,
               extra_args=guest_extra(c, d), accel=meta.get("accel") or "auto",
               start_timeout=300) as g:
        if c.get("caps"):
            g.set_capabilities({k: True for k in c["caps"]})
        os.sync()
        warm(path)
        cpu0 = proc_cpu(g.pid)
        t0 = time.perf_counter()
        g.migrate_incoming(f"file:{path}")
        while True:
            q = g.query_migrate()
            st = q.get("status")
            if st == "completed":
                break
            if st in ("failed", "cancelled") or not g.alive():
                raise RuntimeError(f"QEMU load {st}: {q.get('error-desc')}")
            if time.perf_counter() - t0 > 3600:
                raise RuntimeError("QEMU load did not finish within an hour")
            time.sleep(0.002)
        wall = time.perf_counter() - t0
        cpu1 = proc_cpu(g.pid)
        hwm = None
        try:
            with open(f"/proc/{g.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        hwm = int(line.split()[1]) * KiB
        except OSError:
            pass
        total = q.get("total-time")
    return {"wall": wall, "rc": 0, "maxrss": hwm, "anon": None, "user": cpu1[0] - cpu0[0],
            "sys": cpu1[1] - cpu0[1], "load": os.getloadavg()[0],
            "qemu_total_time": total / 1000 if total is not None else None}


def proc_cpu(pid: int) -> Tuple[float, float]:
    """(user, system) CPU seconds of a process, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def run_tool(cmd: List[str], warm_path: Optional[str], label: str) -> dict:
    os.sync()
    if warm_path:
        warm(warm_path)
    r = Measured(cmd, env=tool_env()).run()
    r["load"] = os.getloadavg()[0]
    if r["rc"] != 0:
        raise RuntimeError(f"{label} exited {r['rc']}: {r['stderr'].strip()[-2000:]}")
    return r


def hash_command() -> List[str]:
    """The hashing bound: OpenSSL's SHA-256 (SHA-NI/AVX2 code, the same that
    Python's hashlib uses) when installed; coreutils sha256sum otherwise (9.1
    has no SHA-NI path: about 7x slower, so a loose bound)."""
    if os.environ.get("QEMURAM_BENCH_HASHER") != "sha256sum" and shutil.which("openssl"):
        return ["openssl", "dgst", "-sha256", "-r"]
    return ["sha256sum"]


TOOLS = ["qemu load", "extract", "sha256 (bound)", "verify", "info --hash",
         "convert ->other", "convert ->back"]


def one_round(name: str, c: dict, d: str, meta: dict, rnd: int, checks: dict) -> Dict[str, dict]:
    stream = os.path.join(d, "stream.mig")
    layout = "mapped-ram" if "mapped-ram" in (c.get("caps") or []) else "sequential"
    other = "sequential" if layout == "mapped-ram" else "mapped-ram"
    scratch = os.path.join(WORK, "run", name)
    rm(scratch)
    os.makedirs(scratch)
    os.makedirs(os.path.join(WORK, "tmp"), exist_ok=True)
    res: Dict[str, dict] = {}
    res["qemu load"] = measure_qemu_load(c, d, meta)
    out = os.path.join(scratch, "extract")
    res["extract"] = run_tool(qemuram_cmd("extract", stream, "-o", out), stream, "extract")
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    files = [os.path.join(out, b["file"]) for b in manifest["ramblocks"]]
    hasher = hash_command()
    res["sha256 (bound)"] = run_tool([*hasher, *files], out, "sha256 bound")
    bound = {}
    for line in res["sha256 (bound)"]["stdout"].splitlines():
        h, _, f = line.partition(" ")
        bound[f.strip().lstrip("*")] = h
    res["sha256 (bound)"]["bytes"] = sum(os.path.getsize(f) for f in files)
    res["sha256 (bound)"]["label"] = f"{os.path.basename(hasher[0])} sha256 (bound)"
    rm(out)
    res["verify"] = run_tool(qemuram_cmd("verify", stream), stream, "verify")
    res["info --hash"] = run_tool(qemuram_cmd("info", "--hash", "--json", stream), stream,
                                  "info --hash")
    info = json.loads(res["info --hash"]["stdout"])
    hashes_ok = all(bound.get(os.path.join(out, m["file"])) == i["sha256"]
                    == m.get("sha256", i["sha256"])
                    for m, i in zip(manifest["ramblocks"], info["ramblocks"]))
    conv = os.path.join(scratch, f"conv.{other}")
    back = os.path.join(scratch, f"back.{layout}")
    res["convert ->other"] = run_tool(qemuram_cmd("convert", stream, conv, "--to", other),
                                      stream, "convert")
    res["convert ->other"]["label"] = f"convert ->{other}"
    res["convert ->back"] = run_tool(qemuram_cmd("convert", conv, back, "--to", layout),
                                     conv, "convert back")
    res["convert ->back"]["label"] = f"convert ->{layout}"
    if rnd == 0:
        same = subprocess.run(["cmp", "-s", stream, back]).returncode == 0
        checks.update(hashes_match=hashes_ok, roundtrip_identical=same,
                      converted_size=os.path.getsize(conv), records=_counts(info))
    else:
        checks["hashes_match"] = checks.get("hashes_match", True) and hashes_ok
    rm(scratch)
    for r in res.values():
        r.pop("stdout", None)
        r.pop("stderr", None)
    return res


def _counts(info: dict) -> dict:
    tot: Dict[str, int] = {}
    for b in info["ramblocks"]:
        for k, v in b["records"].items():
            tot[k] = tot.get(k, 0) + v
    return tot


# --------------------------------------------------------------------------- profiling

def summarize_raw(raw_path: str, top: int = 20) -> str:
    """Self and inclusive shares per function from py-spy's raw (collapsed) output.

    Native frames without symbols are grouped by library ("[libcrypto.so.3]"),
    Python frames by function (the line-level table lists qemuram lines)."""
    self_fn: Dict[str, int] = {}
    self_line: Dict[str, int] = {}
    incl: Dict[str, int] = {}
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            try:
                n = int(n)
            except ValueError:
                continue
            frames = [_short(fr) for fr in stack.split(";")]
            total += n
            leaf = frames[-1]
            self_fn[_func(leaf)] = self_fn.get(_func(leaf), 0) + n
            # the innermost qemuram line under this sample
            for fr in reversed(frames):
                if fr.startswith(("0x", "[")) or "qemuram/" not in fr:
                    continue
                self_line[fr] = self_line.get(fr, 0) + n
                break
            for fn in {_func(fr) for fr in frames}:
                incl[fn] = incl.get(fn, 0) + n
    if not total:
        return "no samples\n"

    def table(d, keep=lambda k: True):
        rows = sorted(((k, v) for k, v in d.items() if keep(k)), key=lambda kv: -kv[1])
        return [f"  {100 * v / total:5.1f}%  {k}" for k, v in rows[:top]]

    lines = [f"samples: {total}", "",
             "self time by function (native code without symbols grouped by library):"]
    lines += table(self_fn)
    lines += ["", "samples by innermost qemuram line (where qemuram code spends, including "
                  "the numpy/C calls it makes there):"]
    lines += table(self_line)
    lines += ["", "inclusive time, qemuram functions:"]
    lines += table(incl, lambda k: "qemuram/" in k)
    return "\n".join(lines) + "\n"


def _func(frame: str) -> str:
    m = re.match(r"0x[0-9a-f]+ \((.+)\)$", frame)
    if m:
        return f"[{m.group(1)}]"
    return re.sub(r":\d+\)$", ")", frame)


def _short(frame: str) -> str:
    frame = re.sub(r"\(/[^)]*?/site-packages/", "(", frame)
    frame = frame.replace(LIB_DIR + "/", "").replace(REPO + "/", "")
    return frame


def profile(name: str, c: dict, d: str, tool: str, out_dir: str, stats: Optional[dict]) -> str:
    stream = os.path.join(d, "stream.mig")
    layout = "mapped-ram" if "mapped-ram" in (c.get("caps") or []) else "sequential"
    other = "sequential" if layout == "mapped-ram" else "mapped-ram"
    scratch = os.path.join(WORK, "profile", name)
    rm(scratch)
    os.makedirs(scratch)
    args = {"extract": ["extract", stream, "-o", os.path.join(scratch, "x")],
            "verify": ["verify", stream],
            "info --hash": ["info", "--hash", stream],
            "convert ->other": ["convert", stream, os.path.join(scratch, "c"), "--to", other]}
    if tool == "convert ->back":
        conv = os.path.join(scratch, f"conv.{other}")
        run_tool(qemuram_cmd("convert", stream, conv, "--to", other), stream, "convert")
        args[tool] = ["convert", conv, os.path.join(scratch, "back"), "--to", layout]
        stream = conv
    if tool not in args:
        tool = "extract"
    spy = shutil.which("py-spy")
    if not spy:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    raw = os.path.join(scratch, "raw.txt")
    os.sync()
    warm(stream)
    cmd = [spy, "record", "--native", "--idle", "--rate", "250", "--format", "raw", "-o", raw,
           "--", *qemuram_cmd(*args[tool])]
    r = Measured(cmd, env=tool_env()).run()
    if r["rc"] != 0:
        raise RuntimeError(f"py-spy failed: {r['stderr'][-2000:]}")
    text = [f"# py-spy profile: qemuram {tool} on case {name} (qemuram {LIB_DESC})",
            f"# stream: {human(os.path.getsize(stream))}; {CASES[name].get('note', '')}",
            f"# command: qemuram {' '.join(a if a != stream else 'STREAM' for a in args[tool])}",
            f"# py-spy record --native --idle --rate 250 (idle on: time blocked in syscalls "
            f"shows as the syscall's libc frame, e.g. pread64/pwrite64/read)",
            f"# under py-spy: wall {r['wall']:.2f} s, user {r['user']:.2f} s, sys {r['sys']:.2f} s,"
            f" minor faults {r['minflt']}, major faults {r['majflt']}, peak RSS "
            f"{human(r['maxrss'])}"]
    if stats:
        text.append(f"# without profiler (median of the benchmark): {fmt_s(stats['median'])}, "
                    f"user {stats['user']:.2f} s, sys {stats['sys']:.2f} s, minor faults "
                    f"{stats['minflt']}")
    text.append("")
    text.append(summarize_raw(raw))
    os.makedirs(out_dir, exist_ok=True)
    slug = tool.replace(" --", "-").replace(" ->", "-to-").replace(" ", "-")
    if tool in ("convert ->other", "convert ->back"):
        slug = f"convert-to-{other if tool == 'convert ->other' else layout}"
    out = os.path.join(out_dir, f"{name}-{slug}.txt")
    keep_raw = os.path.join(WORK, "profiles-raw")
    os.makedirs(keep_raw, exist_ok=True)
    shutil.copy(raw, os.path.join(keep_raw, f"{name}-{slug}.raw"))
    with open(out, "w") as f:
        f.write("\n".join(text))
    rm(scratch)
    return out


# --------------------------------------------------------------------------- reporting

def aggregate(runs: List[dict]) -> dict:
    walls = [r["wall"] for r in runs]
    rss = [r["maxrss"] for r in runs if r.get("maxrss")]
    anon = [r["anon"] for r in runs if r.get("anon")]
    return {"median": statistics.median(walls), "min": min(walls), "max": max(walls),
            "n": len(walls), "maxrss": max(rss) if rss else None,
            "anon": max(anon) if anon else None,
            "user": statistics.median([r.get("user", 0) for r in runs]),
            "sys": statistics.median([r.get("sys", 0) for r in runs]),
            "minflt": int(statistics.median([r.get("minflt", 0) for r in runs])),
            "cpu": statistics.median([r.get("user", 0) + r.get("sys", 0) for r in runs]),
            "load": statistics.mean([r.get("load", 0) for r in runs]),
            "bytes": runs[0].get("bytes"),
            "label": runs[0].get("label")}


def table_rows(results: dict) -> List[List[str]]:
    rows = []
    for name, r in results.items():
        if "unavailable" in r:
            rows.append([name, "-", "unavailable: " + r["unavailable"]] + [""] * (len(HEAD) - 3))
            continue
        q = r["tools"].get("qemu load", {}).get("median")
        for tool in TOOLS:
            a = r["tools"].get(tool)
            if not a:
                continue
            label = a.get("label") or tool
            if tool == "sha256 (bound)" and a.get("bytes"):
                label += f" of {human(a['bytes'])}"
            ratio = "1.00" if tool == "qemu load" else (f"{a['median'] / q:.2f}" if q else "-")
            rows.append([name, human(r["stream_size"]), label, fmt_s(a["median"]),
                         f"{fmt_s(a['min'])}-{fmt_s(a['max'])}" if a["n"] > 1 else "-",
                         ratio, fmt_s(a.get("cpu")), human(a["maxrss"]), human(a["anon"])])
    return rows


HEAD = ["case", "stream", "tool", "median", "min-max", "x QEMU load", "CPU (u+s)", "peak RSS",
        "peak anon"]


def print_text(rows: List[List[str]]) -> None:
    widths = [max(len(HEAD[i]), *(len(r[i]) for r in rows)) for i in range(len(HEAD))]
    line = "  ".join(h.ljust(w) for h, w in zip(HEAD, widths))
    print(line)
    print("-" * len(line))
    prev = None
    for r in rows:
        cells = list(r)
        if cells[0] == prev:
            cells[0] = cells[1] = ""
        prev = r[0]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())


def print_markdown(rows: List[List[str]], machine: str, rounds: int) -> None:
    print()
    print(f"Machine: {machine}. Median of {rounds} round(s), page cache warm (input read once "
          f"before each measurement). CPU = user + system seconds of the process (QEMU: of "
          f"the destination during the load).")
    print()
    print("| " + " | ".join(HEAD) + " |")
    print("|" + "|".join("---" if i < 3 else "---:" for i in range(len(HEAD))) + "|")
    prev = None
    for r in rows:
        cells = list(r)
        if cells[0] == prev:
            cells[0] = cells[1] = ""
        prev = r[0]
        print("| " + " | ".join(cells) + " |")


def print_checks(results: dict) -> None:
    for name, r in results.items():
        for fail in r.get("failures") or []:
            print(f"{name}: FAILED {fail}")
        if "checks" in r:
            ch = r["checks"]
            rec = ", ".join(f"{k} {v}" for k, v in ch.get("records", {}).items() if v)
            print(f"{name}: records [{rec}]; sha256 of extract/info --hash/bound agree: "
                  f"{ch.get('hashes_match')}; convert round trip byte-identical: "
                  f"{ch.get('roundtrip_identical')}")
    print("(a sequential stream that QEMU cut into several PART sections comes back as one "
          "section after a trip through mapped-ram, so 'False' is expected there)")


# --------------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny guests, 1 round (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per case (default 3)")
    ap.add_argument("--cases", default=None, help="comma-separated case names (see --list)")
    ap.add_argument("--cache", default=os.path.join(HERE, "cache"), help="stream cache directory")
    ap.add_argument("--cache-limit", type=float, default=20.0,
                    help="GB of cached streams to keep (least recently used are evicted)")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    ap.add_argument("--json", metavar="FILE", help="write all measurements as JSON")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the slowest qemuram command of each case into --profile-dir")
    ap.add_argument("--profile-cases", default=None,
                    help="comma-separated cases to profile (default: all measured)")
    ap.add_argument("--profile-tools", default=None,
                    help="comma-separated tools to profile (extract, verify, 'info --hash', "
                         "'convert ->other', 'convert ->back'; default: the slowest per case)")
    ap.add_argument("--profile-dir", default=os.path.join(HERE, "profiles"))
    ap.add_argument("--library", default="worktree",
                    help="qemuram to measure: worktree (a copy taken at start, default), head "
                         "(the committed package), live (the work tree as it changes) or a "
                         "directory holding qemuram/")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args(argv)

    if args.list:
        for n, c in CASES.items():
            real, rc = resolve(n)
            print(f"{n:<28} {'(quick) ' if c.get('quick') else ''}"
                  f"{rc.get('note') or ('same stream as ' + real if real != n else '')}")
        return 0
    names = args.cases.split(",") if args.cases else (QUICK_DEFAULT if args.quick else FULL_DEFAULT)
    for n in names:
        if n not in CASES:
            ap.error(f"unknown case {n!r}; known: {', '.join(CASES)}")
    rounds = args.rounds or (1 if args.quick else 3)

    from tests.integration.harness import qemu_available
    ok, why = qemu_available()
    if not ok:
        print(f"benchmark needs QEMU: {why}", file=sys.stderr)
        return 2
    os.makedirs(WORK, exist_ok=True)
    qemu = qemu_version_line()
    limit = int(args.cache_limit * 1e9)

    # streams (aliases measured once)
    results: Dict[str, dict] = {}
    streams: Dict[str, Tuple[str, dict]] = {}
    keep = set()
    for n in names:
        real, c = resolve(n)
        keep.add(case_dir(args.cache, real, c, qemu))
    for n in names:
        real, c = resolve(n)
        if real in streams:
            continue
        try:
            streams[real] = ensure_stream(n, args.cache, qemu, limit, keep)
        except Exception as exc:  # noqa: BLE001 - a case that cannot be made is reported
            log(f"{n}: unavailable: {exc}")
            results[real] = {"unavailable": str(exc).splitlines()[0][:200]}
    rm(os.path.join(WORK, "plant"))

    snapshot_library(args.library)
    log(f"measuring qemuram from {LIB_DESC} ({LIB_DIR})")
    runs: Dict[str, Dict[str, List[dict]]] = {real: {} for real in streams}
    checks: Dict[str, dict] = {real: {} for real in streams}
    failures: Dict[str, List[str]] = {real: [] for real in streams}
    partial = args.json or os.path.join(WORK, "partial.json")
    for rnd in range(rounds):
        for real, (d, meta) in streams.items():
            log(f"round {rnd + 1}/{rounds}: {real}")
            try:
                res = one_round(real, CASES[real], d, meta, rnd, checks[real])
            except Exception as exc:  # noqa: BLE001 - reported, earlier rounds kept
                log(f"{real}: round {rnd + 1} failed: {exc!r}")
                failures[real].append(f"round {rnd + 1}: {exc!r}"[:300])
                continue
            for tool, r in res.items():
                runs[real].setdefault(tool, []).append(r)
                log(f"  {tool:<18} {fmt_s(r['wall'])}  cpu {r.get('user', 0) + r.get('sys', 0):.2f} s"
                    f"  rss {human(r.get('maxrss'))}  anon {human(r.get('anon'))}")
            with open(partial, "w") as f:
                json.dump({"library": LIB_DESC, "rounds_done": rnd + 1, "runs": runs,
                           "checks": checks, "failures": failures}, f, default=str)

    for n in names:
        real, c = resolve(n)
        if "unavailable" in results.get(real, {}):
            results[n] = results[real]
            continue
        d, meta = streams[real]
        if not runs[real]:
            results[n] = {"unavailable": "; ".join(failures[real])[:200] or "no round ran"}
            continue
        results[n] = {"stream_size": meta["stream_size"], "stream_dir": d, "meta": meta,
                      "alias_of": real if real != n else None, "checks": checks[real],
                      "failures": failures[real],
                      "tools": {t: aggregate(rs) for t, rs in runs[real].items()}}

    if args.profile:
        done = set()
        wanted = args.profile_cases.split(",") if args.profile_cases else names
        for n in wanted:
            real, c = resolve(n)
            r = results.get(real, {})
            if real in done or "tools" not in r:
                continue
            done.add(real)
            cand = {t: a for t, a in r["tools"].items()
                    if t in ("extract", "verify", "info --hash", "convert ->other",
                             "convert ->back")}
            tools = (args.profile_tools.split(",") if args.profile_tools else
                     [max(cand, key=lambda t: cand[t]["median"])])
            for tool in tools:
                log(f"profiling {real}: {tool}")
                try:
                    path = profile(real, c, streams[real][0], tool, args.profile_dir,
                                   cand.get(tool))
                    log(f"  wrote {path}")
                except Exception as exc:  # noqa: BLE001
                    log(f"  profile failed: {exc}")

    rows = table_rows({n: results[n] for n in names})
    print_text(rows)
    print()
    print_checks({n: results[n] for n in names if not results[n].get("alias_of")})
    machine = machine_line() + f"; qemuram {LIB_DESC}"
    loads = [a["load"] for n in names for a in results[n].get("tools", {}).values()
             if a.get("load") is not None]
    if loads:
        machine += f"; mean 1-min load average during the measurements {statistics.mean(loads):.1f}"
    if args.markdown:
        print_markdown(rows, machine, rounds)
    else:
        print(f"\nmachine: {machine}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rounds": rounds, "results": results}, f, indent=2,
                      default=str)
    bad = [n for n in names if "unavailable" in results[n]]
    return 1 if bad and len(bad) == len(names) else 0


if __name__ == "__main__":
    sys.exit(main())
