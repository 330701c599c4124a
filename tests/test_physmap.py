"""qemuram.physmap and qemuram.elfcore without QEMU.

Split points and placements asserted here are the ones real QEMU reported;
each table says which test of tests/integration/test_physmap_qemu.py checked
it (QEMU 10.0.2, ``info mtree -f`` of a paused guest).
"""
from __future__ import annotations

import os
import pathlib
import struct

import pytest

from qemuram.elfcore import (EM_X86_64, ElfNote, write_elf_core,
                             write_raw_physical)
from qemuram.errors import UsageError
from qemuram.physmap import (GiB, KiB, MiB, TiB, LayoutError, PhysicalMemory,
                             Range, UnmappedAddress, device_memory_base,
                             dimm_layout, parse_machine, ram_split, x86_holes,
                             x86_layout)


# ---------------------------------------------------------------- fake blocks

class PatchBlock:
    """A RAMBlock of ``size`` zero bytes with some patches written in."""

    def __init__(self, size, patches=()):
        self.size = size
        self.patches = dict(patches)
        self.reads = 0

    _zeros = {}

    def read(self, offset, length):
        assert 0 <= offset and offset + length <= self.size
        self.reads += 1
        hits = [(at, data) for at, data in self.patches.items()
                if at < offset + length and offset < at + len(data)]
        if not hits:        # reuse one zero buffer: keeps big fake guests fast
            zero = self._zeros.get(length)
            if zero is None:
                zero = self._zeros[length] = bytes(length)
            return zero
        buf = bytearray(length)
        for at, data in hits:
            lo, hi = max(at, offset), min(at + len(data), offset + length)
            if lo < hi:
                buf[lo - offset:hi - offset] = data[lo - at:hi - at]
        return buf


class CountingBlock:
    """Bytes are a function of the offset: block[i] = (i * 7 + salt) % 251."""

    def __init__(self, size, salt=0):
        self.size, self.salt = size, salt

    def byte(self, i):
        return (i * 7 + self.salt) % 251

    def read(self, offset, length):
        return bytes(self.byte(i) for i in range(offset, offset + length))


# ------------------------------------------------------------ split points

MACHINES = ["pc-q35-10.0", "pc-i440fx-10.0"]
SIZES = [64 * MiB, 2 * GiB, 0xB0000000, 3 * GiB, 0xE0000000, 4 * GiB,
         5 * GiB, 6 * GiB, 16 * GiB]

# below_4g for each (family, RAM size), as QEMU 10.0.2 mapped pc.ram:
# confirmed by test_split_matches_qemu (q35 keeps 2 GiB low from 0xB0000000 of
# RAM on, pc 3 GiB from 0xE0000000 on; smaller guests lie wholly below 4 GiB).
QEMU_BELOW_4G = {
    "pc-q35-10.0": {64 * MiB: 64 * MiB, 2 * GiB: 2 * GiB, 0xB0000000: 2 * GiB,
                    3 * GiB: 2 * GiB, 0xE0000000: 2 * GiB, 4 * GiB: 2 * GiB,
                    5 * GiB: 2 * GiB, 6 * GiB: 2 * GiB, 16 * GiB: 2 * GiB},
    "pc-i440fx-10.0": {64 * MiB: 64 * MiB, 2 * GiB: 2 * GiB,
                       0xB0000000: 0xB0000000, 3 * GiB: 3 * GiB,
                       0xE0000000: 3 * GiB, 4 * GiB: 3 * GiB, 5 * GiB: 3 * GiB,
                       6 * GiB: 3 * GiB, 16 * GiB: 3 * GiB},
}


def _check_invariants(layout, ram_size, ram_block="pc.ram"):
    assert layout == sorted(layout, key=lambda r: r.gpa)
    for a, b in zip(layout, layout[1:]):
        assert a.end <= b.gpa, (a, b)
    for r in layout:
        assert r.length > 0
    ram = [r for r in layout if r.block == ram_block]
    # below 4 GiB the block is mapped 1:1, above it continues where it stopped
    for r in ram:
        if r.gpa < 4 * GiB:
            assert r.gpa == r.block_offset and r.end <= 4 * GiB
    high = [r for r in ram if r.gpa >= 4 * GiB]
    assert len(high) <= 1
    return ram, high


