"""Batched XBZRLE loading: ``Decoder(xbzrle_runs=True)`` events, ``decode_many``
and the image applying whole runs, checked against one-record-at-a-time
decoding (``xbzrle.decode``, itself checked against a byte-by-byte model)."""
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import qemuram
from qemuram import xbzrle
from qemuram.errors import UsageError, XBZRLEError
from qemuram.framing import NEED_DATA, Decoder, encode_record
from qemuram.image import _distinct_spans
from qemuram.ram import encode_xbzrle_run
from qemuram.records import (ConfigSubsection, Configuration, EndOfStream, Header, PageRun,
                             RamBlockInfo, RamEos, RamMemSize, SectionFooter, SectionHeader,
                             XbzrlePage, XbzrleRun)
from qemuram.wire import RamFlag, SectionType

from conftest import decode_all

P = 4096
NPAGES = 64
BLOCK = "pc.ram"


def _delta(rng, old: bytes, kind: str):
    new = bytearray(old)
    if kind == "bytes":          # single changed bytes (what QEMU sends for a sparse writer)
        for i in rng.choice(P, size=40, replace=False):
            new[i] ^= 0x5A
    elif kind == "long":         # long runs: two-byte ULEB128 lengths
        new[100:1300] = bytes((old[i] + 1) & 0xFF for i in range(100, 1300))
        new[3000:3001] = bytes([old[3000] ^ 1])
    elif kind == "tail":         # last byte of the page
        new[P - 1] ^= 0xFF
    enc = xbzrle.encode(old, bytes(new))
    assert enc is not None
    return enc


class Model:
    """Guest memory by applying records one at a time, in order."""

    def __init__(self):
        self.mem = [bytes(P)] * NPAGES

    def page(self, i, data):
        self.mem[i] = bytes(data)

    def xbzrle(self, i, enc):
        page = bytearray(self.mem[i])
        xbzrle.decode(enc, page)
        self.mem[i] = bytes(page)


def _stream(seed=0, corrupt=None):
    """A stream whose END section has long runs of CONTINUE XBZRLE records:
    pages repeated inside a run (at once and far apart), an empty delta,
    PAGE and ZERO records between XBZRLE updates of the same page.
    ``corrupt=(k, encoded)`` replaces the k-th XBZRLE delta.
    Returns (bytes, model, offsets of each XBZRLE delta's first byte)."""
    rng = np.random.default_rng(seed)
    model = Model()
    first = rng.integers(0, 256, size=(NPAGES, P), dtype=np.uint8)
    first[7] = 0
    for i in range(NPAGES):
        model.page(i, first[i])
    ram = []
    xb = []

    def xbz(i, kind):
        k = len(xb)
        enc = _delta(rng, model.mem[i], kind) if kind != "empty" else b""
        if corrupt is not None and corrupt[0] == k:
            enc = corrupt[1]
        else:
            model.xbzrle(i, enc)
        xb.append(len(ram))
        ram.append(XbzrlePage(BLOCK, i * P, False, enc))

    order = rng.permutation(NPAGES).tolist()
    for j, i in enumerate(order[:40]):
        xbz(i, ["bytes", "long", "tail"][j % 3])
    xbz(order[0], "bytes")                      # same page again in this run
    xbz(order[0], "bytes")                      # ... and right after
    xbz(5, "empty")
    for i in range(20, 30):
        xbz(i, "bytes")
    # PAGE and ZERO over pages XBZRLE touched, then XBZRLE on top of them
    newpage = rng.integers(0, 256, size=(1, P), dtype=np.uint8)
    ram.append(PageRun(RamFlag.PAGE, BLOCK, np.array([21 * P], dtype=np.uint64), False,
                       data=newpage))
    model.page(21, newpage[0])
    ram.append(PageRun(RamFlag.ZERO, BLOCK, np.array([22 * P], dtype=np.uint64), False))
    model.page(22, bytes(P))
    for i in (21, 22, 23, 7):
        xbz(i, "bytes")
    ram.append(PageRun(RamFlag.ZERO, BLOCK, np.array([23 * P], dtype=np.uint64), False))
    model.page(23, bytes(P))

    recs = [
        Header(), Configuration("pc-q35-10.0", [ConfigSubsection(
            "configuration/target-page-bits", 1, (12).to_bytes(4, "big"))]),
        SectionHeader(SectionType.START, 0, "ram", 0, 4),
        RamMemSize(NPAGES * P, [RamBlockInfo(BLOCK, NPAGES * P)]), RamEos(), SectionFooter(0),
        SectionHeader(SectionType.PART, 0, "ram"),
        PageRun(RamFlag.PAGE, BLOCK, np.arange(NPAGES, dtype=np.uint64) * np.uint64(P), True,
                data=first),
        RamEos(), SectionFooter(0),
        SectionHeader(SectionType.END, 0, "ram"), *ram, RamEos(), SectionFooter(0),
        EndOfStream(),
    ]
    parts = [encode_record(r, P) for r in recs]
    base = len(b"".join(parts[:recs.index(ram[0])]))
    starts, pos = [], base
    for r, raw in zip(ram, parts[recs.index(ram[0]):]):
        if isinstance(r, XbzrlePage):
            starts.append(pos + 11)
        pos += len(raw)
    return b"".join(parts), model, starts


