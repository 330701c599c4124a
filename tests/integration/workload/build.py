"""A tiny x86 guest workload, written as machine code by this script.

README
======

``build()`` returns a 64 KiB firmware image for ``qemu-system-x86_64 -bios``.
No assembler or compiler is involved: the few instruction forms used are
encoded by the small helpers below, so the tests need nothing but Python.
``python -m tests.integration.workload.build out.bin`` writes the image and
prints a listing.

Boot path
---------
QEMU maps the image at the top of the 4 GiB space (and its last 128 KiB also
below 1 MiB). The CPU resets in real mode with CS base 0xFFFF0000, IP 0xFFF0,
so image offset ``x`` is CS:``x``.

  image 0xFFF0  reset vector: ``jmp near`` to the 16-bit entry (0xF000)
  image 0xF000  16-bit entry: cli; cld; lgdt (32-bit base); CR0.PE = 1;
                far jump to the 32-bit entry with the flat code selector
  image 0xF100  32-bit entry: flat data selector in DS/ES/SS/FS/GS, stack
                below 0x80000, caches on (reset leaves CR0.CD/NW set and all
                MTRRs off: every access uncached), then it copies the main
                loop to ``LOOP_ADDR`` (0x8000) in RAM and jumps there
  image 0xF200  the main loop (position independent: rel32 jumps only)
  image 0xF800  GDT: null, flat 4 GiB code (0x08), flat 4 GiB data (0x10),
                all with the accessed bit preset (the CPU would otherwise
                try to write it into the ROM), then the 6-byte GDTR operand
  image 0xE000  edge-page table: (guest address, length) dword pairs
  elsewhere     0xF4 (hlt)

Paging stays off and interrupts stay off; no device is touched. Guest RAM
holds zeros except the loop's copy at 0x8000, its stack page (0x7F000), the
status dword and the region below.

Main loop (``ebx`` is the pass counter ``c``, starting at 1)
------------------------------------------------------------
Each pass writes ``c`` to ``STATUS_ADDR`` (0x90000) and then changes the
region ``REGION_BASE`` (1 MiB) .. ``REGION_END`` (1541 pages of 4 KiB) in
five zones chosen to exercise XBZRLE (page numbers relative to the region):

  sparse   pages    0..639  (0x100000..), every page, every pass:
           dword at +0                              = c * 0x9E3779B1 + p
           dword at +4 * ((37 * c + 7 * p) & 0x3FF) = same value
           byte  at +0x800 + ((13 * c + p) & 0x7FF)  = low byte of c
           -> a few scattered changed bytes per page: small XBZRLE deltas
           with zero runs of every length (one- and two-byte ULEB128), some
           starting at byte 0, some ending at the last byte of the page.
           After each sparse page the loop fills one hot page (below) and
           then spins on rdtsc until ``pace`` TSC ticks have passed since the
           page was started, so memory is dirtied steadily, never in bursts.
  strided  pages  640..767  (0x380000..), a window of 8 pages per pass
           (window (c & 15), so each page is visited every 16 passes):
           byte at +16 * j + (c & 15) = (c + j) & 0xFF for j in 0..255
           -> 256 one-byte runs: medium-sized deltas (~770 bytes).
  dense    pages  768..1023 (0x400000..), a window of 16 pages per pass
           (window (c & 15)): xor k = (c * 0x01000193) | 0x80808080 into
           every dword of the page for odd c (whole page changes: XBZRLE
           overflows, plain page), into the first 600 dwords for even c
           (one 2400-byte changed run crossing many word boundaries).
  hot      pages 1024..1535 (0x500000..), ``rep stosd`` fill of hot page
           (f mod 512) with the byte (f / 512) mod 256, f counting fills
           (ebp): every byte of a hot page changes at every fill, one fill
           per sparse page. This is the load that keeps a slow precopy from
           converging: far more whole-page changes than a few MiB/s carry.
  edge     pages 1536..1540 (0x700000..), see ``EDGE``: runs of bytes set
           to the low byte of c, laid out so that a delta is 4094, 4095 or
           4096 bytes long, right at XBZRLE's overflow limit.

A pass takes about 640 * ``pace`` TSC ticks (~10 ms at 2 GHz) under TCG or
hardware KVM; where KVM has to emulate every instruction (no VMX for the
guest) it is much slower, which only means fewer changes per page.

``expected_sparse_dword0(c, p)`` gives the value the sparse zone's first dword
must hold after pass ``c`` wrote page ``p``, for checks of a paused guest.
"""
from __future__ import annotations

