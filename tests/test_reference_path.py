"""A deliberately simple reference decoder, written from FORMAT.md (and QEMU's
ram.c / xbzrle.c for the details), against the library's fast numpy path.

The reference walks the stream one record at a time with ``struct``, keeps each
RAMBlock as a ``bytearray`` (last write wins) and stops at the first device
(FULL) section: everything RAM lives before it.  It parses the MEM_SIZE block
list itself (postcopy page-size fields, x-ignore-shared addresses, mapped-ram
headers) and shares no code with qemuram.
"""
from __future__ import annotations

import hashlib
import io
import struct
import zlib

from hypothesis import HealthCheck, given, settings, strategies as st

import qemuram.stream
from qemuram import xbzrle
from qemuram.errors import XBZRLEError

from qemuram.records import RamEos, SectionHeader
from qemuram.wire import SectionType

from conftest import (FIXTURES, MAPPED, SEQUENTIAL, decode_all, decode_records, load_stream,
                      over_fixtures)

ZERO, MEM_SIZE, PAGE, EOS, CONTINUE, XBZRLE, HOOK, COMPRESS, FLUSH = (
    0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100, 0x200)


class RefError(Exception):
    pass


def ref_xbzrle_apply(src: bytes, page: bytearray) -> None:
    """QEMU's xbzrle_decode_buffer (uleb128_decode_small: at most 2 bytes)."""
    def uleb(i):
        if not src[i] & 0x80:
            return src[i], 1
        if src[i + 1] & 0x80:
            raise RefError("uleb128 longer than 2 bytes")
        return (src[i] & 0x7F) | (src[i + 1] << 7), 2

    out = bytearray(page)
    slen, dlen = len(src), len(page)
    i = d = 0
    while i < slen:
        if slen - i < 2:
            raise RefError("short zero run")
        count, n = uleb(i)
        if i and not count:
            raise RefError("empty zero run")
        i += n
        d += count
        if d > dlen:
            raise RefError("zero run overflow")
        if slen - i < 2:
            raise RefError("short non-zero run")
        count, n = uleb(i)
        if not count:
            raise RefError("empty non-zero run")
        i += n
        if d + count > dlen or i + count > slen:
            raise RefError("non-zero run overflow")
        out[d:d + count] = src[i:i + count]
        d += count
        i += count
    page[:] = out