def _decode(data, chunk=None, **options):
    recs, _ = decode_all(data, chunk, **options)
    return recs


def test_runs_are_made_and_split_at_repeated_pages():
    data, _, _ = _stream()
    dec = Decoder(xbzrle_runs=True)
    dec.feed(data)
    dec.feed_eof()
    runs = [ev for ev in dec if isinstance(ev, XbzrleRun)]
    assert [r.count for r in runs] == [53, 4]
    idx = (runs[0].page_offsets // np.uint64(P)).astype(np.intp)
    spans = _distinct_spans(idx)
    assert len(spans) == 3 and spans[0][0] == 0 and spans[-1][1] == runs[0].count
    for lo, hi in spans:
        assert np.unique(idx[lo:hi]).size == hi - lo
    assert _distinct_spans(np.array([3, 1, 2])) == [(0, 3)]
    assert _distinct_spans(np.array([3, 3, 1, 3])) == [(0, 1), (1, 3), (3, 4)]


@pytest.mark.parametrize("chunk", [None, 997, 4096])
def test_runs_match_single_records(chunk):
    data, _, _ = _stream()
    single = [r for r in _decode(data, chunk) if r.kind == "XbzrlePage"]
    assert len(single) == 57
    dec = Decoder(xbzrle_runs=True)
    recs = _decode(data, chunk, decoder=dec)
    assert b"".join(r.data for r in recs) == data
    assert "XbzrlePage" not in [r.kind for r in recs]
    # the same records, whichever way they were cut
    dec = Decoder(xbzrle_runs=True)
    expanded = []
    pieces = [data[i:i + (chunk or len(data))] for i in range(0, len(data), chunk or len(data))]
    while True:
        ev = dec.next_event()
        if ev is None:
            break
        if ev is NEED_DATA:
            dec.feed(pieces.pop(0)) if pieces else dec.feed_eof()
            continue
        if isinstance(ev, XbzrleRun):
            expanded += [(p.offset, p.page_offset, bytes(p.encoded)) for p in ev.pages()]
    assert expanded == [(r.offset, _page_offset(r), r.data[11:]) for r in single]


def _page_offset(rec):
    return int.from_bytes(rec.data[:8], "big") & ~0x3FF


def test_encode_run_from_arbitrary_layout():
    encs = [b"\x00\x01A", b"", b"\x05\x02BC\x01\x01D"]
    data = np.frombuffer(b"xx" + encs[0] + b"yyy" + encs[2] + b"z", dtype=np.uint8)
    run = XbzrleRun(BLOCK, np.array([0, P, 2 * P], dtype=np.uint64), data,
                    np.array([2, 0, 8]), np.array([3, 0, 7]))
    want = b"".join(encode_record(XbzrlePage(BLOCK, k * P, False, e), P)
                    for k, e in enumerate(encs))
    assert encode_xbzrle_run(run) == want
    assert encode_record(run, P) == want


@pytest.mark.parametrize("verify", [False, True])
def test_memory_matches_record_by_record(verify):
    data, model, _ = _stream()
    with qemuram.open(io.BytesIO(data), verify=verify) as st:
        blk = st.ram[BLOCK]
        want = b"".join(model.mem)
        assert blk.read(0, blk.size) == want
        assert blk.array().tobytes() == want
        assert blk.read_pages(20, 5).tobytes() == want[20 * P:25 * P]
        assert blk.counts["xbzrle"] == 57
        assert blk.written[7] and blk.written[22] and not blk.written[23]
        assert sum(s.xbzrle_records for s in st.ram_sections) == 57
        if verify:
            assert st.roundtrip
    st = qemuram.stream.verify(io.BytesIO(data))
    assert st.roundtrip and st.ram[BLOCK].counts["xbzrle"] == 57
    assert st.ram[BLOCK].sent.all()


@pytest.mark.parametrize("k,encoded,pos", [
    (0, b"\x00\x00", 1),                 # zero-length non-zero run, first record of the run
    (30, b"\x00\x01A\x00\x01B", 3),      # zero-length zero run after the first pair
    (41, b"\xff\x7f\x01A", 0),           # zero run past the end of the page
    (52, b"\x10\x05AB", 1),              # non-zero run past the end of the data
    (53, b"\x01\x01A\x81", 3),           # first record of the second run
])
def test_bad_delta_inside_run(k, encoded, pos):
    data, _, starts = _stream(corrupt=(k, encoded))
    for call in (lambda: qemuram.open(io.BytesIO(data)),
                 lambda: qemuram.stream.verify(io.BytesIO(data))):
        with pytest.raises(XBZRLEError) as e:
            call()
        assert e.value.offset == starts[k] + pos, (e.value.offset, starts[k] + pos)


@pytest.mark.parametrize("field", ["flag", "length"])
def test_bad_framing_inside_run(field):
    data, _, starts = _stream()
    d = bytearray(data)
    at = starts[25] - 3                   # the 26th record's encoding flag
    if field == "flag":
        d[at] = 2
    else:
        d[at + 1:at + 3] = (P + 1).to_bytes(2, "big")
    with pytest.raises(XBZRLEError) as e:
        qemuram.open(io.BytesIO(bytes(d)))
    assert e.value.offset == at + (field == "length")


# ------------------------------------------------------------------ decode_many

_pair = st.tuples(st.integers(0, 300), st.binary(min_size=1, max_size=30))


def _uleb(n):
    return bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])