import struct
import sys
from typing import Dict, List, Tuple

IMAGE_SIZE = 64 << 10
PAGE = 4096

STATUS_ADDR = 0x90000
REGION_BASE = 0x100000
REGION_PAGES = 1541
REGION_END = REGION_BASE + REGION_PAGES * PAGE
SPARSE_PAGES = (0, 640)
STRIDED_PAGES = (640, 768)
DENSE_PAGES = (768, 1024)
HOT_PAGES = (1024, 1536)
HOT_COUNT = HOT_PAGES[1] - HOT_PAGES[0]     # a power of two
EDGE_PAGES = (1536, 1541)
SPARSE_MUL = 0x9E3779B1
DENSE_MUL = 0x01000193
DENSE_PARTIAL = 600            # dwords xored in even passes (2400 bytes)
DEFAULT_PACE = 30_000          # TSC ticks after each sparse page (~15 us at 2 GHz)
LOOP_ADDR = 0x8000

EDGE_TABLE = 0xE000            # image offset of the edge-page run table
ENTRY16 = 0xF000
CODE32 = 0xF100
LOOP_IMG = 0xF200
GDT = 0xF800
RESET = 0xFFF0
ROM_BASE = 0x1_0000_0000 - IMAGE_SIZE     # where the image's first byte is

EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI = range(8)
_NAMES = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")


def expected_sparse_dword0(c: int, p: int) -> int:
    return (c * SPARSE_MUL + p) & 0xFFFFFFFF


def _edge_runs(m: int, cover: int) -> List[Tuple[int, int]]:
    """``m`` runs separated by single unchanged bytes, from byte 0 to ``cover``."""
    total = cover - (m - 1)
    base, extra = divmod(total, m)
    runs, pos = [], 0
    for k in range(m):
        n = base + (1 if k < extra else 0)
        runs.append((pos, n))
        pos += n + 1
    assert pos - 1 == cover and max(n for _, n in runs) < 0x80
    return runs


#: Edge pages: name -> (page index in the region, runs (offset, length), note).
#: Every pass sets each run's bytes to the low byte of ``c``; the other bytes
#: stay zero.  A delta between two passes is then ``m`` pairs of one-byte
#: lengths, ``m + cover + 1`` bytes long, and the bytes from ``cover`` to the
#: end of the page never change.
EDGE = {
    # ends exactly at a 64-byte boundary with the last 64 bytes unchanged:
    "len4095_tail64": (EDGE_PAGES[0] + 0, _edge_runs(62, 4032), 4095),
    "len4096_tail64": (EDGE_PAGES[0] + 1, _edge_runs(63, 4032), 4096),
    # the largest delta that fits before an unchanged tail (page size - 2)
    "len4094_tail64": (EDGE_PAGES[0] + 2, _edge_runs(61, 4032), 4094),
    # 4095 bytes, unchanged tail of 128 bytes (two 64-byte chunks)
    "len4095_tail128": (EDGE_PAGES[0] + 3, _edge_runs(126, 3968), 4095),
    # 4095 bytes, unchanged tail starting inside a 64-byte chunk
    "len4095_tail92": (EDGE_PAGES[0] + 4, _edge_runs(90, 4004), 4095),
}


def edge_table() -> bytes:
    """(guest address, length) dword pairs of every edge run, 0-terminated."""
    out = bytearray()
    for page, runs, _ in EDGE.values():
        for off, n in runs:
            out += struct.pack("<II", REGION_BASE + page * PAGE + off, n)
    return bytes(out + b"\0" * 8)


