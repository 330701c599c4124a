"""Paths that avoid copying pages: mapped-ram page areas read in place from the
input file (lazy decoding, attached blocks), and sequential streams decoded
straight into a mapped-ram output's page areas (``DirectMappedRam``).

Each is checked against the plain path (the whole stream fed from memory,
pages copied into a scratch image), on the real QEMU fixtures.
"""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import qemuram
from qemuram import io as qio
from qemuram.canonical import CanonicalWriter, DirectMappedRam, write_atomic
from qemuram.errors import TruncatedStream
from qemuram.framing import NEED_DATA, Decoder
from qemuram.records import MappedRamArea

from conftest import MAPPED, SEQUENTIAL, load_stream, over_fixtures


def _hashes(st) -> dict:
    return {n: hashlib.sha256(b.read(0, b.size)).hexdigest() for n, b in st.ram.items()}


def _write(tmp_path, name: str, data: bytes = None) -> str:
    path = tmp_path / f"{name}.mig"
    path.write_bytes(load_stream(name) if data is None else data)
    return str(path)


def _encode(st, **kw) -> bytes:
    out = io.BytesIO()
    CanonicalWriter(st, **kw).write(out)
    return out.getvalue()


# ---------------------------------------------------------------- lazy decoding

@over_fixtures(MAPPED)
def test_lazy_page_areas_are_offsets_not_bytes(name, tmp_path):
    path = _write(tmp_path, name)
    with open(path, "rb") as f:
        eager = [r for r in qio.iter_records(f) if isinstance(r, MappedRamArea)]
    with open(path, "rb") as f:
        lazy = [r for r in qio.iter_records(f, lazy_pages=True) if isinstance(r, MappedRamArea)]
    skipped = [r for r in lazy if r.data is None]
    assert skipped, "no page area was skipped"
    for r in skipped:
        # the skipped chunk covers exactly the page bytes the eager pass read
        covered = [e for e in eager if e.block == r.block and e.offset >= r.offset]
        assert covered[0].offset == r.offset
        assert sum(len(e.data) for e in covered) == r.length == r.size
    # the bitmap chunks before each page area still come with their bytes
    for r in skipped:
        assert any(b.data is not None and b.block == r.block and b.offset < r.offset
                   for b in lazy)


@over_fixtures(MAPPED)
def test_lazy_flag_without_seeking_discards_fed_pages(name):
    """A decoder told to skip but fed everything (no adapter seeking) still
    reaches the end at the right offsets."""
    data = load_stream(name)
    dec = Decoder()
    dec.lazy_pages = True
    pos, events = 0, []
    while True:
        ev = dec.next_event()
        if ev is None:
            break
        if ev is NEED_DATA:
            if pos >= len(data):
                dec.feed_eof()
            else:
                dec.feed(data[pos:pos + 65536])
                pos += 65536
            continue
        events.append(ev)
    assert dec.offset == len(data)
    assert any(isinstance(e, MappedRamArea) and e.data is None for e in events)


@over_fixtures(MAPPED)
def test_truncated_inside_page_area_is_reported(name, tmp_path):
    data = load_stream(name)
    with open(_write(tmp_path, name), "rb") as f:
        area = next(r for r in qio.iter_records(f, lazy_pages=True)
                    if isinstance(r, MappedRamArea) and r.data is None and r.length)
    cut = area.offset + area.length // 2
    path = _write(tmp_path, "cut", data[:cut])
    with pytest.raises(TruncatedStream) as info:
        qemuram.open(path).close()
    assert info.value.offset is not None and info.value.offset <= cut


# ---------------------------------------------------------------- attached blocks

@over_fixtures(MAPPED)
def test_attached_blocks_equal_copied_ones(name, tmp_path):
    path = _write(tmp_path, name)
    with qemuram.open(io.BytesIO(load_stream(name))) as copied, qemuram.open(path) as st:
        assert any(b.attached for b in st.ram.values())
        assert _hashes(st) == _hashes(copied)
        for n, b in st.ram.items():
            # mapping an attached block moves it to a scratch file of its own
            assert hashlib.sha256(np.asarray(b.array()).tobytes()).hexdigest() == \
                hashlib.sha256(copied.ram[n].read(0, b.size)).hexdigest()
            assert not b.attached


def _stale_case(tmp_path, name):
    """The fixture with junk written over one page whose bitmap bit is clear
    (a page QEMU wrote in an earlier pass, then found zero)."""
    data = bytearray(load_stream(name))
    with qemuram.open(io.BytesIO(bytes(data))) as st:
        blk = next(b for b in st.ram.values() if b.present is not None
                   and not b.present.all() and b.present.any())
        edge = blk.present[:-1] & ~blk.present[1:]       # present page, then a clear one
        page = int(np.flatnonzero(edge)[0]) + 1
        at = blk.mapped_ram.pages_offset + page * blk.target_page_size
        name_, P = blk.name, blk.target_page_size
    data[at:at + P] = b"\xa5" * P
    return _write(tmp_path, "stale", bytes(data)), name_, page, P


