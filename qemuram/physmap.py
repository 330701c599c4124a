"""Where QEMU's RAMBlocks sit in an x86 guest's physical address space.

A migration stream carries RAM per RAMBlock (``pc.ram``, ``pc.bios``, DIMM
backends, ...), each addressed by its own offset.  Memory-forensics tools want
guest-physical addresses instead.  This module rebuilds the mapping that QEMU
sets up for the ``pc`` (i440fx) and ``q35`` machine families and offers a
:class:`PhysicalMemory` reader on top of it.

How QEMU places ``pc.ram`` (rules as of QEMU 10.0, with the older machine types
that behave differently).  Each rule that QEMU 10.0.2 can still exhibit was
checked against ``info mtree -f`` of a real guest by
``tests/integration/test_physmap_qemu.py``; the pre-2.0 machine types no longer
exist there and follow from QEMU's history.

* The RAM block is cut in two pieces: ``[0, below_4g)`` is mapped 1:1 from
  guest-physical address 0, the rest (``above_4g`` bytes, starting at block
  offset ``below_4g``) is mapped from 4 GiB upward.

* q35: the split point ("lowmem") is 0xB0000000 (2.75 GiB, leaving room for the
  PCI hole and the 256 MiB PCIe MMCONFIG window at 0xB0000000) for guests with
  less than 0xB0000000 bytes of RAM -- they fit entirely below 4 GiB.  Guests
  with 0xB0000000 bytes or more keep only 2 GiB below 4 GiB, so that 1 GiB
  aligned guest addresses stay 1 GiB aligned in the block.  Machine types
  pc-q35-1.7 and older (no "gigabyte alignment") keep 0xB0000000 below 4 GiB
  instead.

* pc / i440fx: the split point is 0xE0000000 (3.5 GiB).  When the guest has at
  least that much RAM, machine types newer than pc-i440fx-1.7 (and the old
  ``pc-1.x``/``pc-0.x`` names) lower it to 0xC0000000 (3 GiB, gigabyte
  alignment); 1.7 and older keep 3.5 GiB.  A 3 GiB guest therefore lies wholly
  below 4 GiB, a 3.5 GiB one is split 3 GiB + 512 MiB.

* ``max-ram-below-4g`` (machine property, at most 4 GiB, 0 meaning "unset"):
  for q35 it caps the split point (``min(rule above, property)``).  For pc it
  replaces the 3.5 GiB default (so it can also *raise* the split point, up to
  4 GiB) and the gigabyte alignment still lowers it to 3 GiB when RAM reaches
  the property's value.

* The part above 4 GiB normally starts at exactly 4 GiB.  Since machine types
  7.1 (both families), a guest whose CPU reports the AMD vendor gets that part
  moved to 1 TiB when the highest guest-physical address QEMU plans to use --
  the 64-bit PCI window, which starts at the 1 GiB-rounded end of RAM (or of
  the DIMM area when ``maxmem`` is set) and is ``pci-hole64-size`` long (32 GiB
  by default on q35, 2 GiB on pc) -- would reach the HyperTransport range at
  0xFD00000000.  With default sizes that is a q35 guest of 979 GiB or more, a pc
  guest of 1010 GiB or more.  The CPU vendor is not part of the machine type:
  pass ``amd_cpu=True`` (with KVM the vendor follows the host unless the CPU
  model sets one; TCG's default ``qemu64`` model is AMD).  SGX EPC sections and
  CXL windows, which also shift these addresses, are not modelled; give
  ``above_4g_mem_start`` explicitly in such setups.

* DIMMs (``pc-dimm``, RAMBlock named after the memory backend, e.g. ``mem1``)
  live in the device-memory area, which starts at the end of the above-4G RAM
  rounded up to 1 GiB (at 4 GiB when all RAM is below 4 GiB).  QEMU places each
  DIMM without an explicit ``addr`` at the lowest free address of that area
  aligned to the backend's alignment (2 MiB for ordinary anonymous RAM on an
  x86-64 Linux host, the page size or ``align=`` for file backends), in plug
  order.  :func:`dimm_layout` reproduces that; DIMMs with explicit addresses
  can be given as ``extra`` pairs to :class:`PhysicalMemory`.

The legacy window below 1 MiB (``legacy=`` argument of :func:`x86_layout`)

``pc.ram`` has bytes at every offset below ``below_4g``, but the guest does not
always see them:

* 0xA0000-0xBFFFF is the VGA window.  When the machine has a VGA-compatible
  display device (the default ``-vga std`` has) it is VGA MMIO
  (``vga-lowmem``) on pc, and on q35 when the machine has SMM (TCG, or KVM
  hosts that support SMM).  On q35 without SMM (``smm=off``, or a KVM host
  without SMM support) QEMU installs no SMRAM/VGA overlay, and without a VGA
  device nothing claims the window: in both cases the guest sees ``pc.ram``
  there.  Pass ``smm=False`` / ``vga=False`` accordingly.
* 0xC0000-0xFFFFF is the option-ROM / BIOS area, routed by the chipset's PAM
  registers.  Right after reset (a guest started with ``-S`` and never run) the
  PAM registers send accesses to PCI, where 0xC0000-0xDFFFF is the 128 KiB
  ``pc.rom`` block and the top of the first MiB is an alias of the last 128 KiB
  of ``pc.bios`` ("isa-bios"; the whole BIOS when it is smaller).  Where
  nothing on PCI answers (0xE0000-0xEFFFF with a 64 KiB BIOS) ``pc.ram`` shows
  through.  Once the firmware (SeaBIOS, OVMF) has run it copies itself into
  RAM and switches PAM to RAM, so a running guest sees ``pc.ram`` in the whole
  area.

What ``pmemsave`` returns on a paused guest (checked with QEMU 10.0.2, KVM and
TCG, guest started with ``-S``): RAM where the flat view has RAM; zeros in the
VGA window (it reads the freshly reset VGA memory); the ``pc.rom`` bytes
(zeros unless something was loaded there) at 0xC0000-0xDFFFF; the BIOS tail at
0xE0000-0xFFFFF and the whole BIOS just below 4 GiB; zeros for every address
where nothing is mapped (PCI hole, beyond RAM) -- ``pmemsave`` does not fail
there.  :class:`PhysicalMemory` with ``unmapped='zero'`` reproduces this.

Views offered by :func:`x86_layout`:

``legacy="firmware"`` (default)
    The guest's view once its firmware has run -- what a migration stream of a
    running guest corresponds to: the VGA window is a hole (unless q35 without
    SMM, or no VGA device), 0xC0000-0xFFFFF comes from ``pc.ram``.
``legacy="reset"``
    The view right after reset (paused with ``-S``): VGA hole as above,
    ``pc.rom`` at 0xC0000 and the isa-bios alias at the top of the first MiB,
    ``pc.ram`` in the rest of the area.  Without ``rom_size``/``bios_size``
    the parts those blocks would decide are left unmapped.
``legacy="ram"``
    The "ram map": all of ``pc.ram`` below 4 GiB mapped 1:1, no holes.  Reads
    agree with the guest wherever the guest sees RAM, and also return the RAM
    bytes hidden behind the VGA window and the ROM shadow area.

In every view ``pc.bios`` is mapped at 4 GiB minus its size when
``bios_size`` is given.  Other things the guest may see that are *not* modelled:
q35's TSEG (top of low RAM turned into a read-as-0xff black hole once OVMF
locks SMRAM) and the SMBASE black hole at 0x30000 that OVMF can enable, PCI BAR
RAM such as ``vga.vram``, and ROMs of PCI devices.  :func:`x86_holes` lists the
gaps of a layout.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import (Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple,
                    Union)

from .errors import UsageError

__all__ = [
    "KiB", "MiB", "GiB", "TiB", "Range", "Hole", "MachineType", "RamSplit",
    "UnmappedAddress", "LayoutError", "parse_machine", "ram_split",
    "device_memory_base", "dimm_base", "dimm_layout", "x86_layout",
    "x86_holes", "PhysicalMemory", "LEGACY_VIEWS",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

FOUR_GIB = 4 * GiB
#: Legacy VGA frame-buffer window.
VGA_START, VGA_END = 0xA0000, 0xC0000
#: Option ROM / BIOS shadow area routed by the PAM registers.
ROM_AREA_START, ROM_AREA_END = 0xC0000, 0x100000
#: ``pc.rom`` is mapped here in the reset view (QEMU makes it 128 KiB).
PC_ROM_BASE = 0xC0000
PC_ROM_MAX_SIZE = 0x20000
#: Largest BIOS tail aliased below 1 MiB.
ISA_BIOS_MAX = 128 * KiB
#: Start of the AMD HyperTransport reserved range, and where RAM above 4 GiB
#: moves to when it would collide with it.
AMD_HT_START = 0xFD_0000_0000
AMD_ABOVE_1TB_START = TiB
#: Alignment of an anonymous-RAM memory backend on an x86-64 Linux host.
DEFAULT_DIMM_ALIGN = 2 * MiB

LEGACY_VIEWS = ("firmware", "reset", "ram")


class UnmappedAddress(UsageError):
    """A guest-physical read touched an address no RAMBlock is mapped at."""

    def __init__(self, address: int, length: int = 1,
                 message: Optional[str] = None):
        self.address = address
        self.length = length
        if message is None:
            message = f"guest-physical address 0x{address:x} is not mapped"
            if length > 1:
                message += f" (nor are the {length - 1} bytes after it that were asked for)"
        super().__init__(message)


class LayoutError(UsageError):
    """A layout that cannot be built: unknown machine, overlapping ranges,
    a range outside its block, a block missing from the mapping."""


@dataclass(frozen=True)
class Range:
    """``length`` bytes of RAMBlock ``block`` from ``block_offset`` on, seen
    by the guest at physical address ``gpa``."""

    gpa: int
    length: int
    block: str
    block_offset: int = 0

    @property
    def end(self) -> int:
        """First guest-physical address after the range."""
        return self.gpa + self.length

    @property
    def block_end(self) -> int:
        return self.block_offset + self.length

    def contains(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.end

    def block_address(self, gpa: int) -> int:
        """Offset in the block of guest-physical address ``gpa``."""
        if not self.contains(gpa):
            raise UnmappedAddress(gpa, message=f"0x{gpa:x} is outside {self}")
        return self.block_offset + (gpa - self.gpa)

    def __str__(self) -> str:
        return (f"[0x{self.gpa:x}, 0x{self.end:x}) -> {self.block}"
                f"@0x{self.block_offset:x}")


@dataclass(frozen=True)
class Hole:
    """A gap in a layout: ``[start, end)`` maps no RAMBlock."""

    start: int
    end: int
    what: str


# --------------------------------------------------------------------------
# machine types

@dataclass(frozen=True)
class MachineType:
    """What the memory layout needs to know about a machine type name."""

    name: str
    family: str                         # "q35" or "i440fx"
    version: Optional[Tuple[int, ...]]  # None: current (an alias, or unparsed)
    gigabyte_align: bool
    #: RAM above 4 GiB may move to 1 TiB for AMD CPUs (machine types >= 7.1)
    amd_1tb_hole: bool
    #: default ``pci-hole64-size`` of the host bridge
    pci_hole64_size: int
    #: DIMMs / ``maxmem`` are possible (machine types newer than 2.0)
    has_device_memory: bool


_VERSION_RE = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?$")


def _version(text: str, machine: str) -> Tuple[int, ...]:
    m = _VERSION_RE.match(text)
    if not m:
        raise LayoutError(f"cannot read the version of machine type {machine!r}")
    return tuple(int(g) for g in m.groups() if g is not None)


def parse_machine(machine: str) -> MachineType:
    """Classify a machine type name as written in a migration stream.

    Accepted: ``pc``, ``q35``, ``pc-i440fx-X.Y``, ``pc-q35-X.Y[.Z]``, the old
    i440fx names ``pc-0.N``/``pc-1.N``, and RHEL's ``pc-i440fx-rhelX.Y.Z``,
    ``pc-q35-rhelX.Y.Z`` and ``rhel6.N.0``.  RHEL types are assumed to follow
    upstream's current rules (RHEL 6 ones the pre-2.0 rules); the 1 TiB AMD
    relocation is assumed for RHEL 9.2 and later.  Pass the keyword overrides
    of :func:`ram_split` if a downstream machine type differs.
    """
    if not isinstance(machine, str) or not machine:
        raise LayoutError(f"machine type must be a non-empty string, not {machine!r}")
    name = machine.strip()
    family: Optional[str] = None
    version: Optional[Tuple[int, ...]] = None
    rhel: Optional[Tuple[int, ...]] = None
    if name in ("pc", "q35"):
        family = "i440fx" if name == "pc" else "q35"
    elif name.startswith("pc-q35-"):
        family, rest = "q35", name[len("pc-q35-"):]
    elif name.startswith("pc-i440fx-"):
        family, rest = "i440fx", name[len("pc-i440fx-"):]
    elif re.match(r"^pc-\d", name):
        family, rest = "i440fx", name[len("pc-"):]
    elif name.startswith("rhel6."):
        family, rest = "i440fx", name
    else:
        raise LayoutError(
            f"machine type {machine!r} is not a pc (i440fx) or q35 machine; "
            "only those x86 layouts are known")
    if name not in ("pc", "q35"):
        if rest.startswith("rhel"):
            rhel = _version(rest[4:], machine)
        else:
            version = _version(rest, machine)

    if rhel is not None:
        legacy = rhel[0] < 7
        return MachineType(
            name=name, family=family, version=None,
            gigabyte_align=not legacy,
            amd_1tb_hole=rhel[:2] >= (9, 2),
            pci_hole64_size=(32 * GiB if family == "q35" else 2 * GiB),
            has_device_memory=not legacy)

    v = version
    gigabyte_align = v is None or v >= (2, 0)
    return MachineType(
        name=name, family=family, version=v,
        gigabyte_align=gigabyte_align,
        amd_1tb_hole=v is None or v >= (7, 1),
        pci_hole64_size=(32 * GiB if family == "q35" else 2 * GiB),
        has_device_memory=v is None or v >= (2, 1))


# --------------------------------------------------------------------------
# the split of pc.ram

@dataclass(frozen=True)
class RamSplit:
    """How the main RAM block is cut: ``below_4g`` bytes at address 0, the
    remaining ``above_4g`` bytes at ``above_4g_start``."""

    ram_size: int
    below_4g: int
    above_4g: int
    above_4g_start: int

    @property
    def above_4g_end(self) -> int:
        return self.above_4g_start + self.above_4g


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def _check_size(name: str, value: Any, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def ram_split(machine: Union[str, MachineType], ram_size: int, *,
              max_ram_below_4g: Optional[int] = None,
              gigabyte_align: Optional[bool] = None,
              amd_cpu: bool = False,
              maxram_size: Optional[int] = None,
              ram_slots: int = 0,
              pci_hole64_size: Optional[int] = None,
              above_4g_mem_start: Optional[int] = None) -> RamSplit:
    """Compute how QEMU cuts the main RAM block of ``machine``.

    ``max_ram_below_4g`` is the machine property of that name (``None`` or 0:
    not set).  ``gigabyte_align`` overrides the machine type's default.
    ``amd_cpu``, ``maxram_size`` (``-m ...,maxmem=``), ``ram_slots``
    (``-m ...,slots=``) and ``pci_hole64_size`` only matter for the 1 TiB AMD
    relocation; ``above_4g_mem_start`` forces the start of the high part.
    """
    mt = machine if isinstance(machine, MachineType) else parse_machine(machine)
    ram_size = _check_size("ram_size", ram_size)
    limit = _check_size("max_ram_below_4g", max_ram_below_4g or 0, allow_zero=True)
    if limit > FOUR_GIB:
        raise UsageError(f"max_ram_below_4g cannot exceed 4 GiB, got 0x{limit:x}")
    align = mt.gigabyte_align if gigabyte_align is None else bool(gigabyte_align)

    if mt.family == "q35":
        if ram_size >= 0xB0000000 and align:
            lowmem = 0x80000000
        else:
            lowmem = 0xB0000000
        lowmem = min(lowmem, limit or FOUR_GIB)
    else:
        lowmem = limit or 0xE0000000
        if ram_size >= lowmem and align:
            lowmem = min(lowmem, 0xC0000000)
    below = min(ram_size, lowmem)
    above = ram_size - below

    if above_4g_mem_start is not None:
        start = _check_size("above_4g_mem_start", above_4g_mem_start)
        if start < FOUR_GIB:
            raise UsageError("above_4g_mem_start must be at least 4 GiB")
    else:
        start = FOUR_GIB
        if amd_cpu and mt.amd_1tb_hole:
            hole64 = mt.pci_hole64_size if pci_hole64_size is None else \
                _check_size("pci_hole64_size", pci_hole64_size, allow_zero=True)
            if _max_used_gpa_end(mt, ram_size, FOUR_GIB + above, maxram_size,
                                 ram_slots, hole64) > AMD_HT_START:
                start = AMD_ABOVE_1TB_START
    return RamSplit(ram_size=ram_size, below_4g=below, above_4g=above,
                    above_4g_start=start)


def _device_memory_size(mt: MachineType, ram_size: int,
                        maxram_size: Optional[int], ram_slots: int) -> int:
    if not maxram_size or maxram_size <= ram_size:
        return 0
    # QEMU reserves an extra GiB per slot so each DIMM can be 1 GiB aligned.
    return maxram_size - ram_size + GiB * _check_size("ram_slots", ram_slots,
                                                      allow_zero=True)


def _max_used_gpa_end(mt: MachineType, ram_size: int, ram_end: int,
                      maxram_size: Optional[int], ram_slots: int,
                      hole64: int) -> int:
    """One past the highest address QEMU expects to use: the end of the
    64-bit PCI window placed after RAM (and after the DIMM area)."""
    dev_size = _device_memory_size(mt, ram_size, maxram_size, ram_slots)
    if dev_size:
        window = _round_up(_round_up(ram_end, GiB) + dev_size, GiB)
    else:
        window = _round_up(ram_end, GiB)
    return window + hole64


def device_memory_base(machine: Union[str, MachineType], ram_size: int,
                       **split_kw: Any) -> int:
    """Guest-physical base of the device-memory (DIMM) area.

    It is the end of the RAM mapped above 4 GiB rounded up to 1 GiB (4 GiB
    when no RAM is above 4 GiB).  Keywords are those of :func:`ram_split`.
    """
    mt = machine if isinstance(machine, MachineType) else parse_machine(machine)
    if not mt.has_device_memory:
        raise LayoutError(f"machine type {mt.name!r} has no DIMM area")
    split = ram_split(mt, ram_size, **split_kw)
    return _round_up(split.above_4g_end, GiB)


#: Short name asked for by callers that only think of DIMMs.
dimm_base = device_memory_base


DimmSpec = Union[Tuple[str, int], Tuple[str, int, int]]


def dimm_layout(machine: Union[str, MachineType], ram_size: int,
                dimms: Sequence[DimmSpec], *, align: int = DEFAULT_DIMM_ALIGN,
                **split_kw: Any) -> List[Range]:
    """Place DIMMs the way QEMU does when they have no explicit ``addr``.

    ``dimms`` lists ``(block_name, size)`` or ``(block_name, size, align)`` in
    plug (command-line) order.  Each goes to the lowest address of the device
    memory area that is aligned to its alignment and free.
    """
    base = device_memory_base(machine, ram_size, **split_kw)
    placed: List[Range] = []
    for spec in dimms:
        if len(spec) == 2:
            name, size = spec  # type: ignore[misc]
            dalign = align
        elif len(spec) == 3:
            name, size, dalign = spec  # type: ignore[misc]
        else:
            raise UsageError(f"a DIMM is (name, size) or (name, size, align), not {spec!r}")
        _check_size(f"size of DIMM {name!r}", size)
        _check_size(f"alignment of DIMM {name!r}", dalign)
        addr = _round_up(base, dalign)
        for other in sorted(placed, key=lambda r: r.gpa):
            if addr + size <= other.gpa:
                break                       # fits in the gap before `other`
            if addr < other.end:
                addr = _round_up(other.end, dalign)
        placed.append(Range(addr, size, name, 0))
    return placed


# --------------------------------------------------------------------------
# the layout

def _clip(gpa: int, end: int, limit_lo: int, limit_hi: int) -> Tuple[int, int]:
    return max(gpa, limit_lo), min(end, limit_hi)


def _merge(ranges: Iterable[Range]) -> List[Range]:
    out: List[Range] = []
    for r in sorted(ranges, key=lambda r: r.gpa):
        if r.length <= 0:
            continue
        if out:
            last = out[-1]
            if (last.block == r.block and last.end == r.gpa
                    and last.block_end == r.block_offset):
                out[-1] = Range(last.gpa, last.length + r.length, last.block,
                                last.block_offset)
                continue
        out.append(r)
    return out


def x86_layout(machine: str, ram_size: int, *,
               max_ram_below_4g: Optional[int] = None,
               legacy: str = "firmware",
               smm: bool = True,
               vga: bool = True,
               bios_size: Optional[int] = None,
               rom_size: Optional[int] = None,
               ram_block: str = "pc.ram",
               bios_block: str = "pc.bios",
               rom_block: str = "pc.rom",
               **split_kw: Any) -> List[Range]:
    """Guest-physical ranges of ``pc.ram`` (and of ``pc.bios``/``pc.rom``).

    ``machine`` is the machine type as written in the stream
    (``pc-q35-10.0``, ``pc-i440fx-2.4``, ``pc``...), ``ram_size`` the size of
    the main RAM block.  ``legacy`` picks the view of the first MiB
    (``"firmware"``, ``"reset"`` or ``"ram"``, see the module documentation);
    ``smm=False`` says a q35 guest has no SMM and ``vga=False`` that the guest
    has no VGA device; either way the VGA window then shows RAM (for pc only
    ``vga`` matters).
    ``bios_size``/``rom_size`` are the sizes of the ``pc.bios``/``pc.rom``
    blocks; ranges for them are only produced when they are given.  The main
    block is called ``ram_block`` (QEMU names it after the backend when
    ``-machine memory-backend=`` is used).  Remaining keywords go to
    :func:`ram_split`.  The result is sorted by address, adjacent pieces of the
    same block merged.
    """
    if legacy not in LEGACY_VIEWS:
        raise UsageError(f"legacy must be one of {LEGACY_VIEWS}, not {legacy!r}")
    mt = parse_machine(machine)
    split = ram_split(mt, ram_size, max_ram_below_4g=max_ram_below_4g, **split_kw)
    below = split.below_4g
    if bios_size is not None:
        _check_size("bios_size", bios_size)
        if bios_size > FOUR_GIB - 1 * MiB:
            raise UsageError(f"bios_size 0x{bios_size:x} does not fit below 4 GiB")
    if rom_size is not None:
        _check_size("rom_size", rom_size)

    pieces: List[Range] = []

    def ram(lo: int, hi: int) -> None:
        lo, hi = _clip(lo, hi, 0, below)
        if hi > lo:
            pieces.append(Range(lo, hi - lo, ram_block, lo))

    if legacy == "ram":
        ram(0, below)
    else:
        ram(0, VGA_START)
        if not vga or (mt.family == "q35" and not smm):
            ram(VGA_START, VGA_END)
        if legacy == "firmware":
            ram(ROM_AREA_START, ROM_AREA_END)
        else:
            if rom_size is not None:
                n = min(rom_size, PC_ROM_MAX_SIZE)
                pieces.append(Range(PC_ROM_BASE, n, rom_block, 0))
                ram(PC_ROM_BASE + n, PC_ROM_BASE + PC_ROM_MAX_SIZE)
            if bios_size is not None:
                n = min(bios_size, ISA_BIOS_MAX)
                pieces.append(Range(ROM_AREA_END - n, n, bios_block, bios_size - n))
                ram(PC_ROM_BASE + PC_ROM_MAX_SIZE, ROM_AREA_END - n)
        ram(ROM_AREA_END, below)

    if bios_size is not None:
        # The BIOS lives in the PCI address space, below RAM in priority: with
        # max-ram-below-4g raised near 4 GiB, low RAM covers part of it.
        lo = max(FOUR_GIB - bios_size, below)
        if lo < FOUR_GIB:
            pieces.append(Range(lo, FOUR_GIB - lo, bios_block,
                                lo - (FOUR_GIB - bios_size)))
    if split.above_4g:
        pieces.append(Range(split.above_4g_start, split.above_4g, ram_block, below))

    layout = _merge(pieces)
    _check_no_overlap(layout)
    return layout


def _check_no_overlap(ranges: Sequence[Range]) -> None:
    for a, b in zip(ranges, ranges[1:]):
        if b.gpa < a.end:
            raise LayoutError(f"ranges overlap: {a} and {b}")


def _describe_gap(start: int, end: int) -> str:
    if start >= VGA_START and end <= VGA_END:
        return "legacy VGA window (MMIO, not RAM)"
    if start >= VGA_START and end <= ROM_AREA_END:
        return "legacy VGA window / option-ROM area"
    if start >= ROM_AREA_START and end <= ROM_AREA_END:
        return "option-ROM / BIOS area (routed by PAM, not RAM here)"
    if end <= FOUR_GIB:
        return ("32-bit PCI hole (device MMIO, q35 MMCONFIG, IOAPIC, HPET, "
                "LAPIC, firmware)")
    if start >= FOUR_GIB and end <= AMD_ABOVE_1TB_START:
        return "unused space between 4 GiB and RAM moved above the AMD HT range"
    return "not RAM"


def x86_holes(machine_or_layout: Union[str, Sequence[Range]],
              ram_size: Optional[int] = None, **layout_kw: Any) -> List[Hole]:
    """Gaps of a layout (between address 0 and its last range), described.

    Either pass a layout, or the arguments of :func:`x86_layout`.
    """
    if isinstance(machine_or_layout, str):
        if ram_size is None:
            raise UsageError("x86_holes(machine, ram_size, ...) needs ram_size")
        layout = x86_layout(machine_or_layout, ram_size, **layout_kw)
    else:
        layout = sorted(machine_or_layout, key=lambda r: r.gpa)
    holes: List[Hole] = []
    pos = 0
    for r in layout:
        if r.gpa > pos:
            # split the description at the well-known boundaries
            cuts = sorted({pos, r.gpa} | {c for c in (VGA_START, VGA_END, ROM_AREA_END, FOUR_GIB)
                                         if pos < c < r.gpa})
            for lo, hi in zip(cuts, cuts[1:]):
                holes.append(Hole(lo, hi, _describe_gap(lo, hi)))
        pos = max(pos, r.end)
    return holes


# --------------------------------------------------------------------------
# reading guest-physical memory

class PhysicalMemory:
    """Guest-physical reads over RAMBlocks.

    ``layout`` is a list of :class:`Range`; ``blocks`` maps block names to
    objects with ``.read(offset, length) -> bytes`` and ``.size``.  ``extra``
    adds ``(gpa, block_name)`` pairs, each mapping a whole block (e.g. a DIMM
    with an explicit address).  Ranges may not overlap and must lie inside
    their blocks.
    """

    def __init__(self, layout: Iterable[Range], blocks: Mapping[str, Any], *,
                 extra: Iterable[Tuple[int, str]] = ()):
        self._blocks = dict(blocks)
        ranges = list(layout)
        for gpa, name in extra:
            block = self._block(name)
            ranges.append(Range(gpa, int(block.size), name, 0))
        for r in ranges:
            if not isinstance(r, Range):
                raise LayoutError(f"layout entries must be Range, not {type(r).__name__}")
            if r.gpa < 0 or r.length <= 0 or r.block_offset < 0:
                raise LayoutError(f"invalid range {r}")
            size = int(self._block(r.block).size)
            if r.block_end > size:
                raise LayoutError(
                    f"range {r} ends at block offset 0x{r.block_end:x}, beyond "
                    f"the 0x{size:x} bytes of block {r.block!r}")
        ranges.sort(key=lambda r: r.gpa)
        _check_no_overlap(ranges)
        self._ranges: Tuple[Range, ...] = tuple(ranges)
        self._starts = [r.gpa for r in ranges]

    @classmethod
    def for_x86(cls, machine: str, blocks: Mapping[str, Any], *,
                ram_block: str = "pc.ram",
                dimms: Sequence[Union[str, Tuple[str, int]]] = (),
                dimm_align: int = DEFAULT_DIMM_ALIGN,
                extra: Iterable[Tuple[int, str]] = (),
                **layout_kw: Any) -> "PhysicalMemory":
        """Build the x86 layout from the blocks themselves: RAM size from
        ``blocks[ram_block]``, ``pc.bios``/``pc.rom`` sizes when present,
        DIMMs named in ``dimms`` (block names, or ``(name, align)``) placed by
        :func:`dimm_layout`.  Other keywords go to :func:`x86_layout`."""
        ram = cls._lookup(blocks, ram_block)
        kw = dict(layout_kw)
        if "bios_size" not in kw and "pc.bios" in blocks:
            kw["bios_size"] = int(blocks["pc.bios"].size)
        if "rom_size" not in kw and "pc.rom" in blocks:
            kw["rom_size"] = int(blocks["pc.rom"].size)
        layout = x86_layout(machine, int(ram.size), ram_block=ram_block, **kw)
        if dimms:
            specs: List[DimmSpec] = []
            for d in dimms:
                name, dal = (d, dimm_align) if isinstance(d, str) else d
                specs.append((name, int(cls._lookup(blocks, name).size), dal))
            split_kw = {k: v for k, v in kw.items()
                        if k in ("max_ram_below_4g", "gigabyte_align", "amd_cpu",
                                 "maxram_size", "ram_slots", "pci_hole64_size",
                                 "above_4g_mem_start")}
            layout += dimm_layout(machine, int(ram.size), specs, **split_kw)
        return cls(layout, blocks, extra=extra)

    @staticmethod
    def _lookup(blocks: Mapping[str, Any], name: str) -> Any:
        try:
            return blocks[name]
        except KeyError:
            raise LayoutError(f"no RAMBlock named {name!r} (have: "
                              f"{', '.join(sorted(blocks)) or 'none'})") from None

    def _block(self, name: str) -> Any:
        return self._lookup(self._blocks, name)

    @property
    def ranges(self) -> Tuple[Range, ...]:
        """The mapped ranges, sorted by guest-physical address."""
        return self._ranges

    @property
    def blocks(self) -> Mapping[str, Any]:
        return dict(self._blocks)

    @property
    def end(self) -> int:
        """One past the highest mapped guest-physical address (0 if empty)."""
        return self._ranges[-1].end if self._ranges else 0

    @property
    def mapped_bytes(self) -> int:
        return sum(r.length for r in self._ranges)

    def find(self, gpa: int) -> Optional[Range]:
        """The range containing ``gpa``, or ``None``."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and self._ranges[i].contains(gpa):
            return self._ranges[i]
        return None

    def translate(self, gpa: int) -> Tuple[str, int]:
        """``(block_name, block_offset)`` of guest-physical address ``gpa``."""
        r = self.find(gpa)
        if r is None:
            raise UnmappedAddress(gpa)
        return r.block, r.block_address(gpa)

    def _pieces(self, gpa: int, length: int):
        """Yield ``(start, end, range_or_None)`` covering ``[gpa, gpa+length)``."""
        pos, end = gpa, gpa + length
        ranges, count = self._ranges, len(self._ranges)
        i = bisect.bisect_right(self._starts, pos) - 1
        if i < 0 or not ranges[i].contains(pos):
            i += 1          # ranges[i] is now the first range starting after pos
        while pos < end:
            if i < count and ranges[i].gpa <= pos:
                r = ranges[i]
                stop = min(end, r.end)
                yield pos, stop, r
                i += 1
            else:
                stop = min(end, ranges[i].gpa) if i < count else end
                yield pos, stop, None
            pos = stop

    def reader(self, r: Range) -> Callable[[int, int], Any]:
        """``read(offset, n)`` within range ``r`` straight from its block
        (bytes-like result, no copy made here); used by the dump writers."""
        if r not in self._ranges:
            raise UsageError(f"{r} is not a range of this PhysicalMemory")
        block = self._block(r.block)

        def read(offset: int, n: int) -> Any:
            if offset < 0 or n < 0 or offset + n > r.length:
                raise UsageError(f"read of {n} bytes at 0x{offset:x} is outside {r}")
            return block.read(r.block_offset + offset, n)
        return read

    def is_mapped(self, gpa: int, length: int = 1) -> bool:
        """Whether every byte of ``[gpa, gpa+length)`` is mapped."""
        if length <= 0:
            return True
        return all(r is not None for _, _, r in self._pieces(gpa, length))

    def read(self, gpa: int, length: int, *, unmapped: str = "raise") -> bytes:
        """Read ``length`` bytes of guest-physical memory from ``gpa``.

        Reads may span several ranges.  Bytes no range maps raise
        :class:`UnmappedAddress` (``unmapped='raise'``, checked before anything
        is read) or read as zeros (``unmapped='zero'``, like ``pmemsave``).
        """
        if unmapped not in ("raise", "zero"):
            raise UsageError(f"unmapped must be 'raise' or 'zero', not {unmapped!r}")
        _check_size("gpa", gpa, allow_zero=True)
        _check_size("length", length, allow_zero=True)
        if length == 0:
            return b""
        pieces = list(self._pieces(gpa, length))
        if unmapped == "raise":
            for start, stop, r in pieces:
                if r is None:
                    raise UnmappedAddress(start, stop - start)
        out = []
        for start, stop, r in pieces:
            n = stop - start
            if r is None:
                out.append(bytes(n))
                continue
            data = self._block(r.block).read(r.block_address(start), n)
            got = memoryview(data).nbytes
            if got != n:
                raise LayoutError(
                    f"block {r.block!r} returned {got} bytes for a read of "
                    f"{n} at offset 0x{r.block_address(start):x}")
            out.append(data)
        if len(out) == 1:
            return out[0] if isinstance(out[0], bytes) else bytes(out[0])
        return b"".join(out)

    def __repr__(self) -> str:
        return (f"PhysicalMemory({len(self._ranges)} ranges, "
                f"{self.mapped_bytes} bytes mapped)")


