"""Damaged real streams give the typed StreamError, at the right offset, never a
partial result and never another exception type.

Record offsets are found by decoding the fixture first, never hard-coded.
"""
from __future__ import annotations

import collections
import io
import os
import random
import struct
import tempfile

import pytest

import qemuram.stream
from qemuram.errors import (BadMagic, BadZeroPage, DuplicateBlock, FooterMismatch,
                            MappedRamError, PageOutOfRange, StreamError, TrailingGarbage,
                            TruncatedStream, UnknownBlock, UnknownCommand, UnknownFlags,
                            UnknownSection, UnsupportedVersion, VMDescError, XBZRLEError)
from qemuram.framing import NEED_DATA, Decoder
from qemuram.records import (CommandRecord, EndOfStream, PageRun, RamBlockEntry, RamMemSize,
                             SectionFooter, SectionHeader, VMDescription)
from qemuram.wire import RamFlag, SectionType

from conftest import decode_all, decode_records, load_stream

_RECORDS: dict = {}


def records(name):
    """[(record, encoded bytes)] of a fixture fed whole (cached)."""
    if name not in _RECORDS:
        _RECORDS[name] = decode_records(load_stream(name))
    return _RECORDS[name]


def first(name, cls, pred=lambda r: True):
    for rec, raw in records(name):
        if isinstance(rec, cls) and pred(rec):
            return rec, raw
    raise AssertionError(f"no {cls.__name__} in {name}")


def decode_error(data, chunk=None, **options) -> StreamError:
    """Decode ``data`` completely (then EOF); it must raise a StreamError."""
    with pytest.raises(StreamError) as info:
        decode_all(bytes(data), chunk, **options)
    err = info.value
    assert err.offset is not None, err
    return err


def open_error(data) -> StreamError:
    """``qemuram.stream.open`` on the bytes must raise, leaving no image dir."""
    made = []
    real = tempfile.mkdtemp

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    tempfile.mkdtemp = spy
    try:
        with pytest.raises(StreamError) as info:
            qemuram.stream.open(io.BytesIO(bytes(data)))
    finally:
        tempfile.mkdtemp = real
    for d in made:
        assert not os.path.exists(d), f"leftover image dir {d}"
    assert info.value.offset is not None
    return info.value


def expect(data, cls, offset, *, chunked=True, via_open=True):
    """The exact error class and offset, fed whole, in 4 KiB chunks and via open()."""
    err = decode_error(data)
    assert type(err) is cls and err.offset == offset, (type(err).__name__, err.offset, str(err))
    if chunked:
        err = decode_error(data, 4096)
        assert type(err) is cls and err.offset == offset, (type(err).__name__, err.offset, str(err))
    if via_open:
        err = open_error(data)
        assert type(err) is cls and err.offset == offset, (type(err).__name__, err.offset, str(err))
    return err


def be64(d, at):
    return struct.unpack_from(">Q", d, at)[0]


def put64(d, at, v):
    struct.pack_into(">Q", d, at, v)


# ================================================================ (a) truncation

