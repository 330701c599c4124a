"""qemuram.physmap against a real QEMU (10.0.2 when these were written).

Each test starts ``qemu-system-x86_64`` paused (``-S``; a paused guest never
touches its RAM, so even 1 TiB guests with ``reserve=off`` cost nothing), reads
the flat view of the ``memory`` address space from ``info mtree -f`` and
checks that the RAMBlocks appear exactly where :func:`x86_layout` /
:func:`dimm_layout` put them.  Patterns planted with ``-device loader`` are
read back with ``pmemsave`` and through :class:`PhysicalMemory` over the file
that backs guest RAM.  These runs are the source of the split points listed in
tests/test_physmap.py.

Skipped when qemu-system-x86_64 is absent, except under CI=true where that is
a failure.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from qemuram.elfcore import write_elf_core
from qemuram.physmap import (GiB, KiB, MiB, PhysicalMemory, Range,
                             UnmappedAddress, device_memory_base, dimm_layout,
                             ram_split, x86_layout)

pytestmark = pytest.mark.integration

QEMU = shutil.which("qemu-system-x86_64")
ACCEL = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


@pytest.fixture(autouse=True)
def _need_qemu():
    if QEMU is None:
        if os.environ.get("CI") == "true":
            pytest.fail("qemu-system-x86_64 is required under CI=true")
        pytest.skip("qemu-system-x86_64 is not installed")


# ------------------------------------------------------------------ QMP helper

class Qemu:
    """A paused QEMU reachable over QMP (qemu.qmp's legacy sync client)."""

    def __init__(self, *args: str, accel: str = ACCEL):
        from qemu.qmp.legacy import QEMUMonitorProtocol
        self.dir = tempfile.mkdtemp(prefix="qr-physmap-")   # short: socket paths
        sock = os.path.join(self.dir, "qmp.sock")
        self.err = open(os.path.join(self.dir, "stderr"), "w+")
        self.proc = subprocess.Popen(
            [QEMU, "-S", "-accel", accel, "-display", "none", "-monitor", "none",
             "-serial", "none", "-parallel", "none", "-net", "none",
             "-qmp", f"unix:{sock},server=on,wait=off", *args],
            stdin=subprocess.DEVNULL, stdout=self.err, stderr=self.err)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"QEMU did not start: {self.stderr()}")
            if os.path.exists(sock):
                mon = QEMUMonitorProtocol(sock)
                try:
                    mon.connect()
                except Exception:     # bound but not listening yet
                    time.sleep(0.02)
                    continue
                self.mon = mon
                break
            time.sleep(0.01)

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def qmp(self, cmd: str, **args):
        reply = self.mon.cmd_raw(cmd, args or None)
        if "error" in reply:
            raise AssertionError(f"{cmd} failed: {reply['error']}")
        return reply["return"]

    def hmp(self, line: str) -> str:
        return self.qmp("human-monitor-command", **{"command-line": line})

    def pmemsave(self, gpa: int, size: int) -> bytes:
        path = os.path.join(self.dir, f"pmem-{gpa:x}-{size:x}")
        self.qmp("pmemsave", val=gpa, size=size, filename=path)
        with open(path, "rb") as f:
            data = f.read()
        os.unlink(path)
        return data

    def close(self) -> None:
        mon = getattr(self, "mon", None)
        if mon is not None and self.proc.poll() is None:
            try:
                mon.cmd_raw("quit")
            except Exception:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if mon is not None:
            try:
                mon.close()
            except Exception:
                pass
        self.err.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Qemu":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------- mtree parsing

_FLAT_LINE = re.compile(
    r"^\s+([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([^)]+)\): (\S+)(?: @([0-9a-f]+))?")


def memory_flat_view(mtree: str) -> List[Tuple[int, int, str, str, int]]:
    """(start, length, kind, region, offset) of the ``memory`` address space
    from ``info mtree -f`` output."""
    for view in mtree.split("FlatView #")[1:]:
        if 'AS "memory"' not in view:
            continue
        out = []
        for line in view.splitlines():
            m = _FLAT_LINE.match(line)
            if m:
                lo, hi = int(m.group(1), 16), int(m.group(2), 16)
                out.append((lo, hi - lo + 1, m.group(3), m.group(4),
                            int(m.group(5) or "0", 16)))
        return out
    raise AssertionError("no flat view for address space 'memory' in:\n" + mtree)