@st.composite
def _deltas(draw):
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=12))
    out = b"".join(_uleb(z) + _uleb(len(nz)) + nz for z, nz in draw(st.lists(_pair, max_size=5)))
    if out and draw(st.integers(0, 5)) == 0:
        cut = draw(st.integers(0, len(out) - 1))
        out = out[:cut] + bytes([draw(st.sampled_from([0, 0x7F, 0x80, 0xFF]))]) + out[cut + 1:]
    return out


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(encs=st.lists(_deltas(), min_size=1, max_size=24), gap=st.integers(0, 3),
       seed=st.integers(0, 1000), tail=st.sampled_from([0, 2, 8, 100]))
def test_decode_many_matches_decode(encs, gap, seed, tail):
    # tail: how few deltas are left when the rest is walked in Python
    saved, xbzrle._TAIL = xbzrle._TAIL, tail
    try:
        _check_many(encs, gap, seed)
    finally:
        xbzrle._TAIL = saved


def _check_many(encs, gap, seed):
    size = 1024
    rng = np.random.default_rng(seed)
    buf, starts = b"", []
    for e in encs:
        buf += b"\xee" * gap
        starts.append(len(buf))
        buf += e
    rows = rng.permutation(len(encs))
    pages = rng.integers(0, 256, size=(len(encs), size), dtype=np.uint8)
    want, err = pages.copy(), None
    try:
        for k, e in enumerate(encs):
            xbzrle.decode(e, bytearray(size), offset=100 + starts[k])
        for k, e in enumerate(encs):
            xbzrle.decode(e, want[rows[k]])
    except XBZRLEError as exc:
        err, want = (type(exc), exc.offset, str(exc)), pages.copy()
    got = pages.copy()
    for target in (got, None):
        try:
            xbzrle.decode_many(buf, starts, [len(e) for e in encs], target, page_size=size,
                               rows=rows, offset=100)
            assert err is None
        except XBZRLEError as exc:
            assert (type(exc), exc.offset, str(exc)) == err
    assert np.array_equal(got, want)        # all or nothing