def truncation_offsets(n, spread=200):
    offs = list(range(min(512, n)))
    offs += [512 + i * (n - 512) // spread for i in range(spread)]
    return sorted(set(o for o in offs if o < n))


def _valid_prefixes(name):
    """Truncation points that leave a complete stream: right after the EOF byte
    (the vmdesc trailer is optional)."""
    return {rec.offset + 1 for rec, _ in records(name) if isinstance(rec, EndOfStream)}


def _truncate_and_check(data, offsets, valid):
    kinds = collections.Counter()
    for o in offsets:
        dec = Decoder()
        dec.feed(data[:o])
        dec.feed_eof()
        if o in valid:
            while dec.next_event() is not None:
                pass
            continue
        with pytest.raises(StreamError) as info:
            for _ in range(1 << 20):
                ev = dec.next_event()
                assert ev is not NEED_DATA, f"NEED_DATA after EOF at truncation {o}"
                assert ev is not None, f"truncated at {o} but decoded as complete"
        err = info.value
        assert err.offset is not None and err.offset <= o, (o, type(err).__name__, err.offset)
        # The error sticks: asking again raises the same error.
        with pytest.raises(type(err)):
            dec.next_event()
        kinds[type(err).__name__] += 1
    return kinds


TRUNC_PARTS = 4


@pytest.mark.parametrize("part", range(TRUNC_PARTS))
@pytest.mark.parametrize("name", ["q35-plain", "q35-mapped-ram", "q35-postcopy-advised"])
def test_truncation_gives_typed_error(name, part):
    data = load_stream(name)
    valid = _valid_prefixes(name)
    offsets = truncation_offsets(len(data))[part::TRUNC_PARTS]
    kinds = _truncate_and_check(data, offsets, valid)
    total = sum(kinds.values())
    assert total > 50
    # Mostly "the input ended inside a record"; cuts in the device-state tail
    # (no vmdesc to measure it) are reported by the footer scan.
    assert kinds["TruncatedStream"] >= 0.8 * total, kinds
    assert set(kinds) <= {"TruncatedStream", "FooterMismatch"}, kinds
    if name != "q35-mapped-ram":
        # record boundaries and their neighbours too (cheap on small streams)
        near = sorted({rec.offset + d for rec, _ in records(name)[part::TRUNC_PARTS]
                       for d in (-1, 0, 1, 5, 9) if 0 < rec.offset + d < len(data)})
        _truncate_and_check(data, near, valid)


def _trunc_points(name):
    data = load_stream(name)
    n = len(data)
    recs = records(name)
    full = next(r.offset for r, _ in recs if isinstance(r, SectionHeader)
                and r.kind == SectionType.FULL)
    vm = next(r.offset for r, _ in recs if isinstance(r, VMDescription))
    return [0, 3, 8, 30, n // 3, full - 1, full + 30, vm - 1, vm + 3, vm + 100, n - 1]


@pytest.mark.parametrize("name", ["q35-plain", "q35-mapped-ram", "q35-postcopy-advised"])
def test_truncated_file_through_open(name, tmp_path, monkeypatch):
    data = load_stream(name)
    made = []
    real = tempfile.mkdtemp

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    path = tmp_path / "cut.mig"
    for o in _trunc_points(name):
        path.write_bytes(data[:o])
        with pytest.raises(StreamError) as info:
            qemuram.stream.open(str(path))
        assert info.value.offset is not None and info.value.offset <= o, (o, info.value)
        for d in made:
            assert not os.path.exists(d), f"image dir {d} left behind (cut at {o})"
    # (an intact mapped-ram file needs no scratch directory: its pages stay in the file)
    assert made or name == "q35-mapped-ram", "open() never created its image directory"


@pytest.mark.parametrize("cut", [1, 5, 100, -1])
def test_truncated_inside_vmdesc_is_truncated_stream(cut):
    data = load_stream("q35-plain")
    vm, _ = first("q35-plain", VMDescription)
    o = vm.offset + cut if cut > 0 else len(data) + cut
    err = decode_error(data[:o])
    assert type(err) is TruncatedStream, (type(err).__name__, err.offset, str(err))
    assert err.offset == o


# ================================================================ (b) targeted damage

PLAIN = "q35-plain"


def plain():
    return bytearray(load_stream(PLAIN))


def test_bad_magic():
    d = plain()
    d[0] ^= 0xFF
    expect(d, BadMagic, 0)


def test_version_2():
    d = plain()
    struct.pack_into(">I", d, 4, 2)
    expect(d, UnsupportedVersion, 4)


def _boundary(which):
    if which == "first PART":
        return first(PLAIN, SectionHeader, lambda r: r.kind == SectionType.PART)[0].offset
    if which == "first FULL":
        return first(PLAIN, SectionHeader, lambda r: r.kind == SectionType.FULL)[0].offset
    if which == "command":
        return first(PLAIN, CommandRecord)[0].offset
    if which == "EOF":
        return first(PLAIN, EndOfStream)[0].offset
    raise AssertionError(which)


@pytest.mark.parametrize("which", ["first PART", "first FULL", "command", "EOF"])
@pytest.mark.parametrize("byte", [0x09, 0x05, 0x7F, 0xFF])
def test_unknown_section_type(which, byte):
    at = _boundary(which)
    d = plain()
    d[at] = byte
    expect(d, UnknownSection, at, via_open=(byte == 0x09))


def test_part_for_unknown_section_id():
    at = _boundary("first PART")
    d = plain()
    struct.pack_into(">I", d, at + 1, 0x1234)
    expect(d, UnknownSection, at + 1)


def test_ram_section_version_5():
    hdr, raw = first(PLAIN, SectionHeader, lambda r: r.idstr == "ram")
    d = plain()
    at = hdr.offset + len(raw) - 4                   # be32 version_id ends the header
    assert struct.unpack_from(">I", d, at)[0] == 4
    struct.pack_into(">I", d, at, 5)
    expect(d, UnsupportedVersion, at)


@pytest.mark.parametrize("cmd", [0, 12, 99, 0xFFFF])
def test_unknown_command(cmd):
    rec, _ = first(PLAIN, CommandRecord)
    d = plain()
    struct.pack_into(">H", d, rec.offset + 1, cmd)
    expect(d, UnknownCommand, rec.offset + 1)


def test_command_bad_length():
    rec, _ = first(PLAIN, CommandRecord)
    assert rec.name == "SWITCHOVER_START" and rec.data == b""
    d = plain()
    struct.pack_into(">H", d, rec.offset + 3, 1)      # SWITCHOVER_START has no payload
    expect(d, UnknownCommand, rec.offset + 3)


def _named_zero():
    return first(PLAIN, PageRun, lambda r: r.named and r.kind == RamFlag.ZERO)[0]


def _zero_run():
    return first(PLAIN, PageRun, lambda r: not r.named and r.kind == RamFlag.ZERO
                 and r.count > 8)[0]


def _page_run():
    return first(PLAIN, PageRun, lambda r: not r.named and r.kind == RamFlag.PAGE
                 and r.count > 4)[0]


def _named_page():
    return first(PLAIN, PageRun, lambda r: r.named and r.kind == RamFlag.PAGE)[0]


def _mid_zero():
    """Offset of the 6th record of a CONTINUE ZERO run (9 bytes per record)."""
    run = _zero_run()
    return run.offset + 9 * 5


@pytest.mark.parametrize("flags", [0x01, 0x03, 0x06, 0x0A, 0x0B, 0x12, 0x14, 0x18, 0x2A,
                                   0x42, 0x300, 0x322])
@pytest.mark.parametrize("where", ["named", "mid-run"])
def test_unknown_flags(flags, where):
    at = _named_zero().offset if where == "named" else _mid_zero()
    d = plain()
    put64(d, at, (be64(d, at) & ~0x3FF) | flags)
    expect(d, UnknownFlags, at, via_open=False)


def test_mem_size_outside_setup():
    at = _named_zero().offset
    d = plain()
    put64(d, at, (be64(d, at) & ~0x3FF) | RamFlag.MEM_SIZE)
    expect(d, UnknownFlags, at)


def test_eos_with_address_bits():
    at = _named_zero().offset
    d = plain()
    put64(d, at, 0x1000 | RamFlag.EOS)
    expect(d, UnknownFlags, at)


@pytest.mark.parametrize("flags", [0x80, 0xA0, 0x82, 0x88])
@pytest.mark.parametrize("where", ["named", "mid-run"])
def test_hook_flag(flags, where):
    at = _named_zero().offset if where == "named" else _mid_zero()
    d = plain()
    put64(d, at, (be64(d, at) & ~0x3FF) | flags)
    err = expect(d, UnknownFlags, at, via_open=(flags == 0x80))
    assert "HOOK" in str(err) or flags & 0x0A


def test_unknown_block_name():
    rec = _named_zero()
    name_at = rec.offset + 9
    d = plain()
    assert d[name_at:name_at + len(rec.block)] == rec.block.encode()
    d[name_at + 1] ^= 0x08                             # "pc.ram" -> "pp.ram"-like
    err = expect(d, UnknownBlock, name_at)
    assert err.found != rec.block


def test_continue_before_any_block():
    rec = _named_zero()
    d = plain()
    put64(d, rec.offset, be64(d, rec.offset) | RamFlag.CONTINUE)
    expect(d, UnknownBlock, rec.offset)


def test_duplicate_block_in_mem_size():
    ms, raw = first(PLAIN, RamMemSize)
    names = [b.name for b in ms.blocks]
    # two names of the same length, the later one renamed to the earlier one
    a, b = next((x, y) for i, x in enumerate(names) for y in names[i + 1:] if len(x) == len(y))
    d = plain()
    entry = ms.offset + 8
    for blk in ms.blocks:
        if blk.name == b:
            break
        entry += 1 + len(blk.name) + 8
    assert d[entry] == len(b) and d[entry + 1:entry + 1 + len(b)] == b.encode()
    d[entry + 1:entry + 1 + len(b)] = a.encode()
    err = expect(d, DuplicateBlock, entry)
    assert err.found == a


@pytest.mark.parametrize("where", ["named", "mid-run"])
@pytest.mark.parametrize("addr", ["end", "huge", "unaligned"])
def test_page_out_of_range(where, addr):
    rec = _named_zero()
    used = {b.name: b.used_length for b in first(PLAIN, RamMemSize)[0].blocks}[rec.block]
    at = rec.offset if where == "named" else _mid_zero()
    value = {"end": used, "huge": 1 << 62, "unaligned": 0x400}[addr]
    d = plain()
    put64(d, at, value | (be64(d, at) & 0x3FF))
    expect(d, PageOutOfRange, at, via_open=(where == "named"))


def test_last_page_of_block_is_in_range():
    rec = _named_zero()
    used = {b.name: b.used_length for b in first(PLAIN, RamMemSize)[0].blocks}[rec.block]
    d = plain()
    at = _mid_zero()
    put64(d, at, (used - 4096) | (be64(d, at) & 0x3FF))
    recs, _ = decode_all(bytes(d))
    assert b"".join(r.data for r in recs) == bytes(d)


@pytest.mark.parametrize("where", ["named", "mid-run"])
@pytest.mark.parametrize("fill", [1, 0x80, 0xFF])
def test_zero_record_with_nonzero_fill(where, fill):
    if where == "named":
        rec = _named_zero()
        at = rec.offset + 8 + 1 + len(rec.block)
    else:
        at = _mid_zero() + 8
    d = plain()
    assert d[at] == 0
    d[at] = fill
    err = expect(d, BadZeroPage, at, via_open=(fill == 1))
    assert err.found == fill


@pytest.mark.parametrize("length", [4097, 0x2000, 0xFFFF])
def test_xbzrle_longer_than_page_named(length):
    rec = _named_page()
    q = rec.offset + 8 + 1 + len(rec.block)
    d = plain()
    put64(d, rec.offset, (be64(d, rec.offset) & ~0x3FF) | RamFlag.XBZRLE)
    d[q] = 0x01
    struct.pack_into(">H", d, q + 1, length)
    err = expect(d, XBZRLEError, q + 1, via_open=(length == 4097))
    assert err.found == length


def test_xbzrle_longer_than_page_in_run():
    run = _page_run()
    at = run.offset + 3 * (8 + 4096)                  # 4th record of a CONTINUE PAGE run
    d = plain()
    assert be64(d, at) & 0x3FF == RamFlag.PAGE | RamFlag.CONTINUE
    put64(d, at, (be64(d, at) & ~0x3FF) | RamFlag.XBZRLE | RamFlag.CONTINUE)
    d[at + 8] = 0x01
    struct.pack_into(">H", d, at + 9, 4097)
    expect(d, XBZRLEError, at + 9)


def test_xbzrle_bad_encoding_flag():
    rec = _named_page()
    q = rec.offset + 8 + 1 + len(rec.block)
    d = plain()
    put64(d, rec.offset, (be64(d, rec.offset) & ~0x3FF) | RamFlag.XBZRLE)
    d[q] = 0x02
    expect(d, XBZRLEError, q)


def _with_xbzrle(encoded: bytes):
    """q35-plain with its first named PAGE record replaced by a named XBZRLE
    record carrying ``encoded``; returns (stream, offset of encoded[0])."""
    rec, raw = first(PLAIN, PageRun, lambda r: r.named and r.kind == RamFlag.PAGE)
    assert rec.count == 1
    name = rec.block.encode()
    new = (struct.pack(">Q", int(rec.page_offsets[0]) | RamFlag.XBZRLE) + bytes([len(name)])
           + name + b"\x01" + struct.pack(">H", len(encoded)) + encoded)
    data = load_stream(PLAIN)
    out = data[:rec.offset] + new + data[rec.offset + len(raw):]
    return out, rec.offset + len(new) - len(encoded)


def test_xbzrle_record_framing_is_lossless():
    data, _ = _with_xbzrle(b"\x00\x00")              # framing-valid, delta-invalid
    recs, _ = decode_all(data)
    assert b"".join(r.data for r in recs) == data
    assert "XbzrlePage" in [r.kind for r in recs]


@pytest.mark.parametrize("encoded,pos", [
    (b"\x00\x00", 1),                  # data ends before a non-zero run
    (b"\x10\x00", 1),                  # zero-length non-zero run
    (b"\x10\x05AB", 1),                # run longer than the data left
    (b"\x00\x01A\x00\x01B", 3),        # zero-length zero run after the first pair
    (b"\xff\x7f\x01A", 0),             # zero run past the end of the page
])
def test_xbzrle_undecodable_delta_fails_in_open(encoded, pos):
    data, start = _with_xbzrle(encoded)
    err = open_error(data)
    assert type(err) is XBZRLEError, (type(err).__name__, str(err))


@pytest.mark.parametrize("encoded,pos", [
    (b"\x00\x00", 1),
    (b"\x10\x00", 1),
    (b"\x00\x01A\x00\x01B", 3),
])
def test_xbzrle_delta_error_offset_is_absolute(encoded, pos):
    data, start = _with_xbzrle(encoded)
    err = open_error(data)
    assert type(err) is XBZRLEError
    assert err.offset == start + pos, (err.offset, start + pos, str(err))


def test_footer_names_another_section():
    foot, _ = first(PLAIN, SectionFooter)
    d = plain()
    struct.pack_into(">I", d, foot.offset + 1, foot.section_id + 77)
    err = expect(d, FooterMismatch, foot.offset + 1)
    assert err.expected == foot.section_id


def test_footer_byte_missing():
    foot, _ = first(PLAIN, SectionFooter)
    d = plain()
    d[foot.offset] = 0x7F
    expect(d, FooterMismatch, foot.offset)


def test_trailing_garbage_with_vmdesc_given():
    data = load_stream(PLAIN)
    vm, _ = first(PLAIN, VMDescription)
    for junk in (b"\x00", b"junk", b"\x06\x00\x00\x00\x00"):
        err = decode_error(data + junk, vmdesc=vm.parsed())
        assert type(err) is TrailingGarbage and err.offset == len(data)


@pytest.mark.parametrize("junk", [b"\x00", b"junk", b"QEVM\x00\x00\x00\x03"])
def test_trailing_garbage_after_vmdesc(junk):
    data = load_stream(PLAIN)
    expect(data + junk, TrailingGarbage, len(data), chunked=False)


def test_trailing_garbage_is_a_stream_error():
    """Whatever class, garbage after the vmdesc is refused with an offset."""
    data = load_stream(PLAIN)
    err = decode_error(data + b"junk")
    assert err.offset <= len(data)
    err = open_error(data + b"junk")
    assert err.offset <= len(data)


def test_vmdesc_broken_json():
    data = bytearray(load_stream(PLAIN))
    vm, raw = first(PLAIN, VMDescription)
    at = vm.offset + 5 + raw[5:].index(b",")
    data[at] = ord("#")                               # not JSON any more
    # The vmdesc is only recognised when it parses, so the decoder falls back to
    # the footer scan, which refuses the tail: what the library does today.
    err = decode_error(data)
    assert isinstance(err, (VMDescError, FooterMismatch)), err
    assert err.offset <= len(data)
    err = open_error(data)
    assert isinstance(err, (VMDescError, FooterMismatch)), err
    # With the trailer's description known ahead, the broken JSON itself is named.
    err = decode_error(data, vmdesc=vm.parsed())
    assert type(err) is VMDescError and vm.offset < err.offset <= len(data)


def test_vmdesc_length_wrong():
    data = bytearray(load_stream(PLAIN))
    vm, raw = first(PLAIN, VMDescription)
    struct.pack_into(">I", data, vm.offset + 1, len(raw) - 5 + 1)
    err = decode_error(data)
    assert err.offset <= len(data)
    err = decode_error(data, vmdesc=vm.parsed())
    assert type(err) is TruncatedStream and err.offset == len(data)


# --- mapped-ram headers

def _mapped_header(which=0):
    ents = [r for r, _ in records("q35-mapped-ram") if isinstance(r, RamBlockEntry)]
    e = ents[which]
    return e.offset + 1 + len(e.block.name) + 8       # name length, name, used_length


@pytest.mark.parametrize("which", [0, 1])
def test_mapped_ram_header_page_size(which):
    at = _mapped_header(which)
    d = bytearray(load_stream("q35-mapped-ram"))
    assert struct.unpack_from(">IQ", d, at) == (1, 4096)
    struct.pack_into(">Q", d, at + 4, 8192)
    expect(d, MappedRamError, at + 4, chunked=(which == 0), via_open=(which == 0))


@pytest.mark.parametrize("version", [0, 2])
def test_mapped_ram_header_version(version):
    at = _mapped_header(0)
    d = bytearray(load_stream("q35-mapped-ram"))
    struct.pack_into(">I", d, at, version)
    expect(d, UnsupportedVersion, at)


def test_mapped_ram_bitmap_overlaps_header():
    at = _mapped_header(0)
    d = bytearray(load_stream("q35-mapped-ram"))
    struct.pack_into(">Q", d, at + 12, 0)
    expect(d, MappedRamError, at + 12, chunked=False, via_open=False)


# --- not a stream at all

ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\x3e\x00" + bytes(44)


@pytest.mark.parametrize("data,cls,offset", [
    (b"", TruncatedStream, 0),
    (b"QE", TruncatedStream, 2),
    (b"QEVM", TruncatedStream, 4),
    (b"QEVM\x00\x00\x00", TruncatedStream, 7),
    (b"QEVM\x00\x00\x00\x03", TruncatedStream, 8),
    (ELF, BadMagic, 0),
    (random.Random(7).randbytes(4096), BadMagic, 0),
    (b"\x00" * 64, BadMagic, 0),
    (b"MVEQ\x00\x00\x00\x03", BadMagic, 0),
], ids=["empty", "QE", "magic-only", "short-version", "header-only", "elf", "random",
        "zeros", "swapped-magic"])
def test_not_a_stream(data, cls, offset):
    err = decode_error(data)
    assert type(err) is cls and err.offset == offset, (type(err).__name__, err.offset, str(err))
    err = decode_error(data, 1)
    assert type(err) is cls and err.offset == offset


@pytest.mark.parametrize("data", [b"", ELF, random.Random(8).randbytes(1000), b"QEVM",
                                  b"QEVM\x00\x00\x00\x03"],
                         ids=["empty", "elf", "random", "magic-only", "header-only"])
def test_not_a_stream_through_open(data, tmp_path):
    path = tmp_path / "x.mig"
    path.write_bytes(data)
    with pytest.raises(StreamError) as info:
        qemuram.stream.open(str(path))
    assert isinstance(info.value, (BadMagic, TruncatedStream)), info.value
    assert info.value.offset is not None and info.value.offset <= len(data)