def ram_ranges(q: Qemu, blocks: Sequence[str]) -> List[Tuple[int, int, str, int]]:
    """Where the named RAMBlocks are mapped, adjacent pieces merged (TCG shows
    read-only and writable PAM pieces separately)."""
    out: List[Tuple[int, int, str, int]] = []
    for lo, n, kind, name, off in memory_flat_view(q.hmp("info mtree -f")):
        if name not in blocks or kind not in ("ram", "rom"):
            continue
        if out and out[-1][2] == name and out[-1][0] + out[-1][1] == lo \
                and out[-1][3] + out[-1][1] == off:
            p = out[-1]
            out[-1] = (p[0], p[1] + n, name, p[3])
        else:
            out.append((lo, n, name, off))
    return out


def as_tuples(layout: Sequence[Range], blocks: Sequence[str]):
    return [(r.gpa, r.length, r.block, r.block_offset) for r in layout
            if r.block in blocks]


def size_arg(n: int) -> str:
    return f"{n // MiB}M" if n % GiB else f"{n // GiB}G"


DEFAULT_BLOCKS = ("pc.ram", "pc.bios", "pc.rom")
SEABIOS_SIZE = 256 * KiB     # QEMU's default firmware, bios-256k.bin
PC_ROM_SIZE = 128 * KiB

MACHINES = ["pc-q35-10.0", "pc-i440fx-10.0"]
SIZES = [64 * MiB, 2 * GiB, 0xB0000000, 3 * GiB, 0xE0000000, 4 * GiB,
         5 * GiB, 6 * GiB, 16 * GiB]


# ------------------------------------------------------------------ the split

@pytest.mark.parametrize("ram_size", SIZES, ids=[hex(s) for s in SIZES])
@pytest.mark.parametrize("machine", MACHINES)
def test_split_matches_qemu(machine, ram_size):
    with Qemu("-M", f"{machine},smm=off", "-m", size_arg(ram_size)) as q:
        seen = ram_ranges(q, DEFAULT_BLOCKS)
    want = x86_layout(machine, ram_size, legacy="reset", smm=False,
                      bios_size=SEABIOS_SIZE, rom_size=PC_ROM_SIZE)
    assert seen == as_tuples(want, DEFAULT_BLOCKS)


@pytest.mark.parametrize("ram_size", [0xE0000000, 4 * GiB])
@pytest.mark.parametrize("machine", ["pc-i440fx-2.4", "pc-q35-2.4", "pc-i440fx-7.0",
                                     "pc-q35-7.0", "pc-i440fx-9.2", "pc-q35-9.2"])
def test_split_older_machine_types(machine, ram_size):
    with Qemu("-M", f"{machine},smm=off", "-m", size_arg(ram_size)) as q:
        seen = ram_ranges(q, ("pc.ram",))
    assert seen == as_tuples(x86_layout(machine, ram_size, legacy="reset", smm=False),
                             ("pc.ram",))


@pytest.mark.parametrize("machine,ram_size,limit,below", [
    ("pc-i440fx-10.0", 4 * GiB, 2 * GiB, 2 * GiB),
    ("pc-i440fx-10.0", 3968 * MiB, 4 * GiB, 3968 * MiB),     # raised: all below
    ("pc-i440fx-10.0", 5 * GiB, 0xF0000000, 3 * GiB),        # gigabyte-aligned
    ("pc-i440fx-10.0", 3 * GiB, 0xA0000000, 0xA0000000),     # not a GiB multiple
    ("pc-q35-10.0", 6 * GiB, 1536 * MiB, 1536 * MiB),
    ("pc-q35-10.0", 2 * GiB, 1 * GiB, 1 * GiB),
    ("pc-q35-10.0", 3 * GiB, 3 * GiB, 2 * GiB),               # only ever lowers
])
def test_max_ram_below_4g(machine, ram_size, limit, below):
    with Qemu("-M", f"{machine},smm=off,max-ram-below-4g={limit}",
              "-m", size_arg(ram_size)) as q:
        seen = ram_ranges(q, ("pc.ram",))
    layout = x86_layout(machine, ram_size, legacy="reset", smm=False,
                        max_ram_below_4g=limit)
    assert seen == as_tuples(layout, ("pc.ram",))
    assert ram_split(machine, ram_size, max_ram_below_4g=limit).below_4g == below


