"""Drive real QEMU (qemu-system-x86_64) for qemuram's integration tests.

The harness is synchronous and self-contained; it can be used outside pytest::

    from tests.integration.harness import Guest

    with Guest(machine="q35", memory="64M", plant=[(0x100000, b"hello")]) as src:
        src.save("/tmp/vm.mig")                       # migrate to file: and wait
        with Guest(memory="64M", incoming=True) as dst:
            dst.load("/tmp/vm.mig")                   # migrate-incoming and wait
            assert dst.pmemsave(0x100000, 5) == b"hello"

Everything the harness creates (temporary directories, planted-data files,
sockets, tmpfs-backed memory files) lives under per-object temporary
directories that are removed by ``close()`` (or at garbage collection / exit
if a caller forgets).

QMP is spoken through ``qemu.qmp.QMPClient`` running on a private asyncio
event loop in a background thread, so the synchronous API works from any
thread and never touches an event loop the caller may own.

Environment knobs:
  QEMURAM_QEMU   path of the qemu-system-x86_64 binary to use
  QEMURAM_ACCEL  "kvm" or "tcg" to force an accelerator (default: KVM when usable)
  CI             "true" turns skips from ``require`` into failures
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import fcntl
import functools
import itertools
import json
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

__all__ = [
    "HarnessError", "QemuStartError", "QMPCommandError", "MigrationFailed",
    "in_ci", "require", "qemu_binary", "qemu_available", "qemu_version",
    "kvm_usable", "kvm_status", "hugetlbfs_mount", "hugepages_status",
    "backend_status", "parse_size", "Dimm", "Guest", "Relay",
    "first_difference", "describe_difference", "BACKENDS", "HUGEPAGE_MOUNTS",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: Memory backend kinds understood by :class:`Guest` (main RAM and DIMMs).
BACKENDS = ("default", "ram", "memfd", "file", "hugetlb2m", "hugetlb1g")

#: Where ci/setup-hugepages.sh mounts hugetlbfs, by page size in bytes.
HUGEPAGE_MOUNTS = {2 * MiB: "/dev/hugepages-2M", 1 * GiB: "/dev/hugepages-1G"}
_HUGE_KIND = {"hugetlb2m": 2 * MiB, "hugetlb1g": 1 * GiB}

#: Default max-bandwidth set on every guest (bytes/s): effectively unlimited.
FAST_BANDWIDTH = 1 << 40

#: Migration states after which nothing more will happen.
_FINAL_STATES = ("completed", "failed", "cancelled")

SizeLike = Union[int, str]


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------

class HarnessError(Exception):
    """Base class of every error raised by the harness."""


class QemuStartError(HarnessError):
    """QEMU did not start (or its QMP socket never came up)."""

    def __init__(self, message: str, cmdline: Sequence[str] = (), stderr: str = ""):
        self.cmdline = list(cmdline)
        self.stderr = stderr
        text = message
        if stderr.strip():
            text += "\nQEMU stderr:\n" + stderr.strip()
        if cmdline:
            text += "\ncommand line: " + " ".join(cmdline)
        super().__init__(text)


class QMPCommandError(HarnessError):
    """A QMP command returned an error; ``desc`` is QEMU's own text."""

    def __init__(self, command: str, args: Dict[str, Any], error_class: str, desc: str):
        self.command = command
        self.args = args
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command} {json.dumps(args, sort_keys=True)} failed: "
                         f"{error_class}: {desc}")


class MigrationFailed(HarnessError):
    """A migration (outgoing or incoming) failed, was cancelled or timed out.

    ``error_desc`` is QEMU's own error text from query-migrate (or the tail of
    QEMU's stderr when the process died); ``info`` the last query-migrate reply.
    """

    def __init__(self, message: str, status: Optional[str] = None,
                 error_desc: Optional[str] = None, info: Optional[dict] = None,
                 stderr: str = ""):
        self.status = status
        self.error_desc = error_desc
        self.info = info or {}
        self.stderr = stderr
        text = message
        if error_desc:
            text += f": {error_desc}"
        if stderr.strip() and (not error_desc or error_desc not in stderr):
            text += "\nQEMU stderr:\n" + stderr.strip()
        super().__init__(text)


# --------------------------------------------------------------------------
# Environment probes and pytest helpers
# --------------------------------------------------------------------------

