"""Mutated real streams and random bytes: the decoder either succeeds (and then
re-encodes the damaged input byte for byte) or raises a StreamError subclass;
never IndexError, ValueError, struct.error, numpy errors...

The base stream is q35-plain with every page run cut to its first three
records: still a valid QEMU stream (same blocks, same device state, same
vmdesc), five times smaller, so each example decodes in milliseconds.
"""
from __future__ import annotations

import io
import struct

from hypothesis import HealthCheck, given, settings, strategies as st

import qemuram.stream
from qemuram.errors import StreamError
from qemuram.framing import encode_record
from qemuram.records import PageRun, RamMemSize, SectionHeader
from qemuram.wire import RamFlag, SectionType

from conftest import decode_all, decode_records, load_stream

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _build_mini():
    parts, bounds, pos = [], [], 0
    for rec, raw in decode_records(load_stream("q35-plain")):
        if isinstance(rec, PageRun) and rec.count > 3:
            rec = PageRun(kind=rec.kind, block=rec.block, page_offsets=rec.page_offsets[:3],
                          named=rec.named, data=None if rec.data is None else rec.data[:3],
                          offset=rec.offset)
            raw = encode_record(rec, 4096)
        bounds.append(pos)
        pos += len(raw)
        parts.append(raw)
    return b"".join(parts), bounds


MINI, BOUNDS = _build_mini()
RECS = decode_records(MINI)
BLOCKS = [b.name for r, _ in RECS if isinstance(r, RamMemSize) for b in r.blocks]
# Everything up to (and including) the header of the first PART of "ram":
# random ram records appended here are parsed as that section's payload.
RAM_PART = next(r.offset + len(raw) for r, raw in RECS
                if isinstance(r, SectionHeader) and r.kind == SectionType.PART)


def outcome(data: bytes, chunk=None):
    """('ok', n records) or (error class name, offset); anything else propagates."""
    try:
        recs, dec = decode_all(data, chunk)
    except StreamError as err:
        assert err.offset is not None, repr(err)
        assert 0 <= err.offset <= len(data), (err.offset, len(data), repr(err))
        return type(err).__name__, err.offset
    assert b"".join(r.data for r in recs) == data
    pos = 0
    for r in recs:
        assert r.offset == pos
        pos += len(r.data)
    assert dec.done
    return "ok", len(recs)


def test_mini_stream_is_valid():
    assert len(MINI) < len(load_stream("q35-plain")) // 3
    assert outcome(MINI)[0] == "ok"
    assert outcome(MINI, 4096)[0] == "ok"
    with qemuram.stream.open(io.BytesIO(MINI)) as s:
        assert list(s.ram) == BLOCKS


# ------------------------------------------------------------ mutations

_pos = st.one_of(
    st.tuples(st.sampled_from(BOUNDS), st.integers(-3, 16)).map(lambda t: t[0] + t[1]),
    st.integers(0, len(MINI) - 1),
)
_edit = st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]), _pos,
                  st.integers(0, 255), st.integers(1, 6))


def mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for op, pos, value, n in edits:
        pos = min(max(pos, 0), len(b) - 1) if b else 0
        if op == "flip":
            if b:
                b[pos] ^= 1 << (value & 7)
        elif op == "set":
            if b:
                b[pos] = value
        elif op == "insert":
            b[pos:pos] = bytes([value]) * n
        else:
            del b[pos:pos + n]
    return bytes(b)


@FUZZ
@given(edits=st.lists(_edit, min_size=1, max_size=4))
def test_mutated_stream_decodes_or_raises_stream_error(edits):
    data = mutate(MINI, edits)
    whole = outcome(data)
    # Same verdict whatever the chunking: the same error at the same offset
    # (page runs are cut differently, so only success is compared on success).
    chunked = outcome(data, 4096)
    if whole[0] == "ok":
        assert chunked[0] == "ok"
    else:
        assert chunked == whole


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(_edit, min_size=1, max_size=3))
def test_mutated_stream_through_open(edits):
    data = mutate(MINI, edits)
    try:
        with qemuram.stream.open(io.BytesIO(data)) as s:
            assert s.size == len(data)
            for blk in s.ram.values():
                assert blk.array().shape == (blk.size,)
    except StreamError as err:
        assert err.offset is not None


# ------------------------------------------------------------ random bytes

HEADER = b"QEVM\x00\x00\x00\x03"


@FUZZ
@given(tail=st.binary(max_size=600))
def test_random_bytes_after_header(tail):
    outcome(HEADER + tail)


_SECTION_BYTES = st.lists(st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07,
                                           0x08, 0x7E, 0x10, 0x20, 0xFF]), max_size=300)


@FUZZ
@given(tail=_SECTION_BYTES)
def test_framing_like_bytes_after_header(tail):
    outcome(HEADER + bytes(tail))


_FLAGS = st.sampled_from([0x02, 0x08, 0x22, 0x28, 0x40, 0x60, 0x10, 0x200, 0x04, 0x80, 0x100,
                          0x120, 0x01, 0x0A, 0x3FF])