# ------------------------------------------------------- AMD 1 TiB relocation

@pytest.mark.parametrize("machine,ram_gib,vendor,mem_opts,relocated", [
    ("pc-q35-10.0", 978, "AuthenticAMD", "", False),
    ("pc-q35-10.0", 979, "AuthenticAMD", "", True),
    ("pc-q35-10.0", 979, "GenuineIntel", "", False),
    ("pc-q35-7.0", 979, "AuthenticAMD", "", False),     # before the rule
    ("pc-q35-7.1", 979, "AuthenticAMD", "", True),
    ("pc-i440fx-10.0", 1009, "AuthenticAMD", "", False),
    ("pc-i440fx-10.0", 1010, "AuthenticAMD", "", True),
    ("pc-q35-10.0", 960, "AuthenticAMD", ",slots=1,maxmem=980G", True),
    ("pc-q35-10.0", 960, "AuthenticAMD", "", False),
])
def test_amd_1tb_relocation(machine, ram_gib, vendor, mem_opts, relocated):
    size = ram_gib * GiB
    # TCG: any phys-bits and vendor are allowed; reserve=off: no swap reservation
    with Qemu("-M", f"{machine},smm=off,memory-backend=pc.ram",
              "-object", f"memory-backend-ram,id=pc.ram,size={ram_gib}G,reserve=off",
              "-m", f"{ram_gib}G{mem_opts}",
              "-cpu", f"qemu64,phys-bits=48,vendor={vendor}", accel="tcg") as q:
        seen = ram_ranges(q, ("pc.ram",))
    kw = dict(amd_cpu=vendor == "AuthenticAMD")
    if "maxmem" in mem_opts:
        kw.update(maxram_size=980 * GiB, ram_slots=1)
    layout = x86_layout(machine, size, legacy="reset", smm=False, **kw)
    assert seen == as_tuples(layout, ("pc.ram",))
    assert (seen[-1][0] == 1 << 40) == relocated


# ------------------------------------------------------------------- DIMMs

@pytest.mark.parametrize("ram_size", [1 * GiB, 4608 * MiB, 5 * GiB])
@pytest.mark.parametrize("machine", MACHINES)
def test_dimm_placement(machine, ram_size, tmp_path):
    dimms = [("mem1", 130 * MiB), ("mem2", 256 * MiB), ("mem3", 1 * GiB, 1 * GiB),
             ("mem4", 64 * MiB)]    # mem4 fills the gap left before mem3
    args = ["-M", f"{machine},smm=off", "-m", f"{size_arg(ram_size)},slots=4,maxmem=16G"]
    for spec in dimms:
        name, size = spec[0], spec[1]
        if len(spec) == 3:
            args += ["-object", f"memory-backend-file,id={name},size={size},"
                     f"align={spec[2]},mem-path={tmp_path / name},share=off"]
        else:
            args += ["-object", f"memory-backend-ram,id={name},size={size}"]
        args += ["-device", f"pc-dimm,memdev={name}"]
    with Qemu(*args) as q:
        seen = ram_ranges(q, [d[0] for d in dimms])
    want = dimm_layout(machine, ram_size, dimms)
    assert sorted(seen) == sorted(as_tuples(want, [d[0] for d in dimms]))
    assert min(r[0] for r in seen) == device_memory_base(machine, ram_size)


# ------------------------------------------- patterns, pmemsave, PhysicalMemory