class Asm:
    """Just enough of a 32-bit x86 assembler for the loop: labels, rel32 jumps,
    register/immediate ALU forms and [base + index*scale + disp32] stores."""

    def __init__(self, origin: int):
        self.origin = origin          # linear address of code[0]
        self.code = bytearray()
        self.labels: Dict[str, int] = {}
        self.fixups: List[Tuple[int, str]] = []   # (position of rel32, label)
        self.listing: List[Tuple[int, int, str]] = []   # (position, length, text)

    def _emit(self, data: bytes, text: str) -> None:
        self.listing.append((len(self.code), len(data), text))
        self.code += data

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)
        self.listing.append((len(self.code), 0, name + ":"))

    @staticmethod
    def _modrm_reg(reg: int, rm: int) -> int:
        return 0xC0 | (reg << 3) | rm

    @staticmethod
    def _mem(reg: int, base: int, index: int = None, scale: int = 1, disp: int = 0) -> bytes:
        # Always mod=10 (disp32) with a SIB byte: one form for every base.
        ss = {1: 0, 2: 1, 4: 2, 8: 3}[scale]
        idx = 4 if index is None else index     # 100 = no index
        assert idx != ESP or index is None
        return (bytes([0x80 | (reg << 3) | 4, (ss << 6) | (idx << 3) | base])
                + struct.pack("<i", disp))

    @staticmethod
    def _memtext(base, index, scale, disp) -> str:
        t = _NAMES[base]
        if index is not None:
            t += f"+{_NAMES[index]}*{scale}"
        if disp:
            t += f"{disp:+#x}"
        return f"[{t}]"

    def raw(self, data: bytes, text: str) -> None:
        self._emit(data, text)

    # data movement
    def mov_imm(self, r: int, imm: int) -> None:
        self._emit(bytes([0xB8 + r]) + struct.pack("<I", imm & 0xFFFFFFFF),
                   f"mov {_NAMES[r]}, {imm & 0xFFFFFFFF:#x}")

    def mov(self, dst: int, src: int) -> None:
        self._emit(bytes([0x89, self._modrm_reg(src, dst)]), f"mov {_NAMES[dst]}, {_NAMES[src]}")

    def store32(self, src: int, base: int, index: int = None, scale: int = 1, disp: int = 0):
        self._emit(bytes([0x89]) + self._mem(src, base, index, scale, disp),
                   f"mov dword {self._memtext(base, index, scale, disp)}, {_NAMES[src]}")

    def store8(self, src: int, base: int, index: int = None, scale: int = 1, disp: int = 0):
        assert src < 4, "only al/cl/dl/bl"
        self._emit(bytes([0x88]) + self._mem(src, base, index, scale, disp),
                   f"mov byte {self._memtext(base, index, scale, disp)}, {'acdb'[src]}l")

    def load32(self, dst: int, base: int, disp: int = 0) -> None:
        self._emit(bytes([0x8B]) + self._mem(dst, base, None, 1, disp),
                   f"mov {_NAMES[dst]}, dword {self._memtext(base, None, 1, disp)}")

    def store32_abs(self, src: int, addr: int) -> None:
        self._emit(bytes([0x89, (src << 3) | 5]) + struct.pack("<I", addr),
                   f"mov dword [{addr:#x}], {_NAMES[src]}")

    def mov_sreg(self, sreg: int, src: int) -> None:
        self._emit(bytes([0x8E, self._modrm_reg(sreg, src)]),
                   f"mov {'ecsdfg'[sreg]}{'s'}, {_NAMES[src][1:]}")

    # arithmetic
    _ALU = {"add": 0, "or": 1, "and": 4, "sub": 5, "xor": 6, "cmp": 7}

    def alu(self, op: str, dst: int, src: int) -> None:
        opcode = self._ALU[op] * 8 + 1                   # op r/m32, r32
        self._emit(bytes([opcode, self._modrm_reg(src, dst)]),
                   f"{op} {_NAMES[dst]}, {_NAMES[src]}")

    def alu_imm(self, op: str, dst: int, imm: int) -> None:
        self._emit(bytes([0x81, self._modrm_reg(self._ALU[op], dst)])
                   + struct.pack("<I", imm & 0xFFFFFFFF),
                   f"{op} {_NAMES[dst]}, {imm & 0xFFFFFFFF:#x}")

    def alu_mem(self, op: str, base: int, src: int) -> None:
        opcode = self._ALU[op] * 8 + 1                   # op r/m32, r32 (memory form)
        self._emit(bytes([opcode]) + self._mem(src, base),
                   f"{op} dword {self._memtext(base, None, 1, 0)}, {_NAMES[src]}")

    def imul_imm(self, dst: int, src: int, imm: int) -> None:
        self._emit(bytes([0x69, self._modrm_reg(dst, src)]) + struct.pack("<I", imm & 0xFFFFFFFF),
                   f"imul {_NAMES[dst]}, {_NAMES[src]}, {imm & 0xFFFFFFFF:#x}")

    def shr(self, r: int, n: int) -> None:
        self._emit(bytes([0xC1, self._modrm_reg(5, r), n]), f"shr {_NAMES[r]}, {n}")

    def inc(self, r: int) -> None:
        self._emit(bytes([0x40 + r]), f"inc {_NAMES[r]}")

    def dec(self, r: int) -> None:
        self._emit(bytes([0x48 + r]), f"dec {_NAMES[r]}")

    def shl(self, r: int, n: int) -> None:
        self._emit(bytes([0xC1, self._modrm_reg(4, r), n]), f"shl {_NAMES[r]}, {n}")

    # control flow (rel32 always)
    _JCC = {"jb": 0x82, "jz": 0x84, "jnz": 0x85}

    def _rel32(self, opcode: bytes, target: str, text: str) -> None:
        self.fixups.append((len(self.code) + len(opcode), target))
        self._emit(opcode + b"\0\0\0\0", text)

    def jmp(self, target: str) -> None:
        self._rel32(b"\xE9", target, f"jmp {target}")

    def jcc(self, cc: str, target: str) -> None:
        self._rel32(bytes([0x0F, self._JCC[cc]]), target, f"{cc} {target}")

    def resolve(self) -> bytes:
        for pos, name in self.fixups:
            rel = self.labels[name] - (pos + 4)
            self.code[pos:pos + 4] = struct.pack("<i", rel)
        return bytes(self.code)