_ADDR = st.one_of(st.integers(0, 16).map(lambda i: i << 12),
                  st.sampled_from([(64 << 20) - 4096, 64 << 20, 0x400, 1 << 62]))
_NAME = st.one_of(st.sampled_from(BLOCKS), st.text("abc./@", max_size=4))
_BODY = st.one_of(st.just(b"\x00"), st.just(b"\x01"),
                  st.binary(min_size=0, max_size=16),
                  st.just(bytes(4096)), st.binary(min_size=4096, max_size=4096),
                  st.tuples(st.integers(0, 5000), st.binary(max_size=64)).map(
                      lambda t: b"\x01" + struct.pack(">H", t[0]) + t[1]))


@st.composite
def ram_records(draw):
    out = bytearray()
    for _ in range(draw(st.integers(1, 12))):
        flags = draw(_FLAGS)
        out += struct.pack(">Q", draw(_ADDR) | flags)
        if not flags & RamFlag.CONTINUE and draw(st.booleans()):
            name = draw(_NAME).encode()
            out += bytes([len(name)]) + name
        out += draw(_BODY)
    if draw(st.booleans()):
        out += struct.pack(">Q", RamFlag.EOS) + b"\x7e" + MINI[RAM_PART - 4:RAM_PART]
    return bytes(out)


@FUZZ
@given(payload=ram_records(), rest=st.booleans())
def test_random_ram_records(payload, rest):
    """Plausible-looking ram records inside the first PART section."""
    data = MINI[:RAM_PART] + payload
    if rest:
        data += MINI[RAM_PART:]
    outcome(data)


# ------------------------------------------------------------ mapped-ram files, read in place

def _mapped_points():
    """Offsets where a mapped-ram file's structure lives: every record start
    (block entries, mapped-ram headers, bitmaps, the skipped page areas and
    their ends, device sections, the vmdesc)."""
    from qemuram import io as qio
    from qemuram.records import MappedRamArea
    data = load_stream("q35-mapped-ram")
    points = set()
    with io.BytesIO(data) as f:
        for rec in qio.iter_records(f):
            points.add(rec.offset)
            if isinstance(rec, MappedRamArea):
                points.add(rec.offset + rec.size)
    return data, sorted(p for p in points if p < len(data))


MAPPED_DATA, MAPPED_POINTS = _mapped_points()
_mpos = st.tuples(st.sampled_from(MAPPED_POINTS), st.integers(-4, 40)).map(
    lambda t: max(0, t[0] + t[1]))


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(["flip", "set"]), _mpos, st.integers(0, 255),
                                st.just(1)), min_size=1, max_size=3),
       cut=st.one_of(st.none(), _mpos), mapped=st.booleans())
def test_mutated_mapped_ram_file_in_place(edits, cut, mapped, tmp_path_factory, monkeypatch):
    """A damaged mapped-ram file opened from disk (pages attached in place,
    page areas seeked over or mapped): a StreamError with an offset, or a
    stream whose blocks read back."""
    from qemuram import io as qio
    data = mutate(MAPPED_DATA, edits)
    if cut is not None:
        data = data[:cut]
    path = _scratch_file(tmp_path_factory, data)
    monkeypatch.setattr(qio, "MAP_MIN", 0 if mapped else 1 << 62)
    try:
        with qemuram.stream.open(str(path)) as s:
            for blk in s.ram.values():
                n = min(blk.size, 1 << 20)
                assert len(blk.read(0, n)) == n
                if blk.size >= 4096:
                    assert len(blk.read(blk.size - 4096, 4096)) == 4096
    except StreamError as err:
        assert err.offset is not None and 0 <= err.offset <= len(data), repr(err)


def _scratch_file(tmp_path_factory, data: bytes):
    """One file per test process, rewritten for each example and sparse where
    the data is zero (a mapped-ram file is mostly holes): examples must not
    pile up tens of MB each on disk."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = tmp_path_factory.mktemp("fuzz-files") / "stream.mig"
    step = 1 << 16
    zero = bytes(step)
    with open(_SCRATCH, "wb") as f:
        for i in range(0, len(data), step):
            chunk = data[i:i + step]
            if chunk == zero[:len(chunk)]:
                f.seek(i + len(chunk))
            else:
                f.seek(i)
                f.write(chunk)
        f.truncate(len(data))
    return _SCRATCH


_SCRATCH = None


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(edits=st.lists(_edit, min_size=1, max_size=3))
def test_mutated_stream_file_through_mmap(edits, tmp_path_factory, monkeypatch):
    """The same damage in a file the decoder maps instead of reads: the same
    verdict, error and offset as reading it."""
    from qemuram import io as qio
    data = mutate(MINI, edits)
    path = _scratch_file(tmp_path_factory, data)

    def verdict(map_min):
        monkeypatch.setattr(qio, "MAP_MIN", map_min)
        try:
            with qemuram.stream.open(str(path), verify=True) as s:
                assert s.roundtrip and s.size == len(data)
                return "ok", {n: b.read(0, b.size) for n, b in s.ram.items()}
        except StreamError as err:
            assert err.offset is not None
            return type(err).__name__, err.offset

    assert verdict(0) == verdict(1 << 62)