class FileBlock:
    """A RAMBlock backed by a file (QEMU's memory-backend-file, share=on)."""

    def __init__(self, path: str, size: Optional[int] = None):
        self.path = path
        self.size = os.path.getsize(path) if size is None else size

    def read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), length, offset)
        return data + bytes(length - len(data))


class ZeroBlock:
    def __init__(self, size: int):
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)


def _guest_with_patterns(tmp_path, machine: str, ram_size: int, bios_size: int,
                         plants: Dict[int, bytes], extra: Sequence[str] = ()):
    ram_file = tmp_path / "pc.ram"
    bios_file = tmp_path / "bios.bin"
    bios_file.write_bytes(os.urandom(bios_size))
    args = ["-M", f"{machine},smm=off,memory-backend=pc.ram",
            "-object", f"memory-backend-file,id=pc.ram,size={ram_size},"
                       f"mem-path={ram_file},share=on",
            "-m", size_arg(ram_size), "-bios", str(bios_file), *extra]
    for i, (gpa, data) in enumerate(plants.items()):
        f = tmp_path / f"plant{i}.bin"
        f.write_bytes(data)
        args += ["-device", f"loader,file={f},addr=0x{gpa:x},force-raw=on"]
    q = Qemu(*args)
    blocks = {"pc.ram": FileBlock(str(ram_file), ram_size),
              "pc.bios": FileBlock(str(bios_file)),
              "pc.rom": ZeroBlock(PC_ROM_SIZE)}
    return q, blocks


@pytest.mark.parametrize("machine,bios_size", [("pc-q35-10.0", 256 * KiB),
                                               ("pc-i440fx-10.0", 64 * KiB)])
def test_planted_patterns_and_pmemsave(machine, bios_size, tmp_path):
    ram_size = 5 * GiB
    split = ram_split(machine, ram_size)
    low, edge, high = (b"LOW!" * 1024, b"EDGE" * 1024, b"HIGH" * 2048)
    plants = {0x1000: low,
              split.below_4g - 0x1000: edge,           # last page below the split
              0x100001000: high}
    q, blocks = _guest_with_patterns(tmp_path, machine, ram_size, bios_size, plants)
    with q:
        layout = x86_layout(machine, ram_size, legacy="reset", smm=False,
                            bios_size=bios_size, rom_size=PC_ROM_SIZE)
        assert ram_ranges(q, DEFAULT_BLOCKS) == as_tuples(layout, DEFAULT_BLOCKS)
        pm = PhysicalMemory(layout, blocks)

        # pmemsave sees the planted bytes ...
        for gpa, data in plants.items():
            assert q.pmemsave(gpa, len(data)) == data
        # ... and they sit in pc.ram where the layout says they do
        assert pm.translate(0x100001000) == ("pc.ram", split.below_4g + 0x1000)
        assert blocks["pc.ram"].read(split.below_4g + 0x1000, len(high)) == high
        assert pm.translate(split.below_4g - 0x1000) == ("pc.ram", split.below_4g - 0x1000)
        for gpa, data in plants.items():
            assert pm.read(gpa, len(data)) == data

        # the whole first MiB (RAM, VGA window, pc.rom, isa-bios) agrees with
        # pmemsave when unmapped bytes read as zero, as pmemsave returns them
        assert pm.read(0, 1 * MiB, unmapped="zero") == q.pmemsave(0, 1 * MiB)
        # the BIOS below 4 GiB, the edge of the split, the start of high RAM
        top = 4 * GiB - bios_size
        assert pm.read(top, bios_size) == q.pmemsave(top, bios_size)
        for gpa, n in ((split.below_4g - 2 * MiB, 4 * MiB), (4 * GiB, 16 * MiB),
                       (top - 64 * KiB, 64 * KiB + bios_size)):
            assert pm.read(gpa, n, unmapped="zero") == q.pmemsave(gpa, n)
        with pytest.raises(UnmappedAddress) as ei:
            pm.read(split.below_4g - 16, 32)
        assert ei.value.address == split.below_4g


@pytest.mark.parametrize("machine,smm,vga", [
    ("pc-q35-10.0", True, True), ("pc-i440fx-10.0", True, True),
    ("pc-i440fx-10.0", False, True), ("pc-q35-10.0", True, False),
    ("pc-i440fx-10.0", True, False)])