def _boot32(loop_len: int) -> Asm:
    a = Asm(ROM_BASE + CODE32)
    # flat data segments, a stack we never really use
    a.mov_imm(EAX, 0x10)
    for sreg in (3, 0, 2, 4, 5):          # ds, es, ss, fs, gs
        a.mov_sreg(sreg, EAX)
    a.mov_imm(ESP, 0x80000)
    # Caches on: the CPU resets with CR0.CD/NW set and every MTRR off, which
    # under KVM makes every access uncached (hundreds of times slower).
    a.mov_imm(ECX, 0x2FF)                 # IA32_MTRR_DEF_TYPE
    a.mov_imm(EAX, 0x806)                 # MTRRs enabled, default type write-back
    a.alu("xor", EDX, EDX)
    a.raw(b"\x0F\x30", "wrmsr")
    a.raw(b"\x0F\x20\xC0", "mov eax, cr0")
    a.alu_imm("and", EAX, 0x9FFFFFFF)     # clear CD (bit 30) and NW (bit 29)
    a.raw(b"\x0F\x22\xC0", "mov cr0, eax")
    # Run the loop from RAM: copy it to LOOP_ADDR and jump there.
    a.mov_imm(ESI, ROM_BASE + LOOP_IMG)
    a.mov_imm(EDI, LOOP_ADDR)
    a.mov_imm(ECX, (loop_len + 3) // 4)
    a.raw(b"\xF3\xA5", "rep movsd")
    a.mov_imm(EAX, LOOP_ADDR)
    a.raw(b"\xFF\xE0", "jmp eax")
    return a


def _main_loop(pace: int) -> Asm:
    a = Asm(LOOP_ADDR)
    a.alu("xor", EBX, EBX)                # c = 0
    a.alu("xor", EBP, EBP)                # f = 0 (hot-zone fill counter)

    a.label("pass")
    a.inc(EBX)
    a.store32_abs(EBX, STATUS_ADDR)

    # sparse zone: esi = page address, edi = page index p
    a.mov_imm(ESI, REGION_BASE + SPARSE_PAGES[0] * PAGE)
    a.mov_imm(EDI, SPARSE_PAGES[0])
    a.label("sparse")
    a.raw(b"\x0F\x31", "rdtsc")
    a.raw(b"\x50", "push eax")           # when this page's time slot started
    a.imul_imm(EAX, EBX, SPARSE_MUL)      # eax = c * K + p
    a.alu("add", EAX, EDI)
    a.store32(EAX, ESI)                   # dword at +0
    a.imul_imm(EDX, EBX, 37)              # edx = (37c + 7p) & 0x3ff
    a.imul_imm(ECX, EDI, 7)
    a.alu("add", EDX, ECX)
    a.alu_imm("and", EDX, 0x3FF)
    a.store32(EAX, ESI, EDX, 4)           # dword at +4 * edx
    a.imul_imm(EDX, EBX, 13)              # edx = (13c + p) & 0x7ff
    a.alu("add", EDX, EDI)
    a.alu_imm("and", EDX, 0x7FF)
    a.store8(EBX, ESI, EDX, 1, 0x800)     # byte at +0x800 + edx = low byte of c

    # hot zone: fill hot page (f mod HOT_COUNT) with byte (f / HOT_COUNT) mod 256
    a.raw(b"\x57", "push edi")
    a.mov(EDI, EBP)
    a.alu_imm("and", EDI, HOT_COUNT - 1)
    a.shl(EDI, 12)
    a.alu_imm("add", EDI, REGION_BASE + HOT_PAGES[0] * PAGE)
    a.mov(EAX, EBP)
    a.shr(EAX, HOT_COUNT.bit_length() - 1)
    a.alu_imm("and", EAX, 0xFF)
    a.imul_imm(EAX, EAX, 0x01010101)
    a.mov_imm(ECX, PAGE // 4)
    a.raw(b"\xF3\xAB", "rep stosd")
    a.inc(EBP)
    a.raw(b"\x5F", "pop edi")

    # pace: spin until `pace` TSC ticks after this page's slot started
    a.raw(b"\x59", "pop ecx")
    a.label("pace")
    a.raw(b"\x0F\x31", "rdtsc")
    a.alu("sub", EAX, ECX)
    a.alu_imm("cmp", EAX, pace)
    a.jcc("jb", "pace")

    a.alu_imm("add", ESI, PAGE)
    a.inc(EDI)
    a.alu_imm("cmp", EDI, SPARSE_PAGES[1])
    a.jcc("jb", "sparse")

    # strided zone: window (c & 15) of 8 pages; byte (c & 15) + 16 j = c + j
    a.mov(EDX, EBX)
    a.alu_imm("and", EDX, 15)             # edx = c & 15 (byte offset in each 16)
    a.mov(ESI, EDX)
    a.shl(ESI, 15)                        # 8 pages * 4096 = 1 << 15
    a.alu_imm("add", ESI, REGION_BASE + STRIDED_PAGES[0] * PAGE)
    a.alu("add", ESI, EDX)                # esi = first byte to write
    a.mov_imm(EDI, 8 * 256)               # 8 pages of 256 bytes each
    a.mov(EAX, EBX)                       # al = c + j (j restarts per page)
    a.mov_imm(ECX, 0)
    a.label("strided")
    a.store8(EAX, ESI)
    a.alu_imm("add", ESI, 16)
    a.inc(EAX)
    a.inc(ECX)
    a.alu_imm("cmp", ECX, 256)
    a.jcc("jb", "strided_same_page")
    a.mov(EAX, EBX)                       # next page: j = 0 again
    a.mov_imm(ECX, 0)
    a.label("strided_same_page")
    a.dec(EDI)
    a.jcc("jnz", "strided")

    # dense zone: window (c & 15) of 16 pages; xor k into the first n dwords
    # of each page, k = (c * DENSE_MUL) | 0x80808080 (no zero byte, so every
    # byte xored changes), n = 1024 (whole page) for odd c, DENSE_PARTIAL else
    a.mov(ESI, EBX)
    a.alu_imm("and", ESI, 15)
    a.shl(ESI, 16)                        # 16 pages * 4096 = 1 << 16
    a.alu_imm("add", ESI, REGION_BASE + DENSE_PAGES[0] * PAGE)
    a.imul_imm(EAX, EBX, DENSE_MUL)
    a.alu_imm("or", EAX, 0x80808080)
    a.mov_imm(EDI, 16)
    a.label("dense_page")
    a.mov(ECX, EBX)                       # ecx = PARTIAL + (c & 1) * (1024 - PARTIAL)
    a.alu_imm("and", ECX, 1)
    a.imul_imm(ECX, ECX, PAGE // 4 - DENSE_PARTIAL)
    a.alu_imm("add", ECX, DENSE_PARTIAL)
    a.mov(EDX, ESI)
    a.label("dense_dword")
    a.alu_mem("xor", EDX, EAX)            # xor [edx], eax
    a.alu_imm("add", EDX, 4)
    a.dec(ECX)
    a.jcc("jnz", "dense_dword")
    a.alu_imm("add", ESI, PAGE)
    a.dec(EDI)
    a.jcc("jnz", "dense_page")

    # edge pages: for each (address, length) of the table: set the bytes to c
    a.mov_imm(ESI, ROM_BASE + EDGE_TABLE)
    a.label("edge")
    a.load32(EDI, ESI)
    a.alu_imm("cmp", EDI, 0)
    a.jcc("jz", "edge_done")
    a.load32(ECX, ESI, 4)
    a.mov(EAX, EBX)
    a.raw(b"\xF3\xAA", "rep stosb")
    a.alu_imm("add", ESI, 8)
    a.jmp("edge")
    a.label("edge_done")
    a.jmp("pass")
    return a


def _real_mode_entry() -> bytes:
    code = bytearray()
    code += b"\xFA"                                           # cli
    code += b"\xFC"                                           # cld
    code += b"\x66\x2E\x0F\x01\x16" + struct.pack("<H", GDT + 24)   # o32 lgdt cs:[gdtr]
    code += b"\x0F\x20\xC0"                                   # mov eax, cr0
    code += b"\x0C\x01"                                       # or al, 1 (PE)
    code += b"\x0F\x22\xC0"                                   # mov cr0, eax
    code += b"\x66\xEA" + struct.pack("<IH", ROM_BASE + CODE32, 0x08)  # jmp dword 0x08:code32
    return bytes(code)


def _gdt() -> bytes:
    null = b"\0" * 8
    code = struct.pack("<Q", 0x00CF9B000000FFFF)   # base 0, 4 GiB, 32-bit, exec/read, accessed
    data = struct.pack("<Q", 0x00CF93000000FFFF)   # base 0, 4 GiB, 32-bit, read/write, accessed
    gdtr = struct.pack("<HI", 3 * 8 - 1, ROM_BASE + GDT)
    return null + code + data + gdtr


def build(pace: int = DEFAULT_PACE) -> bytes:
    """The 64 KiB -bios image (see the module docstring)."""
    img = bytearray(b"\xF4" * IMAGE_SIZE)          # hlt everywhere else
    entry = _real_mode_entry()
    img[ENTRY16:ENTRY16 + len(entry)] = entry
    loop = _main_loop(pace).resolve()
    boot = _boot32(len(loop)).resolve()
    assert CODE32 + len(boot) <= LOOP_IMG, "32-bit entry overlaps the loop"
    assert LOOP_IMG + len(loop) <= GDT, "loop overlaps the GDT"
    img[CODE32:CODE32 + len(boot)] = boot
    img[LOOP_IMG:LOOP_IMG + len(loop)] = loop
    gdt = _gdt()
    img[GDT:GDT + len(gdt)] = gdt
    table = edge_table()
    assert EDGE_TABLE + len(table) <= ENTRY16, "edge table overlaps the entry code"
    img[EDGE_TABLE:EDGE_TABLE + len(table)] = table
    # reset vector: jmp near ENTRY16 (rel16 from the next instruction)
    rel = ENTRY16 - (RESET + 3)
    img[RESET:RESET + 3] = b"\xE9" + struct.pack("<h", rel)
    return bytes(img)


def write(path: str, pace: int = DEFAULT_PACE) -> str:
    with open(path, "wb") as f:
        f.write(build(pace))
    return path


def listing(pace: int = DEFAULT_PACE) -> str:
    loop = _main_loop(pace)
    lines = [f"{ROM_BASE + ENTRY16:08x}  {_real_mode_entry().hex()}  (16-bit entry)"]
    for a in (_boot32(len(loop.resolve())), loop):
        code = a.resolve()
        for pos, n, text in a.listing:
            lines.append(f"{a.origin + pos:08x}  {code[pos:pos + n].hex():<28} {text}")
    return "\n".join(lines)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "workload.bin"
    write(out)
    print(listing())
    print(f"wrote {out} ({IMAGE_SIZE} bytes)")
