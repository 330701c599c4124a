"""Lossless decode -> encode of every real QEMU 10 fixture, however it is fed,
and the decoded memory against the ground truth of fixtures.json."""
from __future__ import annotations

import hashlib
import io
import os
import tempfile

import pytest

import qemuram.stream
from qemuram.framing import encode_record
from qemuram.io import iter_records
from qemuram.records import MappedRamArea, PageRun

from conftest import (FIXTURES, Rec, decode_all, load_stream, normalized, over_fixtures,
                      record_info)

BIG = 4 << 20          # streams above this get small chunks only near record boundaries
WINDOW = 640           # bytes fed finely on each side of a record boundary of a big stream

_WHOLE: dict = {}


def whole(name):
    """(records, decoder) of the stream fed at once (cached per process)."""
    if name not in _WHOLE:
        recs, dec = decode_all(load_stream(name))
        _WHOLE[name] = (recs, dec)
    return _WHOLE[name]


def check_lossless(data: bytes, recs) -> None:
    pos = 0
    for r in recs:
        assert r.offset == pos, f"{r.kind} at {r.offset}, running position {pos}"
        assert data[pos:pos + len(r.data)] == r.data, f"{r.kind} at {pos} re-encodes differently"
        pos += len(r.data)
    assert pos == len(data)
    assert b"".join(r.data for r in recs) == data


def tail_start(recs) -> int:
    """Offset of the first FULL (device) section header: the end of the ram part."""
    for r in recs:
        if r.kind == "SectionHeader" and r.info[0] == "FULL":
            return r.offset
    raise AssertionError("no FULL section")


def boundary_windows(recs, width=WINDOW):
    return [(r.offset - width, r.offset + width) for r in recs]


# --------------------------------------------------------------- whole stream

@over_fixtures()
def test_stream_sha256_matches_fixtures_json(name, stream_bytes, fixtures_meta):
    data = stream_bytes(name)
    assert data is stream_bytes(name)                  # cached
    assert fixtures_meta[name] is FIXTURES[name]
    assert len(data) == FIXTURES[name]["stream_size"]
    assert hashlib.sha256(data).hexdigest() == FIXTURES[name]["stream_sha256"]


@over_fixtures()
def test_whole_stream_roundtrip(name):
    data = load_stream(name)
    recs, dec = whole(name)
    check_lossless(data, recs)
    assert dec.done
    assert dec.offset == len(data)
    assert dec.page_size == FIXTURES[name]["target_page_size"]
    assert dec.machine == FIXTURES[name]["machine_type"]
    assert dec.next_event() is None            # stays done
    kinds = [r.kind for r in recs]
    assert kinds[:2] == ["Header", "Configuration"]
    assert kinds[-2:] == ["EndOfStream", "VMDescription"]


# --------------------------------------------------------------- chunked feeding

def _fine_ranges(name, chunk):
    """Where to feed ``chunk``-byte pieces (None: everywhere).

    Byte at a time: the first 64 KiB and the device-state tail (plus record
    boundaries of big streams).  7 bytes: all of q35-plain; elsewhere the
    first 64 KiB, the tail and a window around every record boundary.
    """
    recs, _ = whole(name)
    n = len(load_stream(name))
    head_tail = [(0, 64 << 10), (tail_start(recs), n)]
    if chunk == 1:
        return head_tail + (boundary_windows(recs, 64) if n > BIG else [])
    if name == "q35-plain":
        return None
    return head_tail + boundary_windows(recs, 160 if n <= BIG else WINDOW)


@pytest.mark.parametrize("chunk", [4096, 7, 1], ids=["4096", "7", "1"])
@over_fixtures()
def test_chunked_roundtrip_same_records(name, chunk):
    data = load_stream(name)
    fine = None if chunk == 4096 else _fine_ranges(name, chunk)
    recs, dec = decode_all(data, chunk, fine=fine)
    check_lossless(data, recs)
    assert dec.done
    ref, ref_dec = whole(name)
    P = ref_dec.page_size
    assert normalized(recs, P) == normalized(ref, P)
    # Records other than page runs and mapped-ram areas keep their exact
    # (type name, offset) whatever the chunking.
    keep = lambda rs: [(r.kind, r.offset) for r in rs
                       if r.kind not in ("PageRun", "MappedRamArea")]
    assert keep(recs) == keep(ref)


def test_chunking_splits_runs_but_not_records():
    """Page runs are cut where the buffer ended (by design); each piece is a
    valid record and the pieces cover the same page records."""
    name = "q35-plain"
    data = load_stream(name)
    ref, _ = whole(name)
    small, _ = decode_all(data, 7, fine=[(0, 64 << 10)])
    assert len(small) > len(ref)
    assert sum(r.kind == "PageRun" for r in small) > sum(r.kind == "PageRun" for r in ref)


# --------------------------------------------------------------- iter_records / io

class Pipe(io.RawIOBase):
    """A non-seekable reader over bytes (short reads, like a pipe)."""

    def __init__(self, data: bytes, max_read: int = 65536):
        self._b = io.BytesIO(data)
        self._max = max_read

    def readable(self):
        return True

    def seekable(self):
        return False

    def seek(self, *a):
        raise io.UnsupportedOperation("seek")

    def tell(self):
        raise io.UnsupportedOperation("tell")

    def read(self, n=-1):
        if n is None or n < 0:
            n = self._max
        return self._b.read(min(n, self._max))

    def readinto(self, b):
        chunk = self.read(len(b))
        b[:len(chunk)] = chunk
        return len(chunk)