def test_vga_window(machine, smm, vga):
    """VGA MMIO hides 0xA0000-0xBFFFF only with a VGA device, and on q35 only
    with SMM (TCG here: KVM hosts may lack SMM)."""
    args = ["-M", f"{machine},smm={'on' if smm else 'off'}", "-m", "5G"]
    if not vga:
        args += ["-vga", "none"]
    with Qemu(*args, accel="tcg") as q:
        seen = ram_ranges(q, DEFAULT_BLOCKS)
    want = x86_layout(machine, 5 * GiB, legacy="reset", smm=smm, vga=vga,
                      bios_size=SEABIOS_SIZE, rom_size=PC_ROM_SIZE)
    assert seen == as_tuples(want, DEFAULT_BLOCKS)
    assert any(r[0] <= 0xA0000 < r[0] + r[1] for r in seen) == (not vga)


@pytest.mark.parametrize("machine", MACHINES)
def test_firmware_view_after_seabios(machine):
    """Once SeaBIOS has run, PAM maps pc.ram at 0xC0000-0xFFFFF."""
    with Qemu("-M", f"{machine},smm=off", "-m", "5G") as q:
        q.qmp("cont")
        deadline = time.monotonic() + 60
        while True:
            seen = ram_ranges(q, ("pc.ram",))
            if any(r[0] <= 0xF0000 < r[0] + r[1] for r in seen):
                break
            assert time.monotonic() < deadline, f"PAM never enabled: {seen}"
            time.sleep(0.2)
        q.qmp("stop")
        seen = ram_ranges(q, ("pc.ram",))
    want = x86_layout(machine, 5 * GiB, legacy="firmware", smm=False)
    assert seen == as_tuples(want, ("pc.ram",))


# ------------------------------------------------------ dump-guest-memory

def _elf_loads(path: str) -> List[Tuple[int, int, int, int]]:
    """(p_offset, p_vaddr, p_paddr, p_filesz) of every PT_LOAD."""
    with open(path, "rb") as f:
        head = f.read(64)
        assert head[:4] == b"\x7fELF" and head[4] == 2 and head[5] == 1
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    out = []
    for i in range(phnum):
        p_type, _fl, off, va, pa, fs, ms, _al = struct.unpack_from("<IIQQQQQQ", table,
                                                                   i * phentsize)
        if p_type == 1:
            assert fs == ms
            out.append((off, va, pa, fs))
    return out


@pytest.mark.parametrize("machine", MACHINES)
def test_elf_matches_dump_guest_memory(machine, tmp_path):
    ram_size = 64 * MiB
    plants = {0x2000: b"qemuram!" * 512, 0x3F00000: b"\xa5" * 8192}
    q, blocks = _guest_with_patterns(tmp_path, machine, ram_size, 256 * KiB, plants)
    with q:
        theirs = str(tmp_path / "qemu.core")
        q.qmp("dump-guest-memory", paging=False, protocol=f"file:{theirs}")
        layout = x86_layout(machine, ram_size, legacy="reset", smm=False,
                            bios_size=256 * KiB, rom_size=PC_ROM_SIZE)
        ours = str(tmp_path / "ours.core")
        write_elf_core(ours, PhysicalMemory(layout, blocks))
    a, b = _elf_loads(theirs), _elf_loads(ours)
    # same segments at the same addresses; QEMU also sets p_vaddr = p_paddr
    assert [(pa, n) for _, _, pa, n in a] == [(pa, n) for _, _, pa, n in b]
    assert all(va == pa for _, va, pa, _ in a + b)
    with open(theirs, "rb") as fa, open(ours, "rb") as fb:
        for (oa, _, pa, n), (ob, _, _, _) in zip(a, b):
            for pos in range(0, n, 8 * MiB):
                k = min(8 * MiB, n - pos)
                assert os.pread(fa.fileno(), k, oa + pos) == \
                    os.pread(fb.fileno(), k, ob + pos), f"differs at 0x{pa + pos:x}"