@pytest.mark.parametrize("ram_size", SIZES, ids=[hex(s) for s in SIZES])
@pytest.mark.parametrize("machine", MACHINES)
def test_ram_view_split_points(machine, ram_size):
    layout = x86_layout(machine, ram_size, legacy="ram")
    ram, high = _check_invariants(layout, ram_size)
    below = QEMU_BELOW_4G[machine][ram_size]
    assert sum(r.length for r in ram) == ram_size
    assert ram[0] == Range(0, below, "pc.ram", 0)
    if ram_size > below:
        assert high == [Range(4 * GiB, ram_size - below, "pc.ram", below)]
    else:
        assert high == []
    s = ram_split(machine, ram_size)
    assert (s.below_4g, s.above_4g, s.above_4g_start) == (below, ram_size - below, 4 * GiB)


@pytest.mark.parametrize("ram_size", SIZES, ids=[hex(s) for s in SIZES])
@pytest.mark.parametrize("machine", MACHINES)
@pytest.mark.parametrize("legacy", ["firmware", "reset"])
def test_guest_views_hide_the_legacy_window(machine, ram_size, legacy):
    layout = x86_layout(machine, ram_size, legacy=legacy, bios_size=256 * KiB,
                        rom_size=128 * KiB)
    ram, _ = _check_invariants(layout, ram_size)
    hidden = 0x20000 if legacy == "firmware" else 0x60000   # VGA (+ ROM area)
    assert sum(r.length for r in ram) == ram_size - hidden
    pm = PhysicalMemory(layout, {"pc.ram": PatchBlock(ram_size),
                                 "pc.bios": PatchBlock(256 * KiB),
                                 "pc.rom": PatchBlock(128 * KiB)})
    assert not pm.is_mapped(0xA0000) and not pm.is_mapped(0xBFFFF)
    assert pm.translate(0x9FFFF) == ("pc.ram", 0x9FFFF)
    assert pm.translate(0xFFFFF) == (("pc.ram", 0xFFFFF) if legacy == "firmware"
                                     else ("pc.bios", 256 * KiB - 1))
    assert pm.translate(4 * GiB - 1) == ("pc.bios", 256 * KiB - 1)


def test_reset_view_matches_what_qemu_showed():
    # test_planted_patterns_and_pmemsave / test_split_matches_qemu: pc.rom at
    # 0xC0000, the BIOS tail at 0xE0000 (a 64 KiB BIOS: at 0xF0000 with pc.ram
    # showing through below it), the BIOS below 4 GiB.
    got = x86_layout("pc-i440fx-10.0", 5 * GiB, legacy="reset",
                     bios_size=64 * KiB, rom_size=128 * KiB)
    assert got == [
        Range(0, 0xA0000, "pc.ram", 0),
        Range(0xC0000, 0x20000, "pc.rom", 0),
        Range(0xE0000, 0x10000, "pc.ram", 0xE0000),
        Range(0xF0000, 0x10000, "pc.bios", 0),
        Range(0x100000, 3 * GiB - 0x100000, "pc.ram", 0x100000),
        Range(4 * GiB - 64 * KiB, 64 * KiB, "pc.bios", 0),
        Range(4 * GiB, 2 * GiB, "pc.ram", 3 * GiB)]
    # unknown ROM sizes: those parts stay unmapped
    bare = x86_layout("pc-i440fx-10.0", 1 * GiB, legacy="reset")
    assert [(r.gpa, r.end) for r in bare] == [(0, 0xA0000), (0x100000, 1 * GiB)]


def test_q35_without_smm_or_vga_shows_ram_in_the_vga_window():
    # test_split_matches_qemu (smm=off) and test_vga_window
    for kw in (dict(smm=False), dict(vga=False)):
        got = x86_layout("pc-q35-10.0", 1 * GiB, legacy="firmware", **kw)
        assert got == [Range(0, 1 * GiB, "pc.ram", 0)]
    # pc keeps VGA MMIO there without SMM, but not without a VGA device
    assert not PhysicalMemory(
        x86_layout("pc-i440fx-10.0", GiB, smm=False),
        {"pc.ram": PatchBlock(GiB)}).is_mapped(0xA0000)
    assert x86_layout("pc-i440fx-10.0", GiB, vga=False) == [Range(0, GiB, "pc.ram", 0)]


