"""Shared helpers for the stream tests: real QEMU 10 fixtures and chunked decoding.

* ``FIXTURES`` is tests/data/fixtures.json's ``fixtures`` mapping (ground truth).
* ``over_fixtures()`` parametrizes a test over fixture names (all, or a filter).
* ``stream_bytes`` (session fixture) gives ``load(name) -> bytes`` of the
  decompressed stream, cached; ``stream_path`` gives ``path(name)`` of a
  decompressed copy on disk (for seekable-file paths).
* ``decode_all(data, chunk)`` feeds a ``Decoder`` and encodes every record as
  soon as it is returned (records hold views into the decoder's buffer).
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Any, Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pytest

from qemuram.framing import NEED_DATA, Decoder, encode_record
from qemuram.records import MappedRamArea, PageRun, SectionHeader

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FIXTURES_META = json.load(open(os.path.join(DATA, "fixtures.json")))
FIXTURES = FIXTURES_META["fixtures"]
FIXTURE_NAMES = sorted(FIXTURES)


def is_mapped(name: str) -> bool:
    return bool(FIXTURES[name]["capabilities"].get("mapped-ram"))


SEQUENTIAL = [n for n in FIXTURE_NAMES if not is_mapped(n)]
MAPPED = [n for n in FIXTURE_NAMES if is_mapped(n)]
SMALL = [n for n in FIXTURE_NAMES if FIXTURES[n]["stream_size"] < (4 << 20)]


def over_fixtures(names: Optional[Iterable[str]] = None, argname: str = "name"):
    """``@over_fixtures()`` runs a test once per fixture name (ids = names)."""
    names = list(FIXTURE_NAMES if names is None else names)
    return pytest.mark.parametrize(argname, names, ids=names)


# ------------------------------------------------------------- fixture data

_CACHE: dict = {}


def load_stream(name: str) -> bytes:
    """Decompressed bytes of a fixture stream (cached per process)."""
    data = _CACHE.get(name)
    if data is None:
        with gzip.open(os.path.join(DATA, FIXTURES[name]["file"])) as f:
            data = f.read()
        _CACHE[name] = data
    return data


@pytest.fixture(scope="session")
def fixtures_meta() -> dict:
    return FIXTURES


@pytest.fixture(scope="session")
def stream_bytes() -> Callable[[str], bytes]:
    """``load(name)``: the decompressed stream of a fixture (cached)."""
    return load_stream


@pytest.fixture(scope="session")
def stream_path(tmp_path_factory) -> Callable[[str], str]:
    """``path(name)``: a decompressed copy of the fixture stream on disk."""
    root = tmp_path_factory.mktemp("streams")
    made: dict = {}

    def path(name: str) -> str:
        p = made.get(name)
        if p is None:
            p = str(root / (name + ".mig"))
            with open(p, "wb") as f:
                f.write(load_stream(name))
            made[name] = p
        return p

    return path


# ------------------------------------------------------------- decoding

class Rec(NamedTuple):
    """One decoded record, summarised right after decoding."""
    kind: str            # record class name
    offset: int          # the record's .offset
    data: bytes          # encode_record(record)
    info: Any            # extra details for normalisation (see below)


def record_info(rec) -> Any:
    if isinstance(rec, PageRun):
        return (int(rec.kind), rec.block, bool(rec.named),
                np.asarray(rec.page_offsets, dtype=np.uint64).copy())
    if isinstance(rec, MappedRamArea):
        return rec.block
    if isinstance(rec, SectionHeader):
        return (rec.kind.name, rec.idstr)
    return None


def _chunks(data, chunk: int, fine: Optional[Sequence[Tuple[int, int]]], coarse: int):
    """Yield (start, end) pieces: ``chunk`` bytes inside the ``fine`` ranges
    (all of the input when ``fine`` is None), ``coarse`` bytes elsewhere."""
    n = len(data)
    if fine is None:
        for lo in range(0, n, chunk):
            yield lo, min(n, lo + chunk)
        return
    ranges = sorted((max(0, a), min(n, b)) for a, b in fine if b > a)
    pos = 0
    for a, b in ranges + [(n, n)]:
        while pos < a:
            end = min(a, pos + coarse)
            yield pos, end
            pos = end
        pos = max(pos, a)
        while pos < b:
            end = min(b, pos + chunk)
            yield pos, end
            pos = end


def decode_all(data, chunk: Optional[int] = None, *, fine=None, coarse: int = 1 << 20,
               decoder: Optional[Decoder] = None, **options) -> Tuple[List[Rec], Decoder]:
    """Feed ``data`` to a Decoder in pieces of ``chunk`` bytes (None: all at
    once), then EOF; return ([Rec per record], decoder).

    ``fine`` restricts the small chunks to a list of (start, end) ranges; the
    rest is fed ``coarse`` bytes at a time (keeps byte-at-a-time runs short on
    big streams).  Each record is encoded before the next one is asked for.
    """
    dec = decoder if decoder is not None else Decoder(**options)
    if chunk is None:
        chunk = max(1, len(data))
    pieces = _chunks(data, chunk, fine, coarse)
    out: List[Rec] = []
    while True:
        ev = dec.next_event()
        if ev is None:
            return out, dec
        if ev is NEED_DATA:
            piece = next(pieces, None)
            if piece is None:
                dec.feed_eof()
            else:
                dec.feed(data[piece[0]:piece[1]])
            continue
        out.append(Rec(type(ev).__name__, ev.offset, encode_record(ev, dec.page_size),
                       record_info(ev)))


def decode_records(data, **options) -> list:
    """All records of a whole stream fed at once, with their encodings:
    [(record, bytes)].  The stream is fed in one piece, so the decoder never
    replaces its buffer and the records' numpy views stay valid."""
    dec = Decoder(**options)
    dec.feed(data)
    dec.feed_eof()
    out = []
    while True:
        ev = dec.next_event()
        if ev is None:
            return out
        assert ev is not NEED_DATA
        out.append((ev, encode_record(ev, dec.page_size)))


def normalized(recs: List[Rec], page_size: int) -> list:
    """The record sequence independent of how the input was chunked.

    Runs of CONTINUE page records and mapped-ram areas are cut wherever the
    buffer ended, so they are expanded to one entry per page record
    (kind, stream offset, block, page offset) and contiguous areas of a block
    are merged; every other record is (class name, offset).
    """
    out: list = []
    for r in recs:
        if r.kind == "PageRun":
            kind, block, named, offs = r.info
            body = 1 if kind == 0x02 else page_size
            pos = r.offset
            for i, po in enumerate(offs.tolist()):
                out.append(("page", kind, pos, block, po))
                pos += 8 + body + ((1 + len(block.encode())) if (named and i == 0) else 0)
            assert pos == r.offset + len(r.data)
        elif r.kind == "MappedRamArea":
            prev = out[-1] if out else None
            if (prev is not None and prev[0] == "MappedRamArea" and prev[2] == r.info
                    and prev[1] + prev[3] == r.offset):
                out[-1] = ("MappedRamArea", prev[1], prev[2], prev[3] + len(r.data))
            else:
                out.append(("MappedRamArea", r.offset, r.info, len(r.data)))
        else:
            out.append((r.kind, r.offset))
    return out
