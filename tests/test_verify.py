"""``qemuram.stream.verify``: the fast lossless check agrees with the full one."""
import gzip
import io
import json
import os

import numpy as np
import pytest

import qemuram
from qemuram.framing import Decoder
from qemuram.ram import encode_page_run, page_run_matches
from qemuram.records import PageRun
from qemuram.stream import verify
from qemuram.wire import RamFlag

DATA = os.path.join(os.path.dirname(__file__), "data")
FIXTURES = json.load(open(os.path.join(DATA, "fixtures.json")))["fixtures"]


def _raw(name):
    return gzip.open(os.path.join(DATA, FIXTURES[name]["file"])).read()


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_verify_agrees_with_open(name):
    raw = _raw(name)
    v = verify(io.BytesIO(raw))
    assert v.roundtrip is True and v.size == len(raw)
    with qemuram.open(io.BytesIO(raw), verify=True) as st:
        assert st.roundtrip is True
        assert v.counts() == st.counts()
        assert [b.size for b in v.ram.values()] == [b.size for b in st.ram.values()]


def _runs(raw):
    dec = Decoder()
    dec.feed(raw)
    dec.feed_eof()
    for rec in dec:
        if isinstance(rec, PageRun) and rec.count > 2:
            yield dec, rec


def test_header_check_matches_encoding_and_catches_changes():
    raw = _raw("q35-plain")
    checked = 0
    for dec, run in _runs(raw):
        P = dec.page_size
        start = run.offset - dec._base
        enc = encode_page_run(run, P)
        assert page_run_matches(run, dec._buf, start, P) == len(enc)
        # a different page offset in one record header is noticed
        offs = run.page_offsets.copy()
        offs[-1] += np.uint64(P)
        other = PageRun(run.kind, run.block, offs, run.named, run.data)
        assert page_run_matches(other, dec._buf, start, P) is None
        if run.kind == RamFlag.PAGE:
            # payload that is not the input's own bytes is compared by value
            data = np.array(run.data)
            assert page_run_matches(PageRun(run.kind, run.block, run.page_offsets, run.named,
                                            data), dec._buf, start, P) == len(enc)
            data[-1, 0] ^= 1
            assert page_run_matches(PageRun(run.kind, run.block, run.page_offsets, run.named,
                                            data), dec._buf, start, P) is None
        checked += 1
    assert checked > 2


def test_verify_reports_a_stream_error():
    raw = bytearray(_raw("q35-plain"))
    raw[4:8] = (2).to_bytes(4, "big")
    with pytest.raises(qemuram.UnsupportedVersion):
        verify(io.BytesIO(bytes(raw)))
