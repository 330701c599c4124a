"""Streams from QEMU before 9.1: COMPRESS_PAGE records (real QEMU 7.2 output)."""
import gzip
import hashlib
import io
import json
import os

import pytest

import qemuram
from qemuram.records import CompressedPage

HERE = os.path.join(os.path.dirname(__file__), "data", "legacy")
META = json.load(open(os.path.join(HERE, "compress.json")))


@pytest.fixture(scope="module")
def raw():
    return gzip.open(os.path.join(HERE, "q35-7.2-compress.mig.gz")).read()


def test_stream_is_the_recorded_one(raw):
    assert hashlib.sha256(raw).hexdigest() == META["stream_sha256"]


def test_compressed_pages_decode_to_the_planted_memory(raw):
    with qemuram.open(io.BytesIO(raw), verify=True) as st:
        assert st.roundtrip
        assert st.machine == "pc-q35-7.2"
        assert st.ram["pc.ram"].counts["compressed"] > 0
        for p in META["planted"]:
            got = st.ram[p["block"]].read(p["block_offset"], p["length"])
            assert hashlib.sha256(got).hexdigest() == p["sha256"]


def test_compressed_records_reencode_exactly(raw):
    dec = qemuram.Decoder()
    dec.feed(raw)
    dec.feed_eof()
    seen = 0
    for rec in dec:
        if isinstance(rec, CompressedPage):
            seen += 1
            enc = qemuram.encode_record(rec, dec.page_size)
            assert raw[rec.offset:rec.offset + len(enc)] == enc
    assert seen > 0


def test_corrupt_compressed_page_is_a_stream_error(raw):
    dec = qemuram.Decoder()
    dec.feed(raw)
    dec.feed_eof()
    first = next(r for r in dec if isinstance(r, CompressedPage))
    # Damage the zlib data of the first compressed page (after its header,
    # name and be32 length).
    start = first.offset + 8 + (1 + len(first.block) if first.named else 0) + 4
    bad = bytearray(raw)
    for i in range(start, start + 16):
        bad[i] ^= 0xFF
    with pytest.raises(qemuram.StreamError) as exc:
        qemuram.open(io.BytesIO(bytes(bad)))
    assert exc.value.offset == first.offset
