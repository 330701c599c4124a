"""XBZRLE codec against slow byte-by-byte models of QEMU's two encoders.

The models below are written from the wire format (zero-run length, non-zero-run
length, changed bytes) and QEMU's documented limits, one byte at a time, so they
share nothing with the vectorised code they check.  The second model follows
QEMU's AVX512BW encoder: the same pairs, but room checks placed by its walk
over 64-byte blocks.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qemuram import xbzrle
from qemuram.errors import UsageError, XBZRLEError
from qemuram.xbzrle import decode, encode, uleb128_decode, uleb128_encode

PAGE_SIZES = [1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 16]
BASE = 5000  # pretend the encoded data starts at this stream offset

SETTINGS = settings(deadline=None, max_examples=60,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# ---------------------------------------------------------------- reference model

def ref_uleb(n):
    assert 0 <= n < 1 << 14
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def ref_encode(old, new):
    """QEMU semantics: maximal runs, no trailing zero run, 2 bytes of room
    demanded before every new pair, output capped at the page size, runs over
    14 bits unencodable."""
    size = len(old)
    out = bytearray()
    i = 0
    while i < size:
        if len(out) + 2 > size:
            return None
        zero_start = i
        while i < size and old[i] == new[i]:
            i += 1
        if i == size:
            break
        if i - zero_start >= 1 << 14:
            return None
        out += ref_uleb(i - zero_start)
        run_start = i
        while i < size and old[i] != new[i]:
            i += 1
        if i - run_start >= 1 << 14:
            return None
        out += ref_uleb(i - run_start)
        for k in range(run_start, i):
            out.append(new[k])
        if len(out) > size:
            return None
    return bytes(out)


BLOCK = 64


def ref_encode_avx512(old, new):
    """QEMU's AVX512BW encoder, one byte at a time.

    It scans 64-byte blocks (the last one short when the page size is not a
    multiple of 64).  Room for 2 more bytes is demanded when a block starts
    and right after a changed run that ends inside a block; a changed run is
    only written once its first unchanged byte is seen (or the page ends),
    so one ending on a block edge is written after that block's check.
    Every changed run must fit the page, and lengths over 14 bits are
    unencodable (QEMU asserts).
    """
    size = len(old)
    out = bytearray()
    same_count = 0        # unchanged bytes not yet written
    run_start = None      # start of the changed run being scanned

    def put_len(n):
        if n >= 1 << 14:
            return False
        out.extend(ref_uleb(n))
        return True

    def end_run(stop):
        if not put_len(stop - run_start):
            return False
        if len(out) + (stop - run_start) > size:
            return False
        out.extend(new[run_start:stop])
        return True

    for block in range(0, size, BLOCK):
        if len(out) + 2 > size:
            return None
        for i in range(block, min(block + BLOCK, size)):
            if old[i] == new[i]:
                if run_start is not None:
                    if not end_run(i):
                        return None
                    run_start = None
                    if i != block and len(out) + 2 > size:
                        return None
                same_count += 1
            elif run_start is None:
                if not put_len(same_count):
                    return None
                same_count = 0
                run_start = i
    if run_start is not None and not end_run(size):
        return None
    return bytes(out)


class RefReject(Exception):
    pass


def ref_read_len(data, pos):
    if pos >= len(data):
        raise RefReject
    value = data[pos] & 0x7F
    if data[pos] < 0x80:
        return value, pos + 1
    if pos + 1 >= len(data) or data[pos + 1] >= 0x80:
        raise RefReject
    return value + (data[pos + 1] << 7), pos + 2


def ref_decode(data, page):
    """Returns the patched page, or raises RefReject where QEMU returns -1."""
    page = bytearray(page)
    pos = 0
    at = 0
    first = True
    while pos < len(data):
        if len(data) - pos < 2:
            raise RefReject
        zeros, pos = ref_read_len(data, pos)
        if zeros == 0 and not first:
            raise RefReject
        first = False
        at += zeros
        if at > len(page) or len(data) - pos < 2:
            raise RefReject
        count, pos = ref_read_len(data, pos)
        if count == 0 or at + count > len(page) or pos + count > len(data):
            raise RefReject
        for _ in range(count):
            page[at] = data[pos]
            at += 1
            pos += 1
    return bytes(page)


# ---------------------------------------------------------------- strategies

def _bump(rnd, byte):
    return (byte + rnd.randrange(1, 256)) & 0xFF


@st.composite
def page_pairs(draw, sizes=PAGE_SIZES):
    size = draw(st.sampled_from(sizes))
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        old = bytearray(rnd.randbytes(size))
    else:
        old = bytearray(size)
    new = bytearray(old)
    kind = draw(st.sampled_from(["spans", "spans", "spans", "random", "stride",
                                 "near-full"]))
    if kind == "spans":
        length = (st.integers(1, 40)
                  | st.sampled_from([7, 8, 9, 127, 128, 129, 16383, 16384, 16385])
                  | st.integers(1, size))
        spans = draw(st.lists(st.tuples(st.integers(0, size - 1), length),
                              max_size=25))
        for start, n in spans:
            for k in range(start, min(size, start + n)):
                new[k] = _bump(rnd, old[k])
    elif kind == "random":
        new = bytearray(rnd.randbytes(size))
    elif kind == "stride":
        step = draw(st.integers(2, 9))
        for k in range(draw(st.integers(0, step - 1)), size, step):
            new[k] = _bump(rnd, old[k])
    else:  # one run whose encoding lands around the page size
        n = size - draw(st.integers(0, 12))
        start = draw(st.integers(0, size - n))
        for k in range(start, start + n):
            new[k] = _bump(rnd, old[k])
    return bytes(old), bytes(new)


def gapped_runs(lengths, start=0, gap=1):
    """(start, stop) of runs with the given lengths, ``gap`` bytes apart."""
    spans = []
    for n in lengths:
        spans.append((start, start + n))
        start += n + gap
    return spans


@st.composite
def near_limit_pairs(draw, sizes=PAGE_SIZES):
    """Changed runs one unchanged byte apart from byte 0 up to an end near the
    start of the last 64-byte block, so that the delta is a few bytes from
    the page size: where the encoders' room checks decide."""
    size = draw(st.sampled_from(sizes))
    last_block = (size - 1) // BLOCK * BLOCK
    end = draw(st.sampled_from([last_block, last_block, last_block - 1, last_block + 1,
                                last_block - BLOCK, size, size - 1]))
    end = max(1, min(size, end))
    target = size + draw(st.integers(-3, 2))
    # With one-byte gaps and a leading zero run of 0 the delta is
    # 1 + end + (1 per run shorter than 128, 2 per longer run).
    budget = target - end - 1
    options = []
    for long in range(max(0, budget) // 2 + 1):
        short = budget - 2 * long
        count = short + long
        content = end - (count - 1)
        if count and short + 128 * long <= content <= 127 * short + 16383 * long:
            options.append((short, long))
    if options:
        short, long = draw(st.sampled_from(options[:4]))
        content = end - (short + long - 1)
        lengths = [1] * short + [128] * long
        caps = [127] * short + [16383] * long
        rest = content - sum(lengths)
        for k in range(len(lengths)):
            add = min(rest, caps[k] - lengths[k])
            lengths[k] += add
            rest -= add
        lengths = draw(st.permutations(lengths))
    else:  # no such layout for this size: one run up to the end
        lengths = [end]
    seed = draw(st.integers(0, 2**32 - 1))
    rnd = random.Random(seed)
    old = rnd.randbytes(size) if seed & 1 else bytes(size)
    new = bytearray(old)
    for a, b in gapped_runs(lengths):
        for k in range(a, b):
            new[k] = _bump(rnd, old[k])
    return old, bytes(new)


@st.composite
def block_edge_pairs(draw, sizes=PAGE_SIZES):
    """Runs that start or stop within a few bytes of 64-byte block edges."""
    size = draw(st.sampled_from(sizes))
    blocks = (size + BLOCK - 1) // BLOCK
    edge = st.builds(lambda b, d: max(0, min(size, b * BLOCK + d)),
                     st.integers(0, blocks), st.integers(-2, 2))
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    old = bytes(size) if draw(st.booleans()) else rnd.randbytes(size)
    new = bytearray(old)
    for a, b in draw(st.lists(st.tuples(edge, edge), min_size=1, max_size=40)):
        for k in range(min(a, b), max(a, b, min(a, b) + 1)):
            if k < size:
                new[k] = _bump(rnd, old[k])
    return old, bytes(new)


def odd_size_pairs():
    """Page sizes that leave a short last block."""
    return (st.integers(1, 700) | st.sampled_from([1000, 4095, 4100, 65535])).flatmap(
        lambda n: page_pairs(sizes=[n]) | near_limit_pairs(sizes=[n])
        | block_edge_pairs(sizes=[n]))


def avx512_pairs(sizes=PAGE_SIZES):
    return (page_pairs(sizes) | near_limit_pairs(sizes) | near_limit_pairs(sizes)
            | block_edge_pairs(sizes))


# ---------------------------------------------------------------- properties

@SETTINGS
@given(page_pairs())
def test_encode_matches_reference(pair):
    old, new = pair
    got = encode(old, new)
    assert got == ref_encode(old, new)
    if old == new:
        assert got == b""


@pytest.mark.parametrize("size", PAGE_SIZES)
@settings(deadline=None, max_examples=15,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_encode_every_page_size(size, data):
    old, new = data.draw(page_pairs(sizes=[size]))
    assert encode(old, new) == ref_encode(old, new)


@SETTINGS
@given(page_pairs())
def test_roundtrip(pair):
    old, new = pair
    enc = encode(old, new)
    if enc is None:
        return
    assert len(enc) <= len(old)
    page = bytearray(old)
    decode(enc, page, offset=BASE)
    assert page == new
    assert ref_decode(enc, old) == new


@SETTINGS
@given(page_pairs(sizes=[1 << 10, 1 << 12]))
def test_loop_and_vector_paths_agree(pair):
    """The codec switches between a loop and numpy by run count; force each."""
    old, new = pair
    expected = ref_encode(old, new)
    saved = xbzrle._FEW_RUNS
    try:
        for few in (0, 1 << 20):
            xbzrle._FEW_RUNS = few
            enc = encode(old, new)
            assert enc == expected
            if enc:
                page = bytearray(old)
                decode(enc, page)
                assert page == new
    finally:
        xbzrle._FEW_RUNS = saved


def test_roundtrip_page_types():
    rnd = random.Random(7)
    old = rnd.randbytes(4096)
    new = bytearray(old)
    new[10:20] = bytes(10)
    new[4000] ^= 0xFF
    enc = encode(np.frombuffer(old, dtype=np.uint8), memoryview(bytes(new)))
    assert enc == ref_encode(old, new)
    for page in (bytearray(old), np.frombuffer(old, dtype=np.uint8).copy()):
        decode(enc, page)
        assert bytes(page) == bytes(new)
    buf = bytearray(old)
    decode(enc, memoryview(buf))
    assert buf == new


# ---------------------------------------------------------------- AVX512 variant

AVX = dict(variant="avx512")


@SETTINGS
@given(avx512_pairs())
def test_avx512_matches_reference(pair):
    old, new = pair
    got = encode(old, new, **AVX)
    assert got == ref_encode_avx512(old, new)
    if old == new:
        assert got == b""


@settings(deadline=None, max_examples=80,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(odd_size_pairs())
def test_avx512_short_last_block(pair):
    old, new = pair
    assert encode(old, new, **AVX) == ref_encode_avx512(old, new)


@pytest.mark.parametrize("size", PAGE_SIZES)
@settings(deadline=None, max_examples=10,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_avx512_every_page_size(size, data):
    old, new = data.draw(avx512_pairs(sizes=[size]))
    assert encode(old, new, **AVX) == ref_encode_avx512(old, new)


def last_change_end(old, new):
    return max((k + 1 for k in range(len(old)) if old[k] != new[k]), default=0)


@SETTINGS
@given(avx512_pairs(sizes=[1 << 10, 1 << 12, 1 << 13]) | odd_size_pairs())
def test_avx512_differs_from_generic_only_before_last_block(pair):
    """The models agree except where the AVX512 encoder skips the room check:
    the changes end where the last block starts and the delta is 1 or 0
    bytes short of the page size."""
    old, new = pair
    generic, avx = ref_encode(old, new), ref_encode_avx512(old, new)
    assert encode(old, new) == generic
    if generic != avx:
        size = len(old)
        assert generic is None
        assert len(avx) in (size - 1, size)
        assert last_change_end(old, new) == (size - 1) // BLOCK * BLOCK


@SETTINGS
@given(avx512_pairs() | odd_size_pairs())
def test_avx512_roundtrip(pair):
    old, new = pair
    enc = encode(old, new, **AVX)
    if enc is None:
        return
    assert len(enc) <= len(old)
    page = bytearray(old)
    decode(enc, page, offset=BASE)
    assert page == new
    assert ref_decode(enc, old) == new


@SETTINGS
@given(avx512_pairs(sizes=[1 << 10, 1 << 12, 1 << 16]))
def test_avx512_loop_and_vector_paths_agree(pair):
    old, new = pair
    expected = ref_encode_avx512(old, new)
    saved = xbzrle._FEW_RUNS
    try:
        for few in (0, 1 << 20):
            xbzrle._FEW_RUNS = few
            assert encode(old, new, **AVX) == expected
    finally:
        xbzrle._FEW_RUNS = saved


def runs_page(lengths, size=4096):
    """Zero page, the same page with runs of 0x5A of the given lengths one
    unchanged byte apart from byte 0, and the delta both encoders build."""
    old, new = changed(size, *gapped_runs(lengths))
    expected = b"".join(ref_uleb(1 if k else 0) + ref_uleb(n) + b"\x5a" * n
                        for k, n in enumerate(lengths))
    return old, new, expected


def edge_page(count, cover, size=4096):
    """``count`` runs covering bytes 0..cover-1, lengths as even as possible."""
    base, extra = divmod(cover - (count - 1), count)
    lengths = [base + (k < extra) for k in range(count)]
    assert sum(lengths) + count - 1 == cover
    return runs_page(lengths, size)


@pytest.mark.parametrize("count,length,lengths", [
    (62, 4095, [65] * 3 + [64] * 59),
    (63, 4096, [64] + [63] * 62),
])
def test_avx512_qemu_records_at_the_limit(count, length, lengths):
    """Seen from QEMU 10 on an AVX512BW host: changed runs one unchanged byte
    apart covering bytes 0..4031, last 64 bytes unchanged.  QEMU sent these
    4095- and 4096-byte deltas; the generic encoder would not."""
    old, new, expected = edge_page(count, 4032)
    assert (old, new, expected) == runs_page(lengths)
    got = encode(old, new, **AVX)
    assert len(got) == length and got == expected
    assert encode(old, new) is None
    page = bytearray(old)
    decode(got, page)
    assert page == new


@pytest.mark.parametrize("count,cover,length", [
    (61, 4032, 4094),    # page size - 2 fits for both encoders
    (126, 3968, None),   # the block before the last is unchanged too
    (90, 4004, None),    # the changes end inside the last block
    (64, 4031, None),    # one byte short of the last block
    (62, 4033, None),    # one byte into it
])
def test_avx512_overflow_boundary(count, cover, length):
    old, new, expected = edge_page(count, cover)
    got = encode(old, new, **AVX)
    if length is None:
        assert got is None
    else:
        assert got == expected and len(got) == length
    assert got == encode(old, new) == ref_encode_avx512(old, new)


@pytest.mark.parametrize("size", [1024, 1000, 2048])
def test_avx512_limit_at_last_block_of_other_sizes(size):
    last_block = (size - 1) // BLOCK * BLOCK    # 960 for a 1000-byte page too
    for extra in (0, 1, 2):     # deltas of size - 1, size, size + 1
        count = size - last_block - 2 + extra
        old, new, expected = edge_page(count, last_block, size)
        assert len(expected) == size - 1 + extra
        got = encode(old, new, **AVX)
        assert got == ref_encode_avx512(old, new)
        assert got == (expected if extra < 2 else None)
        assert encode(old, new) is None
        # the same delta size, ending a byte earlier or later: checked again
        for cover in (last_block - 1, last_block + 1):
            old, new, expected = edge_page(count + last_block - cover, cover, size)
            assert len(expected) == size - 1 + extra
            assert encode(old, new, **AVX) is None


@pytest.mark.parametrize("longs,short,length", [(31, 0, 65535), (31, 1, 65536),
                                                (32, 0, 65537)])
def test_avx512_limit_with_64k_pages(longs, short, length):
    """Two-byte run lengths; a 65536-byte delta is accepted (and does not fit
    a be16 record length)."""
    size = 1 << 16
    end = size - BLOCK
    content = end - (longs + short - 1)
    lengths = [100] * short
    base, extra = divmod(content - sum(lengths), longs)
    lengths += [base + (k < extra) for k in range(longs)]
    old, new, expected = runs_page(lengths, size)
    assert len(expected) == length
    got = encode(old, new, **AVX)
    assert got == ref_encode_avx512(old, new)
    assert got == (expected if length <= size else None)
    assert encode(old, new) is None


def test_avx512_short_buffers():
    assert encode(b"", b"", **AVX) == b""
    assert encode(b"\x00", b"\x00", **AVX) is None
    assert encode(b"\x00", b"\x01", **AVX) is None
    assert encode(bytes(8), b"\x01" + bytes(7), **AVX) == b"\x00\x01\x01"
    assert encode(bytes(65), bytes(64) + b"\x01", **AVX) == b"\x40\x01\x01"


def test_avx512_runs_over_14_bits_are_unencodable():
    size = 1 << 16
    assert encode(*changed(size, (16384, 16385)), **AVX) is None
    assert encode(*changed(size, (0, 16384)), **AVX) is None
    assert encode(*changed(size, (0, 1)), **AVX) == b"\x00\x01\x5a"
    assert encode(*changed(1 << 14, (0, 1 << 14)), **AVX) is None


def test_unknown_variant():
    with pytest.raises(UsageError):
        encode(bytes(8), bytes(8), variant="sse")


@pytest.mark.parametrize("flags,mask,expected", [
    ({"xsave", "avx", "avx512f", "avx512bw"}, 0x2E7, "avx512"),
    ({"xsave", "avx", "avx512f", "avx512bw"}, None, "avx512"),   # kernel too old to say
    ({"xsave", "avx", "avx512f", "avx512bw"}, 0x7, "generic"),   # OS keeps no ZMM state
    ({"xsave", "avx", "avx512f", "avx512bw"}, 0xE3, "generic"),  # nor the AVX state
    ({"xsave", "avx", "avx512f"}, 0x2E7, "generic"),
    ({"xsave", "avx512bw"}, 0x2E7, "generic"),
    ({"avx", "avx512bw"}, 0x2E7, "generic"),
    (set(), None, "generic"),
])
def test_host_variant_rules(monkeypatch, flags, mask, expected):
    monkeypatch.setattr(xbzrle, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(xbzrle, "_os_xstate_mask", lambda: mask)
    xbzrle.host_variant.cache_clear()
    try:
        assert xbzrle.host_variant() == expected
    finally:
        xbzrle.host_variant.cache_clear()


def test_host_variant_here():
    variant = xbzrle.host_variant()
    assert variant in xbzrle.VARIANTS
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    if variant == "avx512":
        assert " avx512bw" in text


# ---------------------------------------------------------------- encoder edge cases

def changed(size, *ranges, base=None):
    old = bytes(size) if base is None else base
    new = bytearray(old)
    for start, stop in ranges:
        for k in range(start, stop):
            new[k] = old[k] ^ 0x5A
    return old, bytes(new)


def test_equal_pages_give_empty():
    for size in PAGE_SIZES:
        page = random.Random(size).randbytes(size)
        assert encode(page, page) == b""


def test_first_byte():
    old, new = changed(4096, (0, 1))
    assert encode(old, new) == b"\x00\x01\x5a"


def test_last_byte():
    old, new = changed(4096, (4095, 4096))
    assert encode(old, new) == b"\xff\x1f\x01\x5a"


@pytest.mark.parametrize("ranges", [
    [(7, 8)], [(8, 9)], [(7, 9)], [(8, 16)], [(7, 17)], [(8, 24)], [(15, 16), (16, 17)],
    [(0, 8), (16, 24)], [(0, 7), (9, 16)], [(1, 8), (8, 15), (17, 31)], [(4088, 4096)],
    [(4089, 4095)], [(3, 5), (6, 7), (8, 9), (10, 18)],
])
def test_word_boundaries(ranges):
    old, new = changed(4096, *ranges)
    enc = encode(old, new)
    assert enc == ref_encode(old, new)
    page = bytearray(old)
    decode(enc, page)
    assert page == new


def test_word_boundary_exact_layout():
    old, new = changed(4096, (8, 16), (17, 18))
    assert encode(old, new) == b"\x08\x08" + b"\x5a" * 8 + b"\x01\x01\x5a"


def test_every_other_byte_overflows():
    for size in PAGE_SIZES:
        old = bytes(size)
        new = bytes([1, 0]) * (size // 2)
        assert encode(old, new) is None


def test_single_long_run():
    old, new = changed(4096, (100, 4000))
    enc = encode(old, new)
    assert enc == b"\x64" + bytes([(3900 & 0x7F) | 0x80, 3900 >> 7]) + b"\x5a" * 3900


def test_multibyte_lengths():
    size = 1 << 16
    for run in (127, 128, 129, 16383):
        # run as a zero run, then as a non-zero run
        old, new = changed(size, (run, run + 1))
        assert encode(old, new) == uleb128_encode(run) + b"\x01\x5a"
        old, new = changed(size, (0, run))
        assert encode(old, new) == b"\x00" + uleb128_encode(run) + b"\x5a" * run
    assert uleb128_encode(127) == b"\x7f"
    assert uleb128_encode(128) == b"\x80\x01"
    assert uleb128_encode(16383) == b"\xff\x7f"


def test_runs_over_14_bits_are_unencodable():
    size = 1 << 16
    # a 16384-byte zero run before a change, and a 16384-byte change: QEMU
    # cannot write either length (its encoder asserts), so no delta is possible
    assert encode(*changed(size, (16384, 16385))) is None
    assert encode(*changed(size, (0, 16384))) is None
    # the unchanged tail is never written, however long
    assert encode(*changed(size, (0, 1))) == b"\x00\x01\x5a"
    # a 16 KiB page that changed everywhere needs a 16384 length too
    assert encode(*changed(1 << 14, (0, 1 << 14))) is None


def test_overflow_room_quirk():
    # 1 KiB page, one run of n bytes at the start: output is 3 + n bytes
    size = 1024
    assert len(encode(*changed(size, (0, 1019)))) == 1022   # = size - 2: fits
    assert encode(*changed(size, (0, 1020))) is None        # size - 1, tail left
    assert encode(*changed(size, (0, 1021))) is None        # = size, tail left
    # the same output size is fine once the run reaches the last byte
    enc = encode(*changed(size, (3, 1024)))
    assert enc is not None and len(enc) == size
    assert encode(*changed(size, (2, 1024))) is None         # size + 1


def test_short_buffers():
    assert encode(b"", b"") == b""
    assert encode(b"\x00", b"\x00") is None  # no room for QEMU's 2-byte check
    assert encode(bytes(8), b"\x01" + bytes(7)) == b"\x00\x01\x01"
    with pytest.raises(UsageError):
        encode(bytes(8), bytes(16))


def test_has_zero_byte_trick_is_exact():
    """The word scan of QEMU's non-zero runs relies on this being exact."""
    rnd = random.Random(3)
    for width in (4, 8):
        ones = int.from_bytes(b"\x01" * width, "little")
        highs = ones << 7
        full = (1 << (8 * width)) - 1
        for _ in range(20000):
            raw = [0 if rnd.random() < 0.1 else rnd.randrange(1, 256)
                   for _ in range(width)]
            x = int.from_bytes(bytes(raw), "little")
            flagged = ((x - ones) & full) & ~x & highs
            assert bool(flagged) == (0 in raw)


# ---------------------------------------------------------------- uleb128

def test_uleb128_all_values():
    for n in range(1 << 14):
        enc = uleb128_encode(n)
        assert enc == ref_uleb(n)
        assert uleb128_decode(b"\xaa" + enc + b"\xbb", 1) == (n, 1 + len(enc))


def test_uleb128_limits():
    with pytest.raises(UsageError):
        uleb128_encode(1 << 14)
    with pytest.raises(UsageError):
        uleb128_encode(-1)
    assert uleb128_decode(b"\x80\x00", 0) == (0, 2)  # non-canonical, QEMU takes it
    with pytest.raises(XBZRLEError) as e:
        uleb128_decode(b"\x00\x80\x80\x01", 1, offset=BASE)
    assert e.value.offset == BASE + 2
    with pytest.raises(XBZRLEError) as e:
        uleb128_decode(b"\x00\x81", 1, offset=BASE)
    assert e.value.offset == BASE + 1
    with pytest.raises(XBZRLEError) as e:
        uleb128_decode(b"\x00", 1, offset=BASE)
    assert e.value.offset == BASE + 1


# ---------------------------------------------------------------- malformed input

PAIR = b"\x02\x03abc"  # valid: skip 2, write 3


@pytest.mark.parametrize("data,fault", [
    (b"\x85", 0),                          # lone byte: no room for a pair
    (PAIR + b"\x81", 5),                   # truncated uleb where a pair starts
    (b"\x00\x81", 1),                      # truncated uleb of a non-zero run
    (PAIR + b"\x85\x01", 7),               # ends between a zero run and its nzrun
    (PAIR + b"\x05", 5),                   # ends right after a zero-run length
    (PAIR + b"\x01\x81\x80\x01", 7),       # over-long non-zero run length
    (b"\x80\x80\x01\x01x", 1),             # over-long zero run length
    (PAIR + b"\x00\x01x", 5),              # zero-length zero run after the first
    (b"\x00\x00", 1),                      # zero-length non-zero run
    (PAIR + b"\x01\x80\x00", 6),           # zero-length non-zero run, 2-byte form
    (b"\x81\x08\x01x", 0),                 # zero run to 1025 > page end
    (b"\x80\x08\x01x", 2),                 # zero run to the end, then one more
    (b"\xfe\x07\x03abc", 2),               # non-zero run past the page end
    (PAIR + b"\x01\x05ab", 6),             # non-zero run past the end of data
])
def test_malformed(data, fault):
    original = random.Random(1).randbytes(1024)
    page = bytearray(original)
    with pytest.raises(XBZRLEError) as e:
        decode(data, page, offset=BASE)
    assert e.value.offset == BASE + fault
    assert page == original  # no partial patch
    with pytest.raises(RefReject):
        ref_decode(data, original)


def test_empty_and_boundary_inputs_accepted():
    page = bytearray(1024)
    decode(b"", page)
    assert page == bytes(1024)
    decode(b"\x80\x00\x01z", page)      # non-canonical first zero run of 0
    decode(b"\xff\x07\x01y", page)      # last byte of the page
    assert page[0:1] == b"z" and page[1023:] == b"y"


@SETTINGS
@given(st.binary(max_size=80)
       | st.lists(st.sampled_from([0, 1, 2, 3, 0x7F, 0x80, 0x81, 0xFF, 0x07, 0x08]),
                  max_size=40).map(bytes))
def test_fuzz_decode(data):
    original = bytes(range(256)) * 4
    page = bytearray(original)
    try:
        expected = ref_decode(data, original)
    except RefReject:
        expected = None
    try:
        decode(data, page, offset=BASE)
    except XBZRLEError as e:
        assert expected is None
        assert BASE <= e.offset <= BASE + len(data)
        assert page == original
    else:
        assert bytes(page) == expected