def in_ci() -> bool:
    """True when the environment says this is CI (CI=true/1/yes)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require(condition: Any, what: str) -> None:
    """Skip the current test when ``condition`` is false; fail instead under CI.

    ``condition`` may be a bool or a ``(bool, reason)`` pair such as the ones
    returned by :func:`qemu_available` and :func:`hugepages_status`; the
    reason is appended to ``what``. ``what`` should name exactly what is
    missing (e.g. "hugetlbfs mount /dev/hugepages-2M").
    """
    reason = ""
    if isinstance(condition, tuple):
        condition, reason = condition
    if condition:
        return
    import pytest  # only needed when a test is driving the harness

    message = f"missing: {what}" + (f" ({reason})" if reason else "")
    if in_ci():
        pytest.fail(message + " [CI=true: required, not skipped]", pytrace=False)
    pytest.skip(message)


def qemu_binary() -> Optional[str]:
    """Absolute path of the QEMU binary to use, or None."""
    name = os.environ.get("QEMURAM_QEMU", "qemu-system-x86_64")
    if os.sep in name:
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name)


@functools.lru_cache(maxsize=None)
def _version_of(binary: str) -> Tuple[Tuple[int, ...], str]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         timeout=30)
    line = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", line)
    if not m:
        return (), line
    return tuple(int(g or 0) for g in m.groups()), line


def qemu_version() -> Tuple[int, ...]:
    """(major, minor, micro) of the QEMU binary; () if unknown or absent."""
    binary = qemu_binary()
    if not binary:
        return ()
    try:
        return _version_of(binary)[0]
    except (OSError, subprocess.SubprocessError):
        return ()


def qemu_available(min_version: Tuple[int, ...] = (9, 1)) -> Tuple[bool, str]:
    """(True, description) if a usable qemu-system-x86_64 is installed.

    The default minimum (9.1) is what the harness relies on: ``file:`` URIs,
    mapped-ram, ``migrate-incoming exit-on-error``.
    """
    binary = qemu_binary()
    if not binary:
        return False, ("qemu-system-x86_64 not found on PATH "
                       "(install it with ci/install-qemu.sh, or set QEMURAM_QEMU)")
    try:
        version, line = _version_of(binary)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"{binary} --version failed: {exc}"
    if not version:
        return False, f"cannot parse the version of {binary}: {line!r}"
    if version < tuple(min_version):
        want = ".".join(map(str, min_version))
        return False, f"{binary} is {line.strip()!r}; QEMU >= {want} is needed"
    return True, f"{binary}: {line.strip()}"


_KVM_GET_API_VERSION = 0xAE00


@functools.lru_cache(maxsize=None)
def kvm_status() -> Tuple[bool, str]:
    """(usable, reason). Checks /dev/kvm and that QEMU can initialise KVM."""
    forced = os.environ.get("QEMURAM_ACCEL", "").strip().lower()
    if forced == "tcg":
        return False, "disabled by QEMURAM_ACCEL=tcg"
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"cannot open /dev/kvm: {exc.strerror}"
    try:
        api = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return False, f"KVM_GET_API_VERSION on /dev/kvm failed: {exc.strerror}"
    finally:
        os.close(fd)
    if api != 12:
        return False, f"/dev/kvm reports API version {api}, expected 12"
    binary = qemu_binary()
    if not binary:
        return False, "qemu-system-x86_64 not found"
    # Ask QEMU itself: it must be able to create a KVM VM.
    script = ('{"execute":"qmp_capabilities"}\n{"execute":"query-kvm"}\n'
              '{"execute":"quit"}\n')
    try:
        out = subprocess.run(
            [binary, "-machine", "none", "-accel", "kvm", "-nodefaults",
             "-no-user-config", "-display", "none", "-S", "-qmp", "stdio"],
            input=script, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"KVM probe failed to run: {exc}"
    if out.returncode != 0 or '"enabled": true' not in out.stdout:
        err = (out.stderr or out.stdout).strip().splitlines()
        return False, "QEMU cannot use KVM: " + (err[-1] if err else f"rc={out.returncode}")
    return True, "KVM usable"


def kvm_usable() -> bool:
    """True when /dev/kvm works for QEMU (and QEMURAM_ACCEL is not "tcg")."""
    return kvm_status()[0]


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtKMGT]?)(i?[bB])?\s*$")


def parse_size(value: SizeLike) -> int:
    """Bytes from an int or a QEMU-style size string ("64M", "1G", "4096")."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"bad size {value!r}")
    mult = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}[m.group(2).lower()]
    return int(m.group(1)) * mult


def _qemu_size(n: int) -> str:
    """A size string QEMU reads as exactly ``n`` bytes (with an explicit suffix)."""
    for unit, suffix in ((GiB, "G"), (MiB, "M"), (KiB, "K")):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return f"{n}B"


def _parse_pagesize_option(text: str) -> int:
    # /proc/mounts shows e.g. pagesize=2M or pagesize=1024M
    return parse_size(text)


def hugetlbfs_mount(page_size: SizeLike) -> Optional[str]:
    """Path of a hugetlbfs mount with the given page size, or None.

    The mount made by ci/setup-hugepages.sh (``HUGEPAGE_MOUNTS``) is preferred;
    any other hugetlbfs mount with the right page size is accepted.
    """
    size = parse_size(page_size)
    found = []
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 4 or parts[2] != "hugetlbfs":
                    continue
                opts = dict(o.split("=", 1) if "=" in o else (o, "")
                            for o in parts[3].split(","))
                mount_size = opts.get("pagesize")
                if mount_size is None:
                    continue
                if _parse_pagesize_option(mount_size) == size:
                    found.append(parts[1].replace("\\040", " "))
    except OSError:
        return None
    preferred = HUGEPAGE_MOUNTS.get(size)
    if preferred in found:
        return preferred
    return found[0] if found else None