def test_decode_many_long_and_single_byte_runs():
    rng = np.random.default_rng(3)
    old = rng.integers(0, 256, size=(3, P), dtype=np.uint8)
    new = old.copy()
    new[0, ::64] ^= 1                      # 64 single bytes
    new[1, 10:2000] ^= 1                   # one run with two-byte lengths
    new[2, P - 1] ^= 1
    encs = [xbzrle.encode(o, n) for o, n in zip(old, new)]
    buf = b"".join(encs)
    starts = np.cumsum([0] + [len(e) for e in encs[:-1]])
    pages = old.copy()
    xbzrle.decode_many(buf, starts, [len(e) for e in encs], pages)
    assert np.array_equal(pages, new)
    only = old[:1].copy()
    xbzrle.decode_many(buf, starts[:1], [len(encs[0])], only)
    assert np.array_equal(only, new[:1])


@pytest.mark.parametrize("shift", [0, 1])
def test_decode_many_equal_pair_counts_with_different_lengths(shift):
    # every delta has three pairs (all one-byte lengths) but the runs differ
    encs = [b"\x01\x02ab\x03\x01c\x05\x04defg", b"\x00\x05hijkl\x02\x01m\x01\x02no",
            b"\x7f\x01p\x10\x03qrs\x02\x01t"]
    if shift:
        encs[2] = encs[2][:-3] + b"\x01\x02tu"
    buf = b"".join(encs)
    starts = np.cumsum([0] + [len(e) for e in encs[:-1]])
    pages = np.random.default_rng(1).integers(0, 256, size=(3, 256), dtype=np.uint8)
    want = pages.copy()
    for k, e in enumerate(encs):
        xbzrle.decode(e, want[2 - k])
    xbzrle.decode_many(buf, starts, [len(e) for e in encs], pages, rows=[2, 1, 0])
    assert np.array_equal(pages, want)


PAIR = b"\x02\x03abc"
BASE = 5000  # pretend the deltas start at this stream offset


@pytest.mark.parametrize("tail", [0, 100])   # numpy walk / Python walk
@pytest.mark.parametrize("bad,fault", [
    (b"\x85", 0), (PAIR + b"\x81", 5), (b"\x00\x81", 1), (PAIR + b"\x85\x01", 7),
    (PAIR + b"\x05", 5), (PAIR + b"\x01\x81\x80\x01", 7), (b"\x80\x80\x01\x01x", 1),
    (PAIR + b"\x00\x01x", 5), (b"\x00\x00", 1), (PAIR + b"\x01\x80\x00", 6),
    (b"\x81\x08\x01x", 0), (b"\x80\x08\x01x", 2), (b"\xfe\x07\x03abc", 2),
    (PAIR + b"\x01\x05ab", 6), (PAIR * 3 + b"\xf2\x07\x01x", 15), (PAIR * 3 + b"\xf1\x07\x01x", 17),
])
def test_decode_many_malformed(monkeypatch, tail, bad, fault):
    monkeypatch.setattr(xbzrle, "_TAIL", tail)
    encs = [PAIR, b"\x80\x00\x01z" + PAIR, bad, b"\xff\x07\x01y"]
    buf = b"".join(encs)
    starts = np.cumsum([0] + [len(e) for e in encs[:-1]])
    pages = np.random.default_rng(2).integers(0, 256, size=(4, 1024), dtype=np.uint8)
    before = pages.copy()
    for target in (pages, None):
        with pytest.raises(XBZRLEError) as e:
            xbzrle.decode_many(buf, starts, [len(x) for x in encs], target, page_size=1024,
                               offset=BASE)
        assert e.value.offset == BASE + starts[2] + fault
    assert np.array_equal(pages, before)


def test_decode_many_rejects_bad_arguments():
    with pytest.raises(UsageError):
        xbzrle.decode_many(b"\x00\x01A", [0], [3])
    with pytest.raises(UsageError):
        xbzrle.decode_many(b"\x00\x01A", [0], [3], np.zeros((2, 8), np.uint8)[:, ::2])
    with pytest.raises(UsageError):
        xbzrle.decode_many(b"\x00\x01A", [1], [3], page_size=8)


# ------------------------------------------------------- equal-length records