def test_tiny_guest_is_clipped():
    got = x86_layout("pc-q35-10.0", 512 * KiB, legacy="firmware")
    assert got == [Range(0, 512 * KiB, "pc.ram", 0)]
    got = x86_layout("pc-q35-10.0", 0xB0000, legacy="firmware")
    assert got == [Range(0, 0xA0000, "pc.ram", 0)]


# ------------------------------------------------- machine-type differences

@pytest.mark.parametrize("machine,aligned", [
    ("pc", True), ("q35", True), ("pc-i440fx-10.0", True), ("pc-i440fx-2.0", True),
    ("pc-i440fx-1.7", False), ("pc-1.3", False), ("pc-0.15", False),
    ("pc-q35-2.0", True), ("pc-q35-1.7", False), ("pc-q35-4.0.1", True),
    ("pc-i440fx-rhel7.6.0", True), ("pc-q35-rhel9.6.0", True), ("rhel6.6.0", False),
])
def test_gigabyte_align_by_version(machine, aligned):
    assert parse_machine(machine).gigabyte_align is aligned


def test_pre_2_0_machine_types_keep_the_old_split():
    # derived from QEMU's rules (these types no longer exist in QEMU 10)
    assert ram_split("pc-i440fx-1.7", 4 * GiB).below_4g == 0xE0000000
    assert ram_split("pc-i440fx-2.0", 4 * GiB).below_4g == 3 * GiB
    assert ram_split("pc-i440fx-1.7", 0xE0000000).below_4g == 0xE0000000
    assert ram_split("pc-q35-1.7", 4 * GiB).below_4g == 0xB0000000
    assert ram_split("pc-q35-1.7", 2 * GiB).below_4g == 2 * GiB
    assert ram_split("pc-q35-10.0", 4 * GiB, gigabyte_align=False).below_4g == 0xB0000000


@pytest.mark.parametrize("machine,ram_size,limit,below", [
    # confirmed by test_max_ram_below_4g
    ("pc-i440fx-10.0", 4 * GiB, 2 * GiB, 2 * GiB),
    ("pc-i440fx-10.0", 3968 * MiB, 4 * GiB, 3968 * MiB),
    ("pc-i440fx-10.0", 5 * GiB, 0xF0000000, 3 * GiB),
    ("pc-i440fx-10.0", 3 * GiB, 0xA0000000, 0xA0000000),
    ("pc-q35-10.0", 6 * GiB, 1536 * MiB, 1536 * MiB),
    ("pc-q35-10.0", 2 * GiB, 1 * GiB, 1 * GiB),
    ("pc-q35-10.0", 3 * GiB, 3 * GiB, 2 * GiB),
])
def test_max_ram_below_4g(machine, ram_size, limit, below):
    assert ram_split(machine, ram_size, max_ram_below_4g=limit).below_4g == below
    layout = x86_layout(machine, ram_size, legacy="ram", max_ram_below_4g=limit)
    _check_invariants(layout, ram_size)
    assert sum(r.length for r in layout) == ram_size


@pytest.mark.parametrize("machine,ram_gib,amd,maxmem,slots,relocated", [
    # confirmed by test_amd_1tb_relocation (TCG, qemu64 with the vendor forced)
    ("pc-q35-10.0", 978, True, None, 0, False),
    ("pc-q35-10.0", 979, True, None, 0, True),
    ("pc-q35-10.0", 979, False, None, 0, False),
    ("pc-q35-7.0", 979, True, None, 0, False),
    ("pc-q35-7.1", 979, True, None, 0, True),
    ("pc-i440fx-10.0", 1009, True, None, 0, False),
    ("pc-i440fx-10.0", 1010, True, None, 0, True),
    ("pc-q35-10.0", 960, True, 980, 1, True),
    ("pc-q35-10.0", 960, True, None, 0, False),
])
def test_amd_1tb_relocation(machine, ram_gib, amd, maxmem, slots, relocated):
    s = ram_split(machine, ram_gib * GiB, amd_cpu=amd,
                  maxram_size=maxmem and maxmem * GiB, ram_slots=slots)
    assert s.above_4g_start == (TiB if relocated else 4 * GiB)
    layout = x86_layout(machine, ram_gib * GiB, amd_cpu=amd,
                        maxram_size=maxmem and maxmem * GiB, ram_slots=slots)
    assert layout[-1].gpa == s.above_4g_start
    holes = x86_holes(layout)
    assert any(h.start == 4 * GiB and h.end == TiB for h in holes) == relocated