@over_fixtures(MAPPED)
def test_clear_bitmap_bit_reads_zero_whatever_the_file_holds(name, tmp_path):
    path, block, page, P = _stale_case(tmp_path, name)
    with qemuram.open(path) as st:
        b = st.ram[block]
        assert b.attached
        assert b.read(page * P, P) == bytes(P)
        assert b.read(page * P - 8, 16) == b.read(page * P - 8, 8) + bytes(8)
        assert not b.array()[page * P:(page + 1) * P].any()
    with qemuram.open(path) as st, qemuram.open(_write(tmp_path, name)) as clean:
        assert _encode(st, layout="sequential") == _encode(clean, layout="sequential")


@over_fixtures(MAPPED)
def test_changing_an_attached_block_copies_it_first(name, tmp_path):
    path = _write(tmp_path, name)
    before = os.path.getsize(path), hashlib.sha256(open(path, "rb").read()).hexdigest()
    with qemuram.open(path) as st:
        b = next(b for b in st.ram.values() if b.attached and b.size >= 8192)
        want = bytearray(b.read(0, 8192))
        want[100:104] = b"\x01\x02\x03\x04"
        b.write(100, b"\x01\x02\x03\x04")
        assert not b.attached
        assert b.read(0, 8192) == bytes(want)
    # the input file is never written
    assert (os.path.getsize(path), hashlib.sha256(open(path, "rb").read()).hexdigest()) == before