def _equal_length_stream(n=300, odd=(120,)):
    """One long run of XBZRLE records that all change one byte per 64, so
    their deltas have the same length (as QEMU's often do), except records
    in ``odd``, which change one more byte.  Returns (bytes, model, offsets of
    each record's header)."""
    rng = np.random.default_rng(7)
    first = rng.integers(0, 256, size=(NPAGES, P), dtype=np.uint8)
    model = Model()
    for i in range(NPAGES):
        model.page(i, first[i])
    ram = []
    for k in range(n):
        i = (k * 5) % NPAGES
        new = bytearray(model.mem[i])
        for j in range(0, P, 64):
            new[j] ^= 0x80 | (k & 0x7F)
        if k in odd:
            new[P - 2] ^= 0x01
        enc = xbzrle.encode(model.mem[i], bytes(new))
        model.xbzrle(i, enc)
        ram.append(XbzrlePage(BLOCK, i * P, False, enc))
    recs = [
        Header(), Configuration("pc-q35-10.0"),
        SectionHeader(SectionType.START, 0, "ram", 0, 4),
        RamMemSize(NPAGES * P, [RamBlockInfo(BLOCK, NPAGES * P)]), RamEos(), SectionFooter(0),
        SectionHeader(SectionType.PART, 0, "ram"),
        PageRun(RamFlag.PAGE, BLOCK, np.arange(NPAGES, dtype=np.uint64) * np.uint64(P), True,
                data=first),
        *ram, RamEos(), SectionFooter(0),
        SectionHeader(SectionType.END, 0, "ram"), RamEos(), SectionFooter(0), EndOfStream(),
    ]
    parts = [encode_record(r, P) for r in recs]
    at = len(b"".join(parts[:8]))
    heads = []
    for raw in parts[8:8 + n]:
        heads.append(at)
        at += len(raw)
    return b"".join(parts), model, heads


def test_equal_length_records():
    data, model, heads = _equal_length_stream()
    dec = Decoder(xbzrle_runs=True, page_size=P)
    dec.feed(data)
    dec.feed_eof()
    runs = [ev for ev in dec if isinstance(ev, XbzrleRun)]
    assert sum(r.count for r in runs) == 300
    assert b"".join(encode_record(r, P) for r in runs) == data[heads[0]:heads[-1] + 11 + 192]
    with qemuram.open(io.BytesIO(data), page_size=P, verify=True) as st:
        assert st.roundtrip
        assert st.ram[BLOCK].read(0, NPAGES * P) == b"".join(model.mem)


@pytest.mark.parametrize("k,field", [(200, "flag"), (200, "length"), (201, "misaligned"),
                                     (202, "range"), (203, "kind"), (121, "flag")])
def test_bad_framing_among_equal_length_records(k, field):
    data, _, heads = _equal_length_stream()
    d = bytearray(data)
    at = heads[k]
    h = int.from_bytes(d[at:at + 8], "big")
    if field == "flag":
        d[at + 8], where, cls = 7, at + 8, XBZRLEError
    elif field == "length":
        d[at + 9:at + 11] = (P + 1).to_bytes(2, "big")
        where, cls = at + 9, XBZRLEError
    elif field == "misaligned":
        d[at:at + 8] = (h + 0x400).to_bytes(8, "big")
        where, cls = at, qemuram.errors.PageOutOfRange
    elif field == "range":
        d[at:at + 8] = ((NPAGES * P) | (h & 0x3FF)).to_bytes(8, "big")
        where, cls = at, qemuram.errors.PageOutOfRange
    else:   # a PAGE record header: the rest no longer parses as records
        d[at:at + 8] = ((h & ~0x3FF) | 0x28).to_bytes(8, "big")
        where, cls = None, qemuram.errors.StreamError
    with pytest.raises(cls) as e:
        qemuram.open(io.BytesIO(bytes(d)), page_size=P)
    if where is not None:
        assert e.value.offset == where
    with pytest.raises(cls) as single:              # record by record
        decode_all(bytes(d), page_size=P)
    assert (type(single.value), single.value.offset) == (type(e.value), e.value.offset)


@pytest.mark.parametrize("chunk", [1, 7])
def test_runs_patched_in_chunks(monkeypatch, chunk):
    monkeypatch.setattr(qemuram.image, "_XBZRLE_PAGES", chunk)
    for data, model in (_stream()[:2], _equal_length_stream()[:2]):
        with qemuram.open(io.BytesIO(data), page_size=P) as st:
            assert st.ram[BLOCK].read(0, NPAGES * P) == b"".join(model.mem)