def test_explicit_above_4g_start_and_hole64_size():
    assert ram_split("q35", 8 * GiB, above_4g_mem_start=TiB).above_4g_start == TiB
    # a smaller 64-bit PCI window needs more RAM before the move
    assert ram_split("q35", 979 * GiB, amd_cpu=True,
                     pci_hole64_size=16 * GiB).above_4g_start == 4 * GiB
    with pytest.raises(UsageError):
        ram_split("q35", 8 * GiB, above_4g_mem_start=2 * GiB)


@pytest.mark.parametrize("bad", ["microvm", "virt", "xenfv-4.2", "isapc", "", "pc-q35-x.y"])
def test_unknown_machine_types_are_rejected(bad):
    with pytest.raises(LayoutError):
        x86_layout(bad, GiB)


def test_bad_arguments():
    with pytest.raises(UsageError):
        ram_split("pc", 0)
    with pytest.raises(UsageError):
        ram_split("pc", GiB, max_ram_below_4g=5 * GiB)
    with pytest.raises(UsageError):
        x86_layout("pc", GiB, legacy="bogus")
    with pytest.raises(UsageError):
        x86_layout("pc", GiB, bios_size=0)
    assert issubclass(LayoutError, UsageError) and issubclass(UnmappedAddress, UsageError)
    assert issubclass(UsageError, ValueError)


# ----------------------------------------------------------------- DIMMs

@pytest.mark.parametrize("machine,ram_size,base", [
    # confirmed by test_dimm_placement
    ("pc-q35-10.0", 1 * GiB, 4 * GiB), ("pc-q35-10.0", 4608 * MiB, 7 * GiB),
    ("pc-q35-10.0", 5 * GiB, 7 * GiB), ("pc-i440fx-10.0", 1 * GiB, 4 * GiB),
    ("pc-i440fx-10.0", 4608 * MiB, 6 * GiB), ("pc-i440fx-10.0", 5 * GiB, 6 * GiB),
])
def test_device_memory_base(machine, ram_size, base):
    assert device_memory_base(machine, ram_size) == base


def test_dimm_first_fit():
    # the order QEMU used in test_dimm_placement: mem4 fills the gap that the
    # 1 GiB aligned mem3 left behind mem2
    got = dimm_layout("pc-q35-10.0", 5 * GiB, [
        ("mem1", 130 * MiB), ("mem2", 256 * MiB), ("mem3", GiB, GiB), ("mem4", 64 * MiB)])
    base = 7 * GiB
    assert got == [Range(base, 130 * MiB, "mem1"),
                   Range(base + 130 * MiB, 256 * MiB, "mem2"),
                   Range(base + GiB, GiB, "mem3"),
                   Range(base + 386 * MiB, 64 * MiB, "mem4")]
    with pytest.raises(LayoutError):
        device_memory_base("pc-i440fx-2.0", GiB)    # no DIMM area yet


def test_physical_memory_for_x86_places_dimms_and_extras():
    blocks = {"pc.ram": PatchBlock(5 * GiB), "pc.bios": PatchBlock(256 * KiB),
              "pc.rom": PatchBlock(128 * KiB),
              "mem1": PatchBlock(130 * MiB, {0: b"DIMM1"}),
              "mem9": PatchBlock(2 * MiB, {0: b"DIMM9"})}
    pm = PhysicalMemory.for_x86("pc-q35-10.0", blocks, dimms=["mem1"],
                                extra=[(100 * GiB, "mem9")])
    assert pm.read(7 * GiB, 5) == b"DIMM1"
    assert pm.read(100 * GiB, 5) == b"DIMM9"
    assert pm.translate(4 * GiB - 1) == ("pc.bios", 256 * KiB - 1)
    assert pm.find(0xC0000).block == "pc.ram"          # firmware view by default
    with pytest.raises(LayoutError):
        PhysicalMemory.for_x86("pc-q35-10.0", {"pc.ram": PatchBlock(GiB)}, dimms=["nope"])