def _sysfs_hugepages(page_size: int, field: str) -> Optional[int]:
    path = f"/sys/kernel/mm/hugepages/hugepages-{page_size // KiB}kB/{field}"
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def hugepages_status(page_size: SizeLike, nbytes: SizeLike = 0) -> Tuple[bool, str]:
    """Whether ``nbytes`` of hugepages of ``page_size`` can be had right now.

    The reason names exactly what is missing (mount point, reservation).
    """
    size = parse_size(page_size)
    need = -(-parse_size(nbytes) // size)
    label = _qemu_size(size)
    want_mount = HUGEPAGE_MOUNTS.get(size, f"a hugetlbfs mount with pagesize={label}")
    hint = " (run ci/setup-hugepages.sh as root)"
    if _sysfs_hugepages(size, "nr_hugepages") is None:
        return False, f"{label} hugepages are not supported by this kernel{hint}"
    mount = hugetlbfs_mount(size)
    if mount is None:
        return False, f"hugetlbfs mount {want_mount} (pagesize={label}){hint}"
    free = _sysfs_hugepages(size, "free_hugepages") or 0
    if free < need:
        total = _sysfs_hugepages(size, "nr_hugepages") or 0
        return False, (f"{need} free {label} hugepages (have {free} free of {total} "
                       f"reserved){hint}")
    return True, f"{mount}: {free} free {label} hugepages"


def backend_status(kind: str, nbytes: SizeLike = 0) -> Tuple[bool, str]:
    """Whether a memory backend kind can be used here (for ``require``)."""
    if kind not in BACKENDS:
        return False, f"unknown backend kind {kind!r}"
    if kind in _HUGE_KIND:
        return hugepages_status(_HUGE_KIND[kind], nbytes)
    if kind == "file" and not os.path.isdir("/dev/shm"):
        return False, "tmpfs directory /dev/shm"
    return True, kind


# --------------------------------------------------------------------------
# Memory backends
# --------------------------------------------------------------------------

@dataclass
class Dimm:
    """An extra pc-dimm with its own memory backend.

    ``backend`` is one of ``BACKENDS`` except "default" (treated as "ram").
    ``share`` None means the backend kind's default (on for memfd and file,
    off otherwise). ``addr`` None lets QEMU place the DIMM (deterministic for
    a given machine and DIMM list; see ``Guest.memory_devices()``).
    """
    size: SizeLike
    backend: str = "ram"
    share: Optional[bool] = None
    addr: Optional[int] = None
    id: Optional[str] = None


def _backend_object(kind: str, obj_id: str, size: int, share: Optional[bool],
                    shm_dir: str) -> str:
    if kind == "ram":
        opts = ["memory-backend-ram", f"id={obj_id}", f"size={_qemu_size(size)}"]
        if share is not None:
            opts.append(f"share={'on' if share else 'off'}")
    elif kind == "memfd":
        opts = ["memory-backend-memfd", f"id={obj_id}", f"size={_qemu_size(size)}",
                f"share={'off' if share is False else 'on'}"]
    elif kind == "file":
        opts = ["memory-backend-file", f"id={obj_id}", f"size={_qemu_size(size)}",
                f"mem-path={os.path.join(shm_dir, obj_id)}",
                f"share={'off' if share is False else 'on'}"]
    elif kind in _HUGE_KIND:
        page = _HUGE_KIND[kind]
        if size % page:
            raise HarnessError(f"{kind} backend {obj_id}: size {size:#x} is not a "
                               f"multiple of the {_qemu_size(page)} page size")
        mount = hugetlbfs_mount(page)
        if mount is None:
            raise HarnessError(f"{kind} backend {obj_id}: "
                               + hugepages_status(page, size)[1])
        # A directory mem-path makes QEMU create (and unlink) its own file there.
        opts = ["memory-backend-file", f"id={obj_id}", f"size={_qemu_size(size)}",
                f"mem-path={mount}", f"align={_qemu_size(page)}", "prealloc=on"]
        if share is not None:
            opts.append(f"share={'on' if share else 'off'}")
    else:
        raise HarnessError(f"unknown memory backend kind {kind!r}; use one of {BACKENDS}")
    return ",".join(opts)


# --------------------------------------------------------------------------
# Private event loop for QMP
# --------------------------------------------------------------------------

class _LoopThread:
    """An asyncio loop in a daemon thread; ``run`` executes coroutines on it."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro, timeout: Optional[float]):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


_libc = None


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def _finalize(proc: Optional[subprocess.Popen], loop: Optional[_LoopThread],
              dirs: List[str]) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    if loop is not None:
        loop.close()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------
# Guest
# --------------------------------------------------------------------------

_guest_ids = itertools.count()


class Guest:
    """One qemu-system-x86_64 process with a QMP connection.

    Parameters:
      machine     "q35" or "pc" (any -machine type name is passed through).
      memory      main RAM size (int bytes or "64M").
      backend     main RAM backend kind, one of ``BACKENDS``: "default" (QEMU's
                  own anonymous RAM), "ram" (memory-backend-ram), "memfd"
                  (share=on), "file" (share=on, a file on /dev/shm), "hugetlb2m" /
                  "hugetlb1g" (memory-backend-file on the hugetlbfs mounts,
                  prealloc=on, align = page size).
      share       override the main backend's share= (None: kind default).
      main_backend_id  QOM id of the main backend object (when not "default");
                  it becomes the RAM block name, so the default "pc.ram" keeps
                  streams looking like the default backend's.
      dimms       extra ``Dimm``s (adds -m slots=,maxmem=).
      slots, maxmem  override -m slots= / maxmem= (defaults fit the DIMMs).
      paused      start with -S (guest CPUs never run).
      incoming    True: -incoming defer (a migration destination).
      plant       [(guest_physical_addr, bytes), ...] written with
                  -device loader,file=...,addr=...,force-raw=on before start.
      accel       "auto" (KVM when usable, else TCG), "kvm" or "tcg".
      smp         vCPU count.
      extra_args  additional QEMU arguments, appended last.
      raise_bandwidth  set max-bandwidth to FAST_BANDWIDTH after start.
      start       start immediately (else call ``start()``).
    """

    def __init__(self, machine: str = "q35", memory: SizeLike = "64M",
                 backend: str = "default", *, share: Optional[bool] = None,
                 main_backend_id: str = "pc.ram",
                 dimms: Iterable[Dimm] = (), slots: Optional[int] = None,
                 maxmem: Optional[SizeLike] = None, paused: bool = True,
                 incoming: bool = False,
                 plant: Iterable[Tuple[int, bytes]] = (), accel: str = "auto",
                 smp: int = 1, extra_args: Sequence[str] = (),
                 name: Optional[str] = None, raise_bandwidth: bool = True,
                 start: bool = True, start_timeout: float = 60.0,
                 qmp_timeout: float = 120.0):
        self.machine = machine
        self.memory = parse_size(memory)
        self.backend = backend
        self.share = share
        self.main_backend_id = main_backend_id
        self.dimms = list(dimms)
        self.slots = slots
        self.maxmem = parse_size(maxmem) if maxmem is not None else None
        self.paused = paused
        self.incoming = incoming
        self.planted: List[Tuple[int, bytes]] = [(int(a), bytes(d)) for a, d in plant]
        self.requested_accel = accel
        self.smp = smp
        self.extra_args = list(extra_args)
        self.name = name or f"qemuram-{os.getpid()}-{next(_guest_ids)}"
        self.raise_bandwidth = raise_bandwidth
        self.start_timeout = start_timeout
        self.qmp_timeout = qmp_timeout

        if backend not in BACKENDS:
            raise HarnessError(f"unknown backend {backend!r}; use one of {BACKENDS}")
        for i, d in enumerate(self.dimms):
            if d.id is None:
                d.id = f"dimm{i}"

        #: "kvm" or "tcg" once started (as reported by query-kvm)
        self.accel: Optional[str] = None
        self.cmdline: List[str] = []
        self.proc: Optional[subprocess.Popen] = None
        self._client = None
        self._loop: Optional[_LoopThread] = None
        self._closed = False
        self._seq = itertools.count()
        self.tmpdir = tempfile.mkdtemp(prefix="qemuram-guest-")
        self._dirs = [self.tmpdir]
        self._shm_dir: Optional[str] = None
        self._finalizer = weakref.finalize(self, _finalize, None, None, self._dirs)
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    # -- command line -------------------------------------------------------

    def _shm(self) -> str:
        if self._shm_dir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self._shm_dir = tempfile.mkdtemp(prefix="qemuram-mem-", dir=base)
            self._dirs.append(self._shm_dir)
        return self._shm_dir

    def _accel_args(self) -> List[str]:
        accel = self.requested_accel
        if accel == "auto":
            forced = os.environ.get("QEMURAM_ACCEL", "").strip().lower()
            if forced in ("kvm", "tcg"):
                accel = forced
            else:
                # QEMU tries the -accel options in order: KVM, then TCG.
                return ["-accel", "kvm", "-accel", "tcg"] if kvm_usable() else ["-accel", "tcg"]
        if accel not in ("kvm", "tcg"):
            raise HarnessError(f"accel must be auto, kvm or tcg, not {accel!r}")
        return ["-accel", accel]

    def build_cmdline(self) -> List[str]:
        binary = qemu_binary()
        if not binary:
            raise QemuStartError(qemu_available()[1])
        qmp_sock = os.path.join(self.tmpdir, "qmp.sock")
        args = [binary, "-name", self.name, "-nodefaults", "-no-user-config",
                "-display", "none", "-serial", "none", "-parallel", "none",
                "-monitor", "none", "-vga", "none", "-net", "none",
                "-smp", str(self.smp)]
        args += self._accel_args()
        machine = [self.machine]
        mem = [f"size={_qemu_size(self.memory)}"]
        if self.dimms or self.slots or self.maxmem:
            dimm_total = sum(parse_size(d.size) for d in self.dimms)
            slots = self.slots if self.slots is not None else max(1, len(self.dimms))
            maxmem = self.maxmem
            if maxmem is None:
                maxmem = self.memory + max(GiB, -(-dimm_total // GiB) * GiB)
            mem += [f"slots={slots}", f"maxmem={_qemu_size(maxmem)}"]
        objects: List[str] = []
        if self.backend != "default":
            objects.append(_backend_object(self.backend, self.main_backend_id,
                                           self.memory, self.share,
                                           self._shm() if self.backend == "file" else ""))
            machine.append(f"memory-backend={self.main_backend_id}")
        devices: List[str] = []
        for d in self.dimms:
            kind = "ram" if d.backend == "default" else d.backend
            mem_id = f"{d.id}-mem"
            objects.append(_backend_object(kind, mem_id, parse_size(d.size), d.share,
                                           self._shm() if kind == "file" else ""))
            dev = f"pc-dimm,id={d.id},memdev={mem_id}"
            if d.addr is not None:
                dev += f",addr={d.addr:#x}"
            devices.append(dev)
        for i, (addr, data) in enumerate(self.planted):
            path = os.path.join(self.tmpdir, f"plant-{i}-{addr:x}.bin")
            with open(path, "wb") as f:
                f.write(data)
            devices.append(f"loader,file={path},addr={addr:#x},force-raw=on")
        args += ["-machine", ",".join(machine), "-m", ",".join(mem)]
        for o in objects:
            args += ["-object", o]
        for d in devices:
            args += ["-device", d]
        args += ["-chardev", f"socket,id=qmp0,path={qmp_sock},server=on,wait=off",
                 "-mon", "chardev=qmp0,mode=control"]
        if self.paused:
            args.append("-S")
        if self.incoming:
            args += ["-incoming", "defer"]
        args += self.extra_args
        return args

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> "Guest":
        """Launch QEMU and connect QMP. Raises QemuStartError with stderr."""
        global _libc
        if self.proc is not None:
            raise HarnessError("guest already started")
        self.cmdline = self.build_cmdline()
        self._stderr_path = os.path.join(self.tmpdir, "stderr.log")
        preexec = None
        if threading.current_thread() is threading.main_thread():
            # Kill QEMU if this process dies (PDEATHSIG follows the creating
            # thread, so only use it from the main thread).
            if _libc is None:
                try:
                    _libc = ctypes.CDLL(None, use_errno=True)
                except OSError:
                    _libc = None
            preexec = _set_pdeathsig if _libc is not None else None
        with open(self._stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.cmdline, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, cwd=self.tmpdir,
                                         preexec_fn=preexec)
        self._loop = _LoopThread(f"qmp-{self.name}")
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _finalize, self.proc, self._loop,
                                           self._dirs)
        self._connect(os.path.join(self.tmpdir, "qmp.sock"))
        kvm = self.qmp("query-kvm")
        self.accel = "kvm" if kvm.get("enabled") else "tcg"
        if self.raise_bandwidth:
            self.set_parameters(max_bandwidth=FAST_BANDWIDTH)
        return self

    def _connect(self, path: str) -> None:
        from qemu.qmp import QMPClient  # imported lazily: qemu_available() works without it

        async def make():
            return QMPClient(self.name)

        self._client = self._loop.run(make(), 10)
        deadline = time.monotonic() + self.start_timeout
        last_exc: Optional[BaseException] = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise QemuStartError(f"QEMU exited with status {self.proc.returncode} "
                                     "during startup", self.cmdline, self.stderr_text)
            if os.path.exists(path):
                try:
                    self._loop.run(self._client.connect(path), 10)
                    return
                except Exception as exc:  # ConnectError, timeouts
                    last_exc = exc
            time.sleep(0.02)
        raise QemuStartError(f"QMP socket did not come up within {self.start_timeout}s "
                             f"(last error: {last_exc})", self.cmdline, self.stderr_text)

    def __enter__(self) -> "Guest":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "new" if self.proc is None else (
            "running" if self.proc.poll() is None else f"exited {self.proc.returncode}")
        return (f"<Guest {self.name} {self.machine} {_qemu_size(self.memory)} "
                f"{self.backend} accel={self.accel} {state}>")

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def stderr_text(self) -> str:
        """Everything QEMU wrote to stdout/stderr so far."""
        try:
            with open(self._stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except (OSError, AttributeError):
            return ""

    def quit(self, timeout: float = 30.0) -> int:
        """QMP quit, wait for the process; returns its exit status."""
        if self.alive():
            try:
                self.qmp("quit", _timeout=10)
            except Exception:
                pass  # the connection may drop before the reply arrives
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(30)

    def close(self) -> None:
        """Quit QEMU (killing it if needed), drop QMP, remove temp dirs."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.alive():
                self.quit(timeout=15)
        finally:
            if self._client is not None and self._loop is not None:
                try:
                    self._loop.run(self._client.disconnect(), 10)
                except Exception:
                    pass
            self._finalizer()  # kills a leftover process, stops the loop, rm -rf

    # -- QMP ----------------------------------------------------------------

    def qmp(self, cmd: str, _args: Optional[Dict[str, Any]] = None,
            _timeout: Optional[float] = None, **args: Any) -> Any:
        """Run a QMP command and return its "return" value.

        Keyword names are passed as written (QMP names with hyphens can be given
        through ``_args`` or ``**{"cpu-index": 0}``). Errors raise
        ``QMPCommandError`` carrying QEMU's description.
        """
        from qemu.qmp import ExecuteError

        if self._client is None:
            raise HarnessError("guest is not started")
        arguments = dict(_args or {})
        arguments.update(args)
        try:
            return self._loop.run(self._client.execute(cmd, arguments or None),
                                  _timeout if _timeout is not None else self.qmp_timeout)
        except ExecuteError as exc:
            raise QMPCommandError(cmd, arguments, exc.error_class, str(exc)) from None
        except concurrent.futures.TimeoutError:
            raise HarnessError(f"QMP {cmd} timed out") from None
        except Exception as exc:
            if not self.alive():
                raise HarnessError(f"QMP {cmd} failed: QEMU exited with status "
                                   f"{self.proc.returncode}\n{self.stderr_text}") from exc
            raise

    @staticmethod
    def _qmp_names(items: Dict[str, Any]) -> Dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in items.items()}

    def set_capabilities(self, _caps: Optional[Dict[str, bool]] = None, **caps: bool) -> None:
        """migrate-set-capabilities; ``x_ignore_shared=True`` -> "x-ignore-shared"."""
        merged = dict(_caps or {})
        merged.update(self._qmp_names(caps))
        if merged:
            self.qmp("migrate-set-capabilities", capabilities=[
                {"capability": k, "state": bool(v)} for k, v in merged.items()])

    def set_parameters(self, _params: Optional[Dict[str, Any]] = None, **params: Any) -> None:
        """migrate-set-parameters; ``multifd_channels=2`` -> "multifd-channels"."""
        merged = dict(_params or {})
        merged.update(self._qmp_names(params))
        if merged:
            self.qmp("migrate-set-parameters", merged)

    def capabilities(self) -> Dict[str, bool]:
        return {c["capability"]: c["state"] for c in self.qmp("query-migrate-capabilities")}

    def parameters(self) -> Dict[str, Any]:
        return self.qmp("query-migrate-parameters")

    def status(self) -> str:
        """The VM run state ("prelaunch", "paused", "running", "postmigrate", ...)."""
        return self.qmp("query-status")["status"]

    def stop(self) -> None:
        self.qmp("stop")

    def cont(self) -> None:
        self.qmp("cont")

    def memory_devices(self) -> List[Dict[str, Any]]:
        """query-memory-devices "data" dicts (id, addr, size, memdev, ...)."""
        return [dict(d.get("data", {}), type=d.get("type"))
                for d in self.qmp("query-memory-devices")]

    def dimm_address(self, dimm_id: str) -> int:
        for d in self.memory_devices():
            if d.get("id") == dimm_id:
                return int(d["addr"])
        raise HarnessError(f"no memory device with id {dimm_id!r}")

    # -- memory -------------------------------------------------------------

    def _dump(self, cmd: str, addr: int, size: int, extra: Dict[str, Any]) -> bytes:
        path = os.path.join(self.tmpdir, f"dump-{next(self._seq)}.bin")
        try:
            self.qmp(cmd, val=int(addr), size=int(size), filename=path, **extra)
            with open(path, "rb") as f:
                data = f.read()
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if len(data) != size:
            raise HarnessError(f"{cmd} {addr:#x}+{size:#x} returned {len(data)} bytes")
        return data

    def pmemsave(self, addr: int, size: int) -> bytes:
        """Guest-physical memory [addr, addr+size) via QMP pmemsave."""
        return self._dump("pmemsave", addr, size, {})

    def memsave(self, addr: int, size: int, cpu_index: int = 0) -> bytes:
        """Guest-virtual memory as seen by a vCPU, via QMP memsave."""
        return self._dump("memsave", addr, size, {"cpu-index": cpu_index})

    # -- migration: outgoing --------------------------------------------------

    def query_migrate(self) -> Dict[str, Any]:
        return self.qmp("query-migrate")

    def migrate(self, uri: str, **args: Any) -> None:
        """Start an outgoing migration (returns at once; see wait_migration)."""
        self.qmp("migrate", uri=uri, **args)

    def _wait(self, what: str, timeout: float, done: Sequence[str]) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        info: Dict[str, Any] = {}
        delay = 0.005
        while True:
            if not self.alive():
                stderr = self.stderr_text
                tail = stderr.strip().splitlines()
                raise MigrationFailed(
                    f"{what}: QEMU exited with status {self.proc.returncode}",
                    info.get("status"), tail[-1] if tail else None, info, stderr)
            try:
                info = self.query_migrate()
            except HarnessError:
                if not self.alive():
                    continue
                raise
            status = info.get("status")
            if status in done:
                return info
            if status in _FINAL_STATES:
                raise MigrationFailed(f"{what} {status}", status, info.get("error-desc"),
                                      info, self.stderr_text)
            if time.monotonic() > deadline:
                raise MigrationFailed(f"{what} did not finish within {timeout}s "
                                      f"(status {status})", status,
                                      info.get("error-desc"), info, self.stderr_text)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def wait_migration(self, timeout: float = 120.0,
                       until: Sequence[str] = ("completed",)) -> Dict[str, Any]:
        """Poll query-migrate until ``until`` (default "completed").

        Raises MigrationFailed (with QEMU's error-desc) on failed/cancelled,
        on timeout, or if QEMU exits. Returns the final query-migrate reply.
        """
        return self._wait("migration", timeout, until)

    def save(self, path: str, timeout: float = 120.0) -> Dict[str, Any]:
        """Migrate to ``file:path`` and wait for completion."""
        self.migrate(f"file:{os.fspath(path)}")
        return self.wait_migration(timeout)

    # -- migration: incoming --------------------------------------------------

    def migrate_incoming(self, uri: str, exit_on_error: bool = False, **args: Any) -> None:
        """migrate-incoming on an ``incoming=True`` guest (returns at once).

        ``exit_on_error=False`` keeps QEMU alive after a failed load so the
        failure is reported through query-migrate's error-desc.
        """
        self.qmp("migrate-incoming", uri=uri, **{"exit-on-error": exit_on_error}, **args)

    def incoming_uri(self) -> str:
        """The URI a source should use after migrate_incoming (tcp port 0 resolved)."""
        info = self.query_migrate()
        for addr in info.get("socket-address", []):
            if addr.get("type") in ("inet", "tcp"):
                return f"tcp:{addr['host']}:{addr['port']}"
            if addr.get("type") == "unix":
                return f"unix:{addr['path']}"
        raise HarnessError(f"no listening socket in query-migrate: {info}")

    def wait_incoming(self, timeout: float = 120.0) -> Dict[str, Any]:
        """Wait until the incoming migration completed (raises MigrationFailed)."""
        info = self._wait("incoming migration", timeout, ("completed",))
        # The run state changes right after the migration status; wait for it.
        deadline = time.monotonic() + 10
        while self.status() in ("inmigrate",) and time.monotonic() < deadline:
            time.sleep(0.01)
        return info

    def load(self, path: str, timeout: float = 120.0) -> Dict[str, Any]:
        """migrate-incoming from ``file:path`` and wait for completion."""
        self.migrate_incoming(f"file:{os.fspath(path)}")
        return self.wait_incoming(timeout)