class Reference:
    """Per-record reference decoder of the RAM part of a stream."""

    def __init__(self, data: bytes, page_size: int = 4096):
        self.d = data
        self.p = 0
        self.P = page_size
        self.caps = []
        self.advise = None
        self.blocks = {}          # name -> dict(size, host_page_size, addr, mapped)
        self.mem = {}             # name -> bytearray
        self.sent = {}            # name -> set of page indexes named by records
        self.ram_sid = None
        self.cur = None

    # -- primitives
    def take(self, n):
        if self.p + n > len(self.d):
            raise RefError(f"truncated at {self.p}")
        b = self.d[self.p:self.p + n]
        self.p += n
        return b

    def u8(self):
        return self.take(1)[0]

    def be16(self):
        return struct.unpack(">H", self.take(2))[0]

    def be32(self):
        return struct.unpack(">I", self.take(4))[0]

    def be64(self):
        return struct.unpack(">Q", self.take(8))[0]

    def name(self):
        return self.take(self.u8()).decode("ascii")

    # -- outer framing
    def run(self):
        if self.take(4) != b"QEVM" or self.be32() != 3:
            raise RefError("not a version 3 stream")
        while True:
            t = self.u8()
            if t == 0x07:                               # CONFIGURATION
                self.take(self.be32())                  # machine type
                while self.d[self.p] == 0x05:
                    self.p += 1
                    sub = self.name()
                    self.be32()                         # version
                    if sub == "configuration/capabilities":
                        self.caps = [self.name() for _ in range(self.be32())]
                    elif sub == "configuration/target-page-bits":
                        self.P = 1 << self.be32()
                    elif sub == "configuration/uuid":
                        self.take(16)
                    else:
                        raise RefError(f"configuration subsection {sub}")
            elif t == 0x08:                             # COMMAND
                cmd, n = self.be16(), self.be16()
                body = self.take(n)
                if cmd == 3 and n == 16:                # POSTCOPY_ADVISE
                    self.advise = struct.unpack(">QQ", body)
            elif t in (0x01, 0x04):                     # START / FULL
                sid = self.be32()
                idstr = self.name()
                self.be32()
                self.be32()
                if idstr != "ram":
                    if t == 0x04:
                        return self                     # device state: RAM is done
                    raise RefError(f"live section {idstr}")
                self.ram_sid = sid
                self.ram_payload(setup=True)
            elif t in (0x02, 0x03):                     # PART / END
                if self.be32() != self.ram_sid:
                    raise RefError("PART/END of another section")
                self.ram_payload(setup=False)
            elif t == 0x00:                             # EOF
                return self
            else:
                raise RefError(f"section type {t:#x} at {self.p - 1}")

    def footer(self):
        if self.p < len(self.d) and self.d[self.p] == 0x7E:
            self.p += 1
            if self.be32() != self.ram_sid:
                raise RefError("footer of another section")

    # -- "ram" payload
    def ram_payload(self, setup):
        while True:
            h = self.be64()
            flags, addr = h & 0x3FF, h & ~0x3FF
            if flags == MEM_SIZE:
                self.mem_size(addr)
            elif flags == EOS:
                self.footer()
                return
            elif flags == FLUSH:
                pass
            elif flags & ~CONTINUE in (ZERO, PAGE, XBZRLE, COMPRESS):
                self.page(flags, addr)
            else:
                raise RefError(f"flags {flags:#x} at {self.p - 8}")

    def add_block(self, name, size, **kw):
        if name in self.blocks:
            raise RefError("duplicate block")
        self.blocks[name] = dict(size=size, **kw)
        self.mem[name] = bytearray(size)
        self.sent[name] = set()

    def mem_size(self, total):
        mapped = "mapped-ram" in self.caps
        while total:
            name, used = self.name(), None
            used = self.be64()
            hps = None
            if self.advise is not None:
                # a page-size field is a power of two >= 1 KiB with its first byte 0 (a
                # block name length is never 0, a record header has flag bits)
                v = struct.unpack(">Q", self.d[self.p:self.p + 8])[0]
                if self.d[self.p] == 0 and v >= 1024 and v & (v - 1) == 0:
                    hps = self.be64()
            addr = self.be64() if "x-ignore-shared" in self.caps else None
            self.add_block(name, used, host_page_size=hps, addr=addr)
            total -= used
            if mapped:
                version, ps, bitmap_at, pages_at = struct.unpack(">IQQQ", self.take(28))
                assert version == 1 and ps == self.P
                self.mapped_block(name, used, bitmap_at, pages_at)
                self.p = pages_at + used                # the list continues after the pages

    def mapped_block(self, name, used, bitmap_at, pages_at):
        npages = used // self.P
        bitmap = self.d[bitmap_at:bitmap_at + (npages + 63) // 64 * 8]
        mem = self.mem[name]
        for i in range(npages):
            if bitmap[i // 8] >> (i % 8) & 1:           # little-endian 64-bit words
                src = pages_at + i * self.P
                mem[i * self.P:(i + 1) * self.P] = self.d[src:src + self.P]
                self.sent[name].add(i)

    def page(self, flags, addr):
        if not flags & CONTINUE:
            self.cur = self.name()
        if self.cur not in self.blocks:
            raise RefError(f"unknown block {self.cur}")
        P = self.P
        mem = self.mem[self.cur]
        if addr % P or addr + P > len(mem):
            raise RefError("page out of range")
        kind = flags & ~CONTINUE
        if kind == ZERO:
            if self.u8() != 0:
                raise RefError("zero page fill")
            mem[addr:addr + P] = bytes(P)
        elif kind == PAGE:
            mem[addr:addr + P] = self.take(P)
        elif kind == XBZRLE:
            if self.u8() != 0x01:
                raise RefError("xbzrle flag")
            n = self.be16()
            if n > P:
                raise RefError("xbzrle length")
            page = mem[addr:addr + P]
            ref_xbzrle_apply(self.take(n), page)
            mem[addr:addr + P] = page
        else:
            raw = zlib.decompress(self.take(self.be32()))
            assert len(raw) == P
            mem[addr:addr + P] = raw
        self.sent[self.cur].add(addr // P)


def _sha(b) -> str:
    return hashlib.sha256(b).hexdigest()


def compare(data: bytes, ref: Reference, tmp_path=None) -> None:
    """The fast path from memory and, with ``tmp_path``, from a file the
    decoder maps (mapped-ram pages then stay in the file, read in place)."""
    _compare_one(io.BytesIO(data), ref)
    if tmp_path is not None:
        from qemuram import io as qio
        path = tmp_path / "stream.mig"
        path.write_bytes(data)
        saved = qio.MAP_MIN
        qio.MAP_MIN = 0
        try:
            _compare_one(str(path), ref)
        finally:
            qio.MAP_MIN = saved


def _compare_one(src, ref: Reference) -> None:
    with qemuram.stream.open(src) as s:
        assert list(s.ram) == list(ref.blocks)
        for name, blk in s.ram.items():
            info = ref.blocks[name]
            assert blk.size == info["size"], name
            assert blk.host_page_size == info["host_page_size"], name
            assert blk.addr == info["addr"], name
            want = _sha(ref.mem[name])
            assert _sha(blk.read(0, blk.size)) == want, f"memory of {name} differs (read)"
            assert _sha(blk.array()) == want, f"memory of {name} differs (array)"
            sent = {int(i) for i in blk.sent.nonzero()[0]}
            if s.format == "sequential":
                assert sent == ref.sent[name], name


# ------------------------------------------------------------ real fixtures

@over_fixtures(SEQUENTIAL)
def test_reference_equals_fast_path(name, tmp_path):
    data = load_stream(name)
    ref = Reference(data).run()
    fx = FIXTURES[name]
    assert [(n, b["size"]) for n, b in ref.blocks.items()] == \
        [(rb["name"], rb["used_length"]) for rb in fx["ramblocks"]]
    compare(data, ref, tmp_path)
    # and the reference itself agrees with the ground truth
    for r in fx["planted"] + fx["ram_regions"]:
        if r["pages_in_stream"]:
            mem = ref.mem[r["block"]]
            assert _sha(mem[r["block_offset"]:r["block_offset"] + r["length"]]) == r["sha256"]


@over_fixtures(MAPPED)
def test_reference_equals_fast_path_mapped_ram(name, tmp_path):
    data = load_stream(name)
    ref = Reference(data).run()
    compare(data, ref, tmp_path)


def test_reference_sees_postcopy_page_size():
    ref = Reference(load_stream("q35-postcopy-advised")).run()
    assert ref.advise is not None
    assert ref.blocks["pc.ram"]["host_page_size"] == 0x200000
    assert all(b["host_page_size"] is None for n, b in ref.blocks.items() if n != "pc.ram")


# ------------------------------------------------------------ last write wins

def _rec(flags, addr, block=None, body=b""):
    out = struct.pack(">Q", addr | flags)
    if block is not None:
        name = block.encode()
        out += bytes([len(name)]) + name
    return out + body


def _xb(enc: bytes) -> bytes:
    return b"\x01" + struct.pack(">H", len(enc)) + enc


def _overwrites_stream():
    """q35-plain with extra records before the EOS of its END section that
    overwrite pages already sent: ZERO over data, PAGE over zero, XBZRLE on
    data and on zero pages, PAGE then ZERO of one page, a page of another block."""
    data = load_stream("q35-plain")
    recs = decode_records(data)
    end_at = next(i for i, (r, _) in enumerate(recs)
                  if isinstance(r, SectionHeader) and r.kind == SectionType.END)
    eos = next(r for r, _ in recs[end_at:] if isinstance(r, RamEos))
    P = 4096
    rnd = bytes((i * 37 + 11) & 0xFF for i in range(P))
    extra = b"".join([
        _rec(ZERO, 0x100000, "pc.ram", b"\x00"),                 # zero over random data
        _rec(PAGE | CONTINUE, 0x200000, body=b"\x5a" * P),       # page over the 0xaa page
        _rec(XBZRLE | CONTINUE, 0x300000, body=_xb(b"\x00\x03XYZ\x10\x02QR")),
        _rec(PAGE | CONTINUE, 0x500000, body=rnd),
        _rec(ZERO | CONTINUE, 0x500000, body=b"\x00"),           # ... and zero again
        _rec(XBZRLE | CONTINUE, 0x600000, body=_xb(b"\x80\x01\x02hi")),   # zero page + delta
        _rec(PAGE | CONTINUE, 0x101000, body=rnd),
        _rec(PAGE, 0, "pc.rom", body=rnd[::-1]),
    ])
    out = data[:eos.offset] + extra + data[eos.offset:]
    return out, rnd


def test_last_write_wins():
    data, rnd = _overwrites_stream()
    ref = Reference(data).run()
    mem = ref.mem["pc.ram"]
    assert mem[0x100000:0x101000] == bytes(4096)
    assert mem[0x101000:0x102000] == rnd
    assert mem[0x200000:0x201000] == b"\x5a" * 4096
    assert mem[0x300000:0x300003] == b"XYZ"
    assert mem[0x300013:0x300015] == b"QR"
    assert mem[0x500000:0x501000] == bytes(4096)
    assert mem[0x600080:0x600082] == b"hi" and mem[0x600000:0x600080] == bytes(128)
    assert ref.mem["pc.rom"][:4096] == rnd[::-1]
    compare(data, ref)


def test_synthetic_xbzrle_stream_roundtrips():
    data, _ = _overwrites_stream()
    recs, _ = decode_all(data)
    assert b"".join(r.data for r in recs) == data
    assert [r.kind for r in recs].count("XbzrlePage") == 2
    eos = next(r.offset for r in recs if r.kind == "XbzrlePage")
    recs7, _ = decode_all(data, 7, fine=[(eos - 4200, eos + 8400)])
    assert b"".join(r.data for r in recs7) == data


# ------------------------------------------------------------ XBZRLE differential

_run = st.tuples(st.integers(0, 200), st.binary(min_size=1, max_size=40))


def _uleb(n):
    return bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])


@st.composite
def deltas(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=48))                   # arbitrary bytes
    out = b""
    for i, (z, nz) in enumerate(draw(st.lists(_run, max_size=6))):
        out += _uleb(z) + _uleb(len(nz)) + nz
    if draw(st.booleans()) and out:
        cut = draw(st.integers(0, len(out) - 1))
        out = out[:cut] + bytes([draw(st.integers(0, 255))]) + out[cut + 1:]
    return out


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(enc=deltas(), page=st.binary(min_size=256, max_size=256))
def test_xbzrle_decode_matches_reference(enc, page):
    ref = bytearray(page)
    try:
        ref_xbzrle_apply(enc, ref)
        ref_ok = True
    except RefError:
        ref_ok = False
    fast = bytearray(page)
    try:
        xbzrle.decode(enc, fast)
        fast_ok = True
    except XBZRLEError as err:
        assert err.offset is not None
        fast_ok = False
        assert fast == page                                    # all or nothing
    assert fast_ok == ref_ok, (enc.hex(), ref_ok)
    if ref_ok:
        assert fast == ref