# ------------------------------------------------------- PhysicalMemory

def _three_ranges():
    a, b = CountingBlock(0x3000, salt=1), CountingBlock(0x2000, salt=2)
    layout = [Range(0x1000, 0x1000, "a", 0x2000), Range(0x2000, 0x2000, "b", 0),
              Range(0x6000, 0x1000, "a", 0)]
    return PhysicalMemory(layout, {"a": a, "b": b}), a, b


def test_reads_across_range_boundaries():
    pm, a, b = _three_ranges()
    want = bytes(a.byte(0x2000 + i) for i in range(0x1000)) + \
        bytes(b.byte(i) for i in range(0x2000))
    assert pm.read(0x1000, 0x3000) == want
    assert pm.read(0x1ff0, 0x20) == want[0xff0:0x1010]
    assert pm.read(0x3ffe, 2) == bytes(b.byte(i) for i in (0x1ffe, 0x1fff))
    assert pm.read(0x1234, 0) == b""
    assert pm.ranges[0].gpa == 0x1000 and len(pm.ranges) == 3
    assert pm.end == 0x7000 and pm.mapped_bytes == 0x4000


def test_unmapped_reads():
    pm, a, b = _three_ranges()
    with pytest.raises(UnmappedAddress) as ei:
        pm.read(0x3000, 0x2000)            # runs off the end of b at 0x4000
    assert ei.value.address == 0x4000 and ei.value.length == 0x1000
    with pytest.raises(UnmappedAddress) as ei:
        pm.read(0, 1)
    assert ei.value.address == 0
    with pytest.raises(UnmappedAddress):
        pm.read(0x7000, 16)
    got = pm.read(0x3ff0, 0x2020, unmapped="zero")
    assert got[:0x10] == bytes(b.byte(0x1ff0 + i) for i in range(0x10))
    assert got[0x10:0x2010] == bytes(0x2000)
    assert got[0x2010:] == bytes(a.byte(i) for i in range(0x10))
    assert pm.read(0x8000, 0x10, unmapped="zero") == bytes(16)
    assert pm.read(0, 0x8000, unmapped="zero")[0x1000:0x1001] == bytes([a.byte(0x2000)])
    with pytest.raises(UsageError):
        pm.read(0x1000, 1, unmapped="ignore")
    with pytest.raises(UnmappedAddress):
        pm.translate(0x5000)
    assert pm.is_mapped(0x1000, 0x3000) and not pm.is_mapped(0x1000, 0x3001)


def test_raise_happens_before_any_block_read():
    blk = PatchBlock(0x10000)
    pm = PhysicalMemory([Range(0, 0x1000, "x"), Range(0x2000, 0x1000, "x", 0x1000)],
                        {"x": blk})
    with pytest.raises(UnmappedAddress):
        pm.read(0, 0x3000)
    assert blk.reads == 0


def test_layout_validation():
    blocks = {"a": PatchBlock(0x2000)}
    with pytest.raises(LayoutError):       # beyond the block
        PhysicalMemory([Range(0, 0x1000, "a", 0x1800)], blocks)
    with pytest.raises(LayoutError):       # overlap
        PhysicalMemory([Range(0, 0x1000, "a"), Range(0xFFF, 0x10, "a")], blocks)
    with pytest.raises(LayoutError):       # unknown block
        PhysicalMemory([Range(0, 0x1000, "b")], blocks)
    with pytest.raises(LayoutError):
        PhysicalMemory([Range(0, 0, "a")], blocks)
    with pytest.raises(LayoutError):       # extra pair overlapping the layout
        PhysicalMemory([Range(0, 0x1000, "a")], blocks, extra=[(0x800, "a")])


def test_holes_are_described():
    holes = x86_holes("pc-q35-10.0", 6 * GiB, legacy="firmware", bios_size=256 * KiB)
    assert [(h.start, h.end) for h in holes] == [(0xA0000, 0xC0000),
                                                 (2 * GiB, 4 * GiB - 256 * KiB)]
    assert "VGA" in holes[0].what and "PCI" in holes[1].what