def test_extract_of_mapped_ram_copies_present_pages(tmp_path):
    name = MAPPED[0]
    path = _write(tmp_path, name)
    out = tmp_path / "x"
    r = subprocess.run([sys.executable, "-m", "qemuram", "extract", path, "-o", str(out),
                        "--hash", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with qemuram.open(io.BytesIO(load_stream(name))) as st:
        want = _hashes(st)
    import json
    man = json.loads(r.stdout)
    for b in man["ramblocks"]:
        got = hashlib.sha256((out / b["file"]).read_bytes()).hexdigest()
        assert got == b["sha256"] == want[b["name"]]


# ---------------------------------------------------------------- direct mapped-ram output

def _direct(path: str, **options):
    """(output bytes, DirectMappedRam) of a sequential -> mapped-ram conversion
    decoded straight into the output file."""
    out = path + ".mr"
    used = {}

    def run(f):
        direct = DirectMappedRam(f, **options)
        with qemuram.open(path, placement=direct.placement) as st:
            used["areas"] = direct.areas
            used["scratch"] = st.image._directory
            return direct.writer(st).write(f)

    write_atomic(out, run)
    with open(out, "rb") as f:
        return f.read(), used


@over_fixtures([n for n in SEQUENTIAL if n != "q35-ignore-shared"])
def test_direct_mapped_ram_output_equals_the_scratch_path(name, tmp_path, monkeypatch):
    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(1) or real(*a, **k))
    got, used = _direct(_write(tmp_path, name))
    assert used["areas"], "the direct path was not taken"
    assert used["scratch"] is None and not made, "a scratch image was made"
    with qemuram.open(io.BytesIO(load_stream(name))) as st:
        assert got == _encode(st, layout="mapped-ram")


def test_direct_with_host_page_size_rewrite(tmp_path):
    name = "q35-postcopy-advised"
    got, used = _direct(_write(tmp_path, name), host_page_sizes={"pc.ram": 2 << 20})
    assert used["areas"]
    with qemuram.open(io.BytesIO(load_stream(name))) as st:
        assert got == _encode(st, layout="mapped-ram", host_page_sizes={"pc.ram": 2 << 20})


def test_direct_falls_back_for_ignore_shared(tmp_path):
    """x-ignore-shared cannot be expressed as mapped-ram: no windows are
    planned, and the writer reports the usage error as before."""
    from qemuram.errors import UsageError
    path = _write(tmp_path, "q35-ignore-shared")
    with pytest.raises(UsageError, match="x-ignore-shared"):
        _direct(path)
    assert not [p for p in os.listdir(tmp_path) if "qemuram-tmp" in p]


def test_cli_convert_with_replace_through_direct_path(tmp_path):
    """--replace writes into the output's page area; the bitmap is then
    computed from the content (a replaced page may be zero)."""
    name = "q35-plain"
    path = _write(tmp_path, name)
    pattern = tmp_path / "pat.bin"
    pattern.write_bytes(bytes(4096) + b"\x5a" * 4096)      # one zero page, one full page
    out = tmp_path / "out.mr"
    r = subprocess.run([sys.executable, "-m", "qemuram", "convert", path, str(out),
                        "--to", "mapped-ram", "--replace", f"pc.ram={pattern}@0x200000"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with qemuram.open(io.BytesIO(load_stream(name))) as st:
        st.ram["pc.ram"].write(0x200000, pattern.read_bytes())
        assert out.read_bytes() == _encode(st, layout="mapped-ram")


# ---------------------------------------------------------------- mapped input files

@over_fixtures()
def test_mapped_input_file_decodes_like_a_read_one(name, tmp_path, monkeypatch):
    """Big plain files are decoded from an mmap of the page cache; force that
    path on the small fixtures and compare with reading through a buffer."""
    path = _write(tmp_path, name)
    with qemuram.open(io.BytesIO(load_stream(name))) as st:
        want = _hashes(st)
    monkeypatch.setattr(qio, "MAP_MIN", 0)
    monkeypatch.setattr(qio, "_RELEASE", 4096)      # give pages back after every record
    mapped = []
    real = qio._iter_mapped
    monkeypatch.setattr(qio, "_iter_mapped", lambda d, mm: mapped.append(1) or real(d, mm))
    with qemuram.open(path, verify=True) as st:
        assert st.roundtrip, st.roundtrip_mismatch
        assert _hashes(st) == want
    assert mapped, "the mapped path was not taken"


@pytest.mark.parametrize("cut", [100, 5000, -300, -1])
def test_mapped_input_truncated(cut, tmp_path, monkeypatch):
    data = load_stream("q35-plain")
    cut = cut % len(data)
    path = _write(tmp_path, "cut", data[:cut])
    monkeypatch.setattr(qio, "MAP_MIN", 0)
    with pytest.raises(TruncatedStream) as info:
        qemuram.open(path).close()
    assert info.value.offset is not None and info.value.offset <= cut


@pytest.mark.parametrize("where", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("mapped", [False, True])
def test_truncated_page_area_through_every_command(where, mapped, tmp_path, monkeypatch):
    """A mapped-ram file cut inside a page area: open (attached), extract
    (copied) and verify all report TruncatedStream at or before the cut,
    whether the file is read or mapped."""
    name = MAPPED[0]
    data = load_stream(name)
    with open(_write(tmp_path, name), "rb") as f:
        area = next(r for r in qio.iter_records(f, lazy_pages=True)
                    if isinstance(r, MappedRamArea) and r.data is None and r.length)
    cut = area.offset + int(area.length * where)
    path = _write(tmp_path, "cut", data[:cut])
    monkeypatch.setattr(qio, "MAP_MIN", 0 if mapped else 1 << 62)
    (tmp_path / "wd").mkdir()
    for run in (lambda: qemuram.open(path).close(),
                lambda: qemuram.open(path, workdir=str(tmp_path / "wd")).close(),
                lambda: qemuram.stream.verify(path)):
        with pytest.raises(TruncatedStream) as info:
            run()
        assert info.value.offset is not None and info.value.offset <= cut


def test_put_pages_keeps_written_meaning_nonzero(tmp_path):
    """Decoded pages that come out all zero (an XBZRLE delta can do that) stay
    holes, and a page named twice keeps its last version, so writers can take
    ``written`` as the mapped-ram bitmap without reading pages back."""
    from qemuram.image import RamBlock
    P = 4096
    b = RamBlock("ram", 8 * P, P, str(tmp_path / "ram.raw"))
    full = np.full((1, P), 7, dtype=np.uint8)
    b.put_pages(np.array([1, 2]), np.concatenate([full, full]))
    assert b.written.tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
    zero = np.zeros((1, P), dtype=np.uint8)
    b.put_pages(np.array([2, 3, 2, 3]), np.concatenate([zero, full, full, zero]))
    assert b.written.tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
    assert b.read(2 * P, P) == bytes(full) and b.read(3 * P, P) == bytes(P)
    b.put_pages(np.array([1]), zero)
    assert b.written.tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert b.read(P, P) == bytes(P) and b.verified_nonzero
    b.close()


@over_fixtures(MAPPED)
def test_reading_a_closed_stream_is_an_error(name, tmp_path):
    """An attached block must not read zeros (or another file that took its
    descriptor number) once its stream is closed."""
    from qemuram.errors import UsageError
    with qemuram.open(_write(tmp_path, name)) as st:
        blocks = list(st.ram.values())
    for b in blocks:
        with pytest.raises(UsageError, match="closed"):
            b.read(0, min(b.size, 4096))
        with pytest.raises(UsageError, match="closed"):
            b.array()


@over_fixtures(MAPPED)
def test_cli_mapped_ram_to_mapped_ram_copies_in_the_kernel(name, tmp_path):
    """A mapped-ram file re-encoded as mapped-ram from disk: pages stay in the
    input (attached) and are copied file to file into the output, which is
    QEMU's own file byte for byte."""
    path = _write(tmp_path, name)
    out = tmp_path / "out.mr"
    r = subprocess.run([sys.executable, "-m", "qemuram", "convert", path, str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == load_stream(name)