# --------------------------------------------------------------------------
# Recording relay
# --------------------------------------------------------------------------

def _parse_socket_uri(uri: Union[str, Tuple[str, int]]):
    """('unix', path) or ('tcp', (host, port)) from a QEMU-style URI."""
    if isinstance(uri, tuple):
        return "tcp", (uri[0], int(uri[1]))
    if uri.startswith("unix:"):
        return "unix", uri[5:]
    if uri.startswith("tcp:"):
        host, _, port = uri[4:].rpartition(":")
        return "tcp", (host.strip("[]") or "127.0.0.1", int(port.split(",")[0]))
    if uri.startswith("/"):
        return "unix", uri
    raise HarnessError(f"unsupported socket URI {uri!r} (use unix:PATH or tcp:HOST:PORT)")


class Relay:
    """A recording relay: source QEMU -> relay -> destination QEMU.

    The relay listens on loopback (``listen="tcp"``: 127.0.0.1, ephemeral port;
    ``listen="unix"``: a socket in its temp dir); give ``relay.uri`` to the
    source's ``migrate``. Each accepted connection is paired with a new
    connection to ``target`` (the destination's URI, e.g. from
    ``Guest.incoming_uri()``); bytes are copied both ways, so a return path
    works, and the source-to-destination bytes are recorded: the first
    connection to ``record`` (default: a file in the temp dir, see
    ``record_path``), connection i > 0 to ``record + ".i"`` (multifd channels).

    Bounded: it accepts at most ``max_connections`` connections, aborts a
    connection after ``max_bytes`` forwarded bytes, and stops everything after
    ``timeout`` seconds. It finishes by itself when both directions of every
    connection reached EOF.
    """

    def __init__(self, target: Union[str, Tuple[str, int]],
                 record: Optional[str] = None, *, listen: str = "unix",
                 max_connections: int = 1, max_bytes: int = 8 * GiB,
                 timeout: float = 300.0):
        self.target = _parse_socket_uri(target)
        self.max_connections = max_connections
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.tmpdir = tempfile.mkdtemp(prefix="qemuram-relay-")
        self.record_path = os.fspath(record) if record else os.path.join(self.tmpdir, "stream.bin")
        self.errors: List[str] = []
        #: per connection: [bytes source->destination, bytes destination->source]
        self.counts: List[List[int]] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + timeout
        self._threads: List[threading.Thread] = []
        self._sockets: List[socket.socket] = []
        self._lock = threading.Lock()
        self._active = 0
        self._accepted = 0
        self._accepting = True
        self._finished = threading.Event()

        if listen == "unix":
            self._listen_path = os.path.join(self.tmpdir, "relay.sock")
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(self._listen_path)
            self.uri = f"unix:{self._listen_path}"
        elif listen == "tcp":
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("127.0.0.1", 0))
            self.uri = f"tcp:127.0.0.1:{srv.getsockname()[1]}"
        else:
            raise HarnessError("listen must be 'unix' or 'tcp'")
        srv.listen(max_connections)
        srv.settimeout(0.2)
        self._server = srv
        t = threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def record_paths(self) -> List[str]:
        return [self.record_path if i == 0 else f"{self.record_path}.{i}"
                for i in range(len(self.counts))]

    @property
    def forwarded(self) -> int:
        return sum(c[0] for c in self.counts)

    @property
    def returned(self) -> int:
        return sum(c[1] for c in self.counts)

    def _connect_target(self) -> socket.socket:
        kind, addr = self.target
        s = socket.socket(socket.AF_UNIX if kind == "unix" else socket.AF_INET,
                          socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(addr)
        s.settimeout(None)
        return s

    def _accept_loop(self) -> None:
        try:
            while not self._stop.is_set() and self._accepted < self.max_connections:
                if time.monotonic() > self._deadline:
                    self.errors.append(f"relay timed out after {self.timeout}s")
                    break
                try:
                    src, _ = self._server.accept()
                except socket.timeout:
                    continue
                except OSError as exc:
                    if not self._stop.is_set():
                        self.errors.append(f"accept failed: {exc}")
                    break
                src.settimeout(None)
                try:
                    dst = self._connect_target()
                except OSError as exc:
                    self.errors.append(f"cannot connect to destination {self.target}: {exc}")
                    src.close()
                    break
                index = self._accepted
                self._accepted += 1
                self.counts.append([0, 0])
                path = self.record_path if index == 0 else f"{self.record_path}.{index}"
                out = open(path, "wb")
                with self._lock:
                    self._sockets += [src, dst]
                    self._active += 2
                state = {"open": 2, "src": src, "dst": dst, "out": out}
                for direction, (a, b, f) in enumerate(((src, dst, out), (dst, src, None))):
                    t = threading.Thread(target=self._pump,
                                         args=(a, b, f, index, direction, state),
                                         name=f"relay-{index}-{'fwd' if direction == 0 else 'back'}",
                                         daemon=True)
                    t.start()
                    self._threads.append(t)
        finally:
            self._server.close()
            with self._lock:
                self._accepting = False
                if self._active == 0:
                    self._finished.set()

    def _pump(self, a: socket.socket, b: socket.socket, out, index: int,
              direction: int, state: dict) -> None:
        try:
            while not self._stop.is_set():
                if time.monotonic() > self._deadline:
                    self.errors.append(f"connection {index}: timed out after {self.timeout}s")
                    self._abort(state)
                    break
                try:
                    ready, _, _ = select.select([a], [], [], 0.2)
                except (OSError, ValueError):
                    break
                if not ready:
                    continue
                try:
                    data = a.recv(1 << 20)
                except OSError as exc:
                    if not self._stop.is_set():
                        self.errors.append(f"connection {index} dir {direction}: {exc}")
                    self._abort(state)
                    break
                if not data:
                    try:
                        b.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    break
                if out is not None:
                    out.write(data)
                self.counts[index][direction] += len(data)
                if direction == 0 and self.counts[index][0] > self.max_bytes:
                    self.errors.append(f"connection {index}: more than {self.max_bytes} bytes")
                    self._abort(state)
                    break
                try:
                    b.sendall(data)
                except OSError as exc:
                    if not self._stop.is_set():
                        self.errors.append(f"connection {index} dir {direction}: send: {exc}")
                    self._abort(state)
                    break
        finally:
            with self._lock:
                state["open"] -= 1
                last_of_pair = state["open"] == 0
                self._active -= 1
                all_done = self._active == 0 and not self._accepting
            if last_of_pair:
                if state["out"] is not None:
                    state["out"].close()
                for s in (state["src"], state["dst"]):
                    try:
                        s.close()
                    except OSError:
                        pass
            if all_done:
                self._finished.set()

    @staticmethod
    def _abort(state: dict) -> None:
        for s in (state["src"], state["dst"]):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until every connection is finished; True if it did in time."""
        return self._finished.wait(timeout)

    def close(self, remove: bool = False) -> None:
        """Stop relaying; ``remove=True`` also deletes the temp dir (and a
        default record file inside it)."""
        self._stop.set()
        with self._lock:
            socks = list(self._sockets)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)
        if remove:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def read(self, index: int = 0) -> bytes:
        """The recorded source-to-destination bytes of connection ``index``."""
        with open(self.record_paths[index], "rb") as f:
            return f.read()

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc) -> None:
        self.close(remove=True)


# --------------------------------------------------------------------------
# Comparison helpers
# --------------------------------------------------------------------------

def first_difference(a: bytes, b: bytes, page_size: int = 4096) -> Optional[int]:
    """Offset of the first differing byte of ``a`` and ``b``, or None if equal.

    If one is a prefix of the other the offset is the shorter length. The
    comparison runs page by page (``page_size``) so large images are cheap.
    """
    ma, mb = memoryview(a).cast("B"), memoryview(b).cast("B")
    n = min(len(ma), len(mb))
    chunk = max(page_size, 1) * 256
    pos = 0
    while pos < n:
        end = min(n, pos + chunk)
        if ma[pos:end] != mb[pos:end]:
            # narrow down to the page, then the byte
            for p in range(pos, end, page_size):
                q = min(end, p + page_size)
                if ma[p:q] != mb[p:q]:
                    for i in range(p, q):
                        if ma[i] != mb[i]:
                            return i
        pos = end
    return None if len(ma) == len(mb) else n


def describe_difference(a: bytes, b: bytes, page_size: int = 4096, base: int = 0,
                        names: Tuple[str, str] = ("a", "b")) -> str:
    """A one-line report of where ``a`` and ``b`` differ ("equal" if they don't).

    ``base`` is added to offsets (e.g. the guest-physical address of ``a[0]``).
    """
    off = first_difference(a, b, page_size)
    if off is None:
        return f"equal ({len(a)} bytes)"
    page = (base + off) // page_size * page_size
    ctx_a = bytes(a[off:off + 16]).hex()
    ctx_b = bytes(b[off:off + 16]).hex()
    return (f"first difference at {base + off:#x} (page {page:#x} + {(base + off) - page:#x}); "
            f"{names[0]}[{len(a)}]: {ctx_a or '<end>'} {names[1]}[{len(b)}]: {ctx_b or '<end>'}")