# -------------------------------------------------------------- ELF reader

def read_elf(path):
    """A tiny independent ELF64 reader: header fields and program headers."""
    with open(path, "rb") as f:
        ehdr = f.read(64)
        assert ehdr[:4] == b"\x7fELF"
        cls, data, ver = ehdr[4], ehdr[5], ehdr[6]
        (e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags,
         e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum,
         e_shstrndx) = struct.unpack("<HHIQQQIHHHHHH", ehdr[16:])
        f.seek(e_phoff)
        raw = f.read(e_phentsize * e_phnum)
    phdrs = [dict(zip(("type", "flags", "offset", "vaddr", "paddr", "filesz",
                       "memsz", "align"),
                      struct.unpack_from("<IIQQQQQQ", raw, i * e_phentsize)))
             for i in range(e_phnum)]
    return dict(cls=cls, data=data, ver=ver, type=e_type, machine=e_machine,
                phentsize=e_phentsize, shnum=e_shnum), phdrs


def pread(path, offset, n):
    with open(path, "rb") as f:
        return os.pread(f.fileno(), n, offset)


def _guest_with_patterns():
    """A q35 guest of 0xB0000000 bytes (split 2 GiB + 768 MiB) with markers."""
    ram_size = 0xB0000000
    patches = {0x1000: b"LOW!" * 1024, 0x7FFFF000: b"EDGE" * 1024,
               0x80000000 + 0x5000: b"HIGH" * 1024,       # 4 GiB + 0x5000
               ram_size - 0x10: b"LAST-BYTES-HERE!"}
    blocks = {"pc.ram": PatchBlock(ram_size, patches),
              "pc.bios": PatchBlock(256 * KiB, {0: b"\xea" * 16, 256 * KiB - 16: b"BIOS-END" * 2})}
    return PhysicalMemory.for_x86("pc-q35-10.0", blocks), patches


EXPECTED_READS = [(0x1000, b"LOW!" * 1024), (0x7FFFF000, b"EDGE" * 1024),
                  (4 * GiB + 0x5000, b"HIGH" * 1024),
                  (4 * GiB + 0x30000000 - 0x10, b"LAST-BYTES-HERE!"),
                  (4 * GiB - 16, b"BIOS-END" * 2), (4 * GiB - 256 * KiB, b"\xea" * 16)]


def test_elf_core_structure_contents_and_sparseness(tmp_path):
    pm, _ = _guest_with_patterns()
    path = tmp_path / "guest.elf"
    stats = write_elf_core(path, pm, notes=[ElfNote("QEMURAM", 1, b"pc-q35-10.0")])
    hdr, phdrs = read_elf(path)
    assert (hdr["cls"], hdr["data"], hdr["ver"], hdr["type"], hdr["machine"]) == \
        (2, 1, 1, 4, EM_X86_64)
    assert phdrs[0]["type"] == 4                               # PT_NOTE first
    note = pread(path, phdrs[0]["offset"], phdrs[0]["filesz"])
    namesz, descsz, ntype = struct.unpack_from("<III", note)
    assert (note[12:12 + namesz], ntype) == (b"QEMURAM\0", 1)
    assert note[20:20 + descsz] == b"pc-q35-10.0"
    loads = [p for p in phdrs if p["type"] == 1]
    assert [(p["paddr"], p["memsz"]) for p in loads] == \
        [(r.gpa, r.length) for r in pm.ranges]
    for p in loads:
        assert p["vaddr"] == p["paddr"] and p["filesz"] == p["memsz"]
        assert p["offset"] % 4096 == 0
    for a, b in zip(loads, loads[1:]):
        assert a["offset"] + a["filesz"] <= b["offset"]

    def at(gpa, n):
        p = next(p for p in loads if p["paddr"] <= gpa < p["paddr"] + p["memsz"])
        return pread(path, p["offset"] + gpa - p["paddr"], n)

    for gpa, data in EXPECTED_READS:
        assert at(gpa, len(data)) == data
    assert at(0x2000, 4096) == bytes(4096)
    st = os.stat(path)
    assert st.st_size == stats.file_size == loads[-1]["offset"] + loads[-1]["filesz"]
    assert st.st_size > 2 * GiB
    assert st.st_blocks * 512 < 4 * MiB              # only the markers take space
    assert stats.segments == len(pm.ranges)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