# Blocks every x86 machine has that are not guest RAM DIMMs.
_NON_DIMM_PREFIXES = ("pc.ram", "pc.bios", "pc.rom", "/rom@", "vga.", "ram-", "0000:")


def for_stream(stream: Any, *, dimms: Sequence[Union[str, Tuple[str, int]]] = (),
               **layout_kw: Any) -> "PhysicalMemory":
    """Guest-physical view of a decoded x86 ``qemuram.Stream``.

    ``pc.ram`` (split around the PCI hole by the machine type's rules),
    ``pc.bios`` and ``pc.rom`` are placed by :func:`x86_layout`.  DIMMs are
    placed too when their place is known: from the x-ignore-shared block
    addresses in the stream (offsets in the device-memory area), or when the
    caller names them in ``dimms`` (plug order).
    """
    if not stream.machine:
        raise LayoutError("the stream does not name its machine type")
    blocks = stream.ram
    extra: List[Tuple[int, str]] = []
    if not dimms and "x-ignore-shared" in (stream.capabilities or []):
        main = blocks.get(layout_kw.get("ram_block", "pc.ram"))
        if main is not None:
            split_kw = {k: v for k, v in layout_kw.items()
                        if k in ("max_ram_below_4g", "gigabyte_align", "amd_cpu",
                                 "maxram_size", "ram_slots", "pci_hole64_size",
                                 "above_4g_mem_start")}
            base = device_memory_base(stream.machine, int(main.size), **split_kw)
            for name, blk in blocks.items():
                if name.startswith(_NON_DIMM_PREFIXES) or getattr(blk, "addr", None) is None:
                    continue
                extra.append((base + int(blk.addr), name))
    return PhysicalMemory.for_x86(stream.machine, blocks, dimms=dimms, extra=extra, **layout_kw)