def _collect(it, page_size):
    out = []
    for rec in it:
        out.append(Rec(type(rec).__name__, rec.offset, encode_record(rec, page_size),
                       record_info(rec)))
    return out


@over_fixtures()
def test_iter_records_on_seekable_file(name, stream_path):
    data = load_stream(name)
    P = FIXTURES[name]["target_page_size"]
    ref, _ = whole(name)
    with open(stream_path(name), "rb") as f:
        recs = _collect(iter_records(f), P)
    check_lossless(data, recs)
    assert normalized(recs, P) == normalized(ref, P)
    # The vmdesc was read ahead: device sections were measured with it.
    with open(stream_path(name), "rb") as f:
        measured = {getattr(rec, "measured_by", None) for rec in iter_records(f)} - {None}
    assert measured == {"vmdesc"}


# Small reads of the big streams are covered by the chunked decoder tests.
_PIPE_CASES = [(n, c) for n in sorted(FIXTURES) for c in (1 << 23, 65536, 4099)
               if c != 4099 or FIXTURES[n]["stream_size"] <= BIG]


@pytest.mark.parametrize("name,chunk", _PIPE_CASES, ids=[f"{n}-{c}" for n, c in _PIPE_CASES])
def test_iter_records_on_pipe(name, chunk):
    data = load_stream(name)
    P = FIXTURES[name]["target_page_size"]
    ref, _ = whole(name)
    pipe = Pipe(data, max_read=chunk)
    assert not pipe.seekable()
    recs = _collect(iter_records(pipe, chunk=chunk), P)
    check_lossless(data, recs)
    assert normalized(recs, P) == normalized(ref, P)


# --------------------------------------------------------------- memory ground truth

def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@over_fixtures()
def test_open_memory_matches_ground_truth(name, stream_path):
    fx = FIXTURES[name]
    with qemuram.stream.open(stream_path(name)) as st:
        image_dir = st.image.directory
        assert os.path.isdir(image_dir)
        assert st.machine == fx["machine_type"]
        assert st.page_size == fx["target_page_size"]
        assert st.format == ("mapped-ram" if fx["capabilities"].get("mapped-ram") else "sequential")
        wanted_caps = {c for c, on in fx["capabilities"].items()
                       if on and c in ("mapped-ram", "x-ignore-shared")}
        assert set(st.capabilities) == wanted_caps
        assert [(n, b.size) for n, b in st.ram.items()] == \
            [(rb["name"], rb["used_length"]) for rb in fx["ramblocks"]]
        for rb in fx["ramblocks"]:
            blk = st.ram[rb["name"]]
            assert blk.page_size == rb["page_size"], rb["name"]
            assert blk.array().shape == (rb["used_length"],)
        checked = 0
        for r in fx["planted"] + fx["ram_regions"]:
            if not r["pages_in_stream"]:
                continue
            got = _sha(st.ram[r["block"]].read(r["block_offset"], r["length"]))
            assert got == r["sha256"], (r.get("name"), r["block"], hex(r["block_offset"]))
            if "pmemsave_sha256" in r:
                assert got == r["pmemsave_sha256"]
            checked += 1
        assert checked >= 4
        # No RAM record in the template, and the non-RAM records re-encode.
        assert not any(isinstance(t, (PageRun, MappedRamArea)) for t in st.template)
    assert not os.path.exists(image_dir)


def test_postcopy_host_page_size():
    name = "q35-postcopy-advised"
    data = load_stream(name)
    with qemuram.stream.open(io.BytesIO(data)) as st:
        assert st.ram["pc.ram"].host_page_size == 0x200000
        assert st.ram["pc.ram"].page_size == 0x200000
        assert st.ram["pc.ram"].target_page_size == 4096
        for n, b in st.ram.items():
            if n != "pc.ram":
                assert b.host_page_size is None
        assert st.postcopy_advise is not None
        assert st.postcopy_advise[1] == 4096


def test_ignore_shared_file_dimm_has_no_pages(stream_path):
    name = "q35-ignore-shared"
    fx = FIXTURES[name]
    recs, _ = whole(name)
    blocks_with_pages = {r.info[1] for r in recs if r.kind == "PageRun"}
    assert "dimm0-mem" not in blocks_with_pages
    assert "dimm1-mem" in blocks_with_pages
    with qemuram.stream.open(stream_path(name)) as st:
        d0, d1 = st.ram["dimm0-mem"], st.ram["dimm1-mem"]
        assert d0.size == d1.size == 32 << 20
        assert not d0.array().any()                    # reads as zero
        assert not d0.sent.any()
        assert all(v == 0 for v in d0.counts.values())
        assert d1.sent.any()
        assert d0.addr is not None and d1.addr is not None and d0.addr != d1.addr
        for r in fx["planted"] + fx["ram_regions"]:
            if r["block"] == "dimm1-mem":
                assert r["pages_in_stream"]
                assert _sha(d1.read(r["block_offset"], r["length"])) == r["sha256"]
            if r["block"] == "dimm0-mem":
                assert not r["pages_in_stream"]
                assert d0.read(r["block_offset"], r["length"]) == bytes(r["length"])


def test_open_cleans_up_its_image_dir(stream_path, monkeypatch):
    made = []
    real = tempfile.mkdtemp

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    st = qemuram.stream.open(stream_path("q35-plain"))
    d = st.image.directory
    assert made == [d] and os.path.isdir(d)
    assert os.path.basename(d).startswith("qemuram-")
    st.close()
    assert not os.path.exists(d)