def test_elf_core_from_triples_unaligned_and_small_chunks(tmp_path):
    blob = bytes(range(256)) * 40                       # 10240 bytes, non-zero
    segs = [(0x10000 + 0x123, len(blob), lambda off, n: blob[off:off + n]),
            (0x5000, 4096 * 3, lambda off, n: bytes(n))]
    path = tmp_path / "x.elf"
    write_elf_core(path, segs, chunk_size=8192)
    _, phdrs = read_elf(path)
    assert [p["type"] for p in phdrs] == [1, 1]         # no notes: no PT_NOTE
    first, second = phdrs
    assert (first["paddr"], second["paddr"]) == (0x5000, 0x10123)
    assert second["offset"] % 4096 == 0x123             # congruent to the address
    assert pread(path, second["offset"], len(blob)) == blob
    assert pread(path, first["offset"], 4096 * 3) == bytes(4096 * 3)


def test_failed_write_leaves_nothing(tmp_path):
    def boom(off, n):
        raise RuntimeError("reader failed")
    path = tmp_path / "bad.elf"
    path.write_bytes(b"old contents")
    with pytest.raises(RuntimeError):
        write_elf_core(path, [(0, 4096, boom)])
    assert path.read_bytes() == b"old contents"          # untouched
    assert os.listdir(tmp_path) == ["bad.elf"]
    with pytest.raises(UsageError):
        write_elf_core(tmp_path / "e.elf", [])
    with pytest.raises(UsageError):
        write_elf_core(tmp_path / "o.elf", [(0, 8192, boom), (4096, 10, boom)])
    with pytest.raises(UsageError):
        write_elf_core(tmp_path / "s.elf", [(0, 4096, lambda o, n: b"x")])


def test_raw_physical_image(tmp_path):
    pm, _ = _guest_with_patterns()
    path = tmp_path / "guest.raw"
    stats = write_raw_physical(path, pm)
    st = os.stat(path)
    assert st.st_size == stats.file_size == 4 * GiB + 0x30000000
    assert st.st_blocks * 512 < 4 * MiB
    for gpa, data in EXPECTED_READS:
        assert pread(path, gpa, len(data)) == data
    assert pread(path, 0xA0000, 0x20000) == bytes(0x20000)   # VGA hole: zeros
    with pytest.raises(UsageError):
        write_raw_physical(tmp_path / "short.raw", pm, size=GiB)


def test_elf_readable_by_volatility3(tmp_path):
    try:
        from volatility3.framework import contexts
        from volatility3.framework.layers import elf, physical
    except ImportError as exc:            # it is a test dependency
        pytest.skip(f"volatility3 is not importable ({exc}); "
                    "install it with `pip install volatility3`")
    pm, _ = _guest_with_patterns()
    path = tmp_path / "guest.elf"
    write_elf_core(path, pm)
    # the minimal volatility3 2.x stack: a FileLayer on the file, an
    # Elf64Layer on top of it (its config names the base layer)
    ctx = contexts.Context()
    ctx.config["file.location"] = pathlib.Path(path).as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "file", "file"))
    ctx.config["memory.base_layer"] = "file"
    layer = elf.Elf64Layer(ctx, "memory", "memory")
    ctx.add_layer(layer)
    for gpa, data in EXPECTED_READS:
        assert layer.read(gpa, len(data)) == data
    assert layer.read(0x100000, 16) == bytes(16)
    assert not layer.is_valid(0xA0000)                  # the VGA hole
    assert layer.is_valid(4 * GiB + 0x1000)


def test_low_ram_covers_the_bios_when_raised_that_high():
    # RAM has priority over the BIOS in the PCI space below it.  (QEMU 10.0.2
    # itself refuses to start a pc guest with this much RAM below 4 GiB, so
    # this is only reachable with explicit arguments.)
    got = x86_layout("pc", 0xFFFE0000, max_ram_below_4g=4 * GiB, legacy="ram",
                     bios_size=256 * KiB)
    assert got == [Range(0, 0xFFFE0000, "pc.ram", 0),
                   Range(0xFFFE0000, 0x20000, "pc.bios", 0x20000)]
