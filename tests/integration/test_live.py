"""Live migrations of a running guest, decoded by qemuram and checked byte for byte.

The guest runs our own workload (tests/integration/workload/build.py: a 64 KiB
-bios image that keeps rewriting an 8 MiB region in patterns chosen for
XBZRLE), so memory changes while QEMU migrates it and the streams hold dirty
iterations, XBZRLE deltas, postcopy phases and multifd flushes.

The guests run under TCG unless QEMURAM_LIVE_ACCEL says otherwise: TCG runs the
workload at the same pace on every host, while KVM without hardware
virtualisation for the guest (this project's machines emulate every guest
instruction there) runs it a hundred times slower.

What is compared with what:
  * decoded RAM vs the source's RAM (pmemsave) once the source is paused at
    the end of the migration; the legacy VGA/BIOS window 0xA0000-0xFFFFF is
    not RAM through pmemsave and is skipped;
  * decoded RAM vs a destination that loaded the same stream (or received it
    through the recording relay);
  * every XBZRLE payload vs ``qemuram.xbzrle.encode(old, new)``, where old is
    the page the destination held before the record and new the page after
    it. QEMU encodes against its XBZRLE cache, and a page's cache entry is
    always what QEMU last sent for it: a page that is not cached (first send
    after the bulk pass, or its slot taken by another page) is sent plain
    (and cached when the slot is free), an overflowing page is sent plain
    from the refreshed entry, a zero page refreshes the entry. So old is
    exactly QEMU's reference page for every XBZRLE record, with no exception
    to filter out.
"""
from __future__ import annotations

import collections
import os
import struct
import time

import numpy as np
import pytest

import qemuram
from qemuram import io as qio
from qemuram import xbzrle
from qemuram.framing import Decoder
from qemuram.image import MemoryImage
from qemuram.records import PageRun, XbzrlePage
from qemuram.wire import SectionType

try:
    from . import harness as h
    from .workload import build as workload
except ImportError:  # run outside the package layout
    from tests.integration import harness as h
    from tests.integration.workload import build as workload

pytestmark = pytest.mark.integration

RAM = 64 << 20
ACCEL = os.environ.get("QEMURAM_LIVE_ACCEL", "tcg")
#: Guest-physical ranges that are plain RAM through pmemsave (pc.ram offset == GPA).
RAM_RANGES = ((0, 0xA0000), (0x100000, RAM))
REGION = (workload.REGION_BASE, workload.REGION_END)
# While the guest runs, precopy must not converge by itself. QEMU 10 completes
# as soon as a dirty-bitmap sync finds less than bandwidth * downtime-limit
# bytes dirty, and syncs only once the previous dirty set is sent. At 8 MiB/s
# with downtime-limit 1 ms that is under 2 pages, and each pass of the rate
# limiter (100 ms) carries ~200 whole pages while the workload's hot zone
# dirties several times more, so every iteration lasts >= 100 ms and finds
# hundreds of dirty pages, even with the guest slowed down by a busy host.
# (At 32 MiB/s one 100 ms window carries the whole dirty set in a burst, the
# next sync comes a few ms later and sometimes finds < 8 pages: it converged.)
SLOW_BANDWIDTH = 8 << 20
CACHE_SIZE = 16 << 20
PAGE = 4096


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bios(tmp_path_factory):
    h.require(h.qemu_available(), "qemu-system-x86_64")
    path = tmp_path_factory.mktemp("workload") / "workload.bin"
    workload.write(str(path))
    return str(path)


def _guest(bios_path: str, **kw) -> h.Guest:
    return h.Guest("q35", RAM, accel=ACCEL, extra_args=["-bios", bios_path], **kw)


def _counter(guest: h.Guest) -> int:
    return struct.unpack("<I", guest.pmemsave(workload.STATUS_ADDR, 4))[0]


def _wait_for(what: str, predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _wait_running(guest: h.Guest, passes: int = 3, timeout: float = 30) -> int:
    def counter():
        c = _counter(guest)
        return c if c >= passes else 0
    return _wait_for(f"the workload to finish {passes} passes", counter, timeout)


def _wait_iterations(guest: h.Guest, syncs: int, min_seconds: float, timeout: float) -> dict:
    """Poll query-migrate until ``syncs`` dirty-bitmap syncs and ``min_seconds``."""
    start = time.monotonic()

    def ready():
        info = guest.query_migrate()
        if info.get("status") in ("failed", "cancelled"):
            raise AssertionError(f"migration {info.get('status')}: {info.get('error-desc')}")
        enough = (info.get("ram", {}).get("dirty-sync-count", 0) >= syncs
                  and time.monotonic() - start >= min_seconds)
        return info if enough or info.get("status") == "completed" else None

    return _wait_for(f"{syncs} dirty syncs", ready, timeout)


def _dump(guest: h.Guest) -> dict:
    return {addr: guest.pmemsave(addr, end - addr) for addr, end in RAM_RANGES}


def _assert_ram_equal(block, memory: dict, what: str, skip=()) -> None:
    """Decoded ``block`` equals ``memory`` ({addr: bytes}) outside ``skip`` ranges."""
    for addr, data in memory.items():
        got = block.read(addr, len(data))
        a = np.frombuffer(got, dtype=np.uint8).copy()
        b = np.frombuffer(data, dtype=np.uint8).copy()
        for lo, hi in skip:
            lo, hi = max(lo, addr), min(hi, addr + len(data))
            if lo < hi:
                a[lo - addr:hi - addr] = 0
                b[lo - addr:hi - addr] = 0
        assert h.first_difference(a, b) is None, \
            what + ": " + h.describe_difference(a, b, base=addr, names=("decoded", what))


def _pages_in_postcopy(st) -> int:
    packaged = [c["offset"] for c in st.commands if c["command"] == "PACKAGED"]
    return sum(s.page_records + s.zero_records + s.xbzrle_records
               for s in st.ram_sections if s.offset > packaged[0])


# --------------------------------------------------------------------------
# the workload itself
# --------------------------------------------------------------------------

def test_workload_rewrites_memory(bios):
    with _guest(bios, paused=False) as g:
        first = _wait_running(g, 2)
        second = _wait_for("the pass counter to move", lambda: _counter(g) > first + 2 and 1, 30)
        assert second
        g.stop()
        c = _counter(g)
        region = g.pmemsave(workload.REGION_BASE, workload.REGION_END - workload.REGION_BASE)
    assert c > first
    # sparse zone: pass c (or c - 1 for pages pass c had not reached) at +0
    done = [struct.unpack_from("<I", region, p * PAGE)[0] for p in range(*workload.SPARSE_PAGES)]
    split = sum(v == workload.expected_sparse_dword0(c, p) for p, v in enumerate(done))
    assert done == [workload.expected_sparse_dword0(c if p < split else c - 1, p)
                    for p in range(*workload.SPARSE_PAGES)]
    # edge pages: run bytes hold the low byte of c or c - 1 (the edge loop
    # may have been stopped half way), every other byte is zero
    for name, (page, runs, _) in workload.EDGE.items():
        pg = np.frombuffer(region[page * PAGE:(page + 1) * PAGE], dtype=np.uint8)
        in_run = np.zeros(PAGE, dtype=bool)
        for off, n in runs:
            in_run[off:off + n] = True
        assert not pg[~in_run].any(), name
        assert set(np.unique(pg[in_run]).tolist()) <= {c & 0xFF, (c - 1) & 0xFF}, name
    # every zone was written
    for lo, hi in (workload.SPARSE_PAGES, workload.STRIDED_PAGES, workload.DENSE_PAGES,
                   workload.HOT_PAGES):
        assert any(region[lo * PAGE:hi * PAGE]), (lo, hi)


# --------------------------------------------------------------------------
# a + b: live precopy with XBZRLE to file:
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xbzrle_run(bios, tmp_path_factory):
    """One live precopy migration with XBZRLE to a file (shared by the tests below)."""
    path = str(tmp_path_factory.mktemp("xbzrle") / "live-xbzrle.mig")
    t0 = time.monotonic()
    with _guest(bios, paused=False) as src:
        _wait_running(src)
        src.set_capabilities(xbzrle=True)
        src.set_parameters(xbzrle_cache_size=CACHE_SIZE, max_bandwidth=SLOW_BANDWIDTH,
                           downtime_limit=1)
        src.migrate(f"file:{path}")
        mid = _wait_iterations(src, syncs=8, min_seconds=2.5, timeout=45)
        # now let it converge: QEMU stops the guest for the last pass
        src.set_parameters(max_bandwidth=h.FAST_BANDWIDTH, downtime_limit=2000)
        info = src.wait_migration(60)
        assert src.status() == "postmigrate"
        memory = _dump(src)
        counter = _counter(src)
    return {"path": path, "mid": mid, "info": info, "memory": memory, "counter": counter,
            "seconds": time.monotonic() - t0}


def test_live_precopy_xbzrle_to_file(bios, xbzrle_run):
    info = xbzrle_run["info"]
    assert info["status"] == "completed"
    assert xbzrle_run["mid"]["status"] == "active", "converged before the limits were raised"
    syncs = info["ram"]["dirty-sync-count"]
    assert syncs >= 8
    assert info["xbzrle-cache"]["cache-miss"] > 0

    with qemuram.open(xbzrle_run["path"], verify=True) as st:
        assert st.roundtrip, f"re-encoding differs at offset {st.roundtrip_mismatch}"
        counts = st.ram["pc.ram"].counts
        parts = [s for s in st.ram_sections if s.kind == SectionType.PART]
        assert len(parts) >= 8, len(parts)
        assert sum(1 for s in parts if s.xbzrle_records) >= 5
        assert counts["xbzrle"] >= 1000, counts
        assert counts["page"] > 0 and counts["zero"] > 0, counts
        # decoded memory == the paused source's memory
        _assert_ram_equal(st.ram["pc.ram"], xbzrle_run["memory"], "source")
        assert st.ram["pc.bios"].read(0, workload.IMAGE_SIZE) == workload.build()
        decoded_counter = struct.unpack("<I", st.ram["pc.ram"].read(workload.STATUS_ADDR, 4))[0]
        assert decoded_counter == xbzrle_run["counter"] > 3

        # and a real destination loading the same file agrees
        with _guest(bios, incoming=True) as dst:
            dst.set_capabilities(xbzrle=True)
            dst.load(xbzrle_run["path"], timeout=60)
            _assert_ram_equal(st.ram["pc.ram"], _dump(dst), "destination")
    print(f"\nlive xbzrle: {syncs} dirty syncs, {len(parts)} ram PART sections, "
          f"pc.ram records {counts}, {os.path.getsize(xbzrle_run['path'])} bytes, "
          f"migration {xbzrle_run['seconds']:.1f}s")


def test_live_xbzrle_stream_converted_to_mapped_ram_loads(bios, xbzrle_run, tmp_path):
    """The multi-pass XBZRLE stream decoded straight into a mapped-ram output
    (no scratch image: XBZRLE pages are read back from the output's page area)
    holds the source's memory, and a real destination loads it."""
    import subprocess
    import sys
    out = tmp_path / "xbzrle.mapped-ram"
    r = subprocess.run([sys.executable, "-m", "qemuram", "convert", xbzrle_run["path"],
                        str(out), "--to", "mapped-ram", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with qemuram.open(str(out), verify=True) as st:
        assert st.format == "mapped-ram" and st.roundtrip
        assert st.ram["pc.ram"].attached
        _assert_ram_equal(st.ram["pc.ram"], xbzrle_run["memory"], "source")
        with _guest(bios, incoming=True) as dst:
            dst.set_capabilities(mapped_ram=True)
            dst.load(str(out), timeout=60)
            _assert_ram_equal(st.ram["pc.ram"], _dump(dst), "destination")


def _edge_by_offset():
    return {workload.REGION_BASE + page * PAGE: name
            for name, (page, _, _) in workload.EDGE.items()}


@pytest.fixture(scope="module")
def xbzrle_walk(xbzrle_run):
    """Replay the stream record by record; check every XBZRLE payload against
    ``xbzrle.encode(page before, page after)``.

    Returns {"other": [(offset, len, equal)], edge name: [...] , "plain": {...}}.
    """
    edge = _edge_by_offset()
    result = collections.defaultdict(list)
    plain = collections.Counter()           # (edge name, encode() on plain page) -> count
    image = MemoryImage()
    try:
        with open(xbzrle_run["path"], "rb") as f:
            vm = qio.read_vmdesc_ahead(f, 0)
            dec = Decoder(vmdesc=vm) if vm is not None else Decoder()
            for rec in qio.iter_records(f, decoder=dec):
                if isinstance(rec, XbzrlePage):
                    page = image.blocks[rec.block].pages()[rec.page_offset // PAGE]
                    old = page.tobytes()
                    payload = bytes(rec.encoded)
                    image.apply(rec, dec.page_size)
                    mine = xbzrle.encode(old, page)
                    key = edge.get(rec.page_offset, "other") if rec.block == "pc.ram" else "other"
                    result[key].append((rec.offset, len(payload), mine == payload,
                                        None if mine is None else len(mine)))
                    continue
                if isinstance(rec, PageRun) and rec.block == "pc.ram" and rec.data is not None:
                    pages = image.blocks[rec.block].pages()
                    for k, off in enumerate(rec.page_offsets.tolist()):
                        if off in edge:
                            mine = xbzrle.encode(pages[off // PAGE], rec.data[k])
                            plain[(edge[off], None if mine is None else len(mine))] += 1
                image.apply(rec, dec.page_size)
    finally:
        image.close()
    result["plain"] = plain
    return result


def test_xbzrle_payloads_reproduced_by_encoder(xbzrle_walk):
    """Every XBZRLE record away from the overflow boundary is exactly what
    ``qemuram.xbzrle.encode`` makes of (page before, page after)."""
    others = xbzrle_walk["other"]
    bad = [(hex(o), n, m) for o, n, ok, m in others if not ok]
    assert not bad, f"{len(bad)} of {len(others)} XBZRLE records differ: {bad[:10]}"
    assert len(others) >= 1000
    sizes = sorted(n for _, n, _, _ in others)
    # the workload's deltas span one-pair records up to multi-KiB single runs
    assert sizes[0] <= 16 and sizes[-1] >= 2400, (sizes[0], sizes[-1])
    # boundary cases on which both of QEMU's encoders agree with qemuram
    largest = xbzrle_walk["len4094_tail64"]
    assert largest and all(ok for _, _, ok, _ in largest), largest[:5]
    assert any(n == PAGE - 2 for _, n, _, _ in largest)
    for name in ("len4095_tail128", "len4095_tail92"):
        assert all(ok for _, _, ok, _ in xbzrle_walk[name]), (name, xbzrle_walk[name][:5])
        # QEMU sent these pages plain, and qemuram.encode agrees it must overflow
        assert xbzrle_walk["plain"][(name, None)] >= 2, dict(xbzrle_walk["plain"])
    print(f"\nXBZRLE records compared: {len(others) + len(largest)} equal "
          f"(sizes {sizes[0]}..{sizes[-1]} bytes, median {sizes[len(sizes) // 2]})")


def _replay_with_host_encoder(path: str, variant: str) -> list:
    """Replay the stream record by record and encode every XBZRLE page again
    with ``xbzrle.encode(page before, page after, variant=variant)``.

    Returns one (stream offset, pc.ram edge name or "other", QEMU's payload
    length, our length or None, equal, generic encoder's length or None) per
    XBZRLE record.
    """
    edge = _edge_by_offset()
    rows = []
    image = MemoryImage()
    try:
        with open(path, "rb") as f:
            vm = qio.read_vmdesc_ahead(f, 0)
            dec = Decoder(vmdesc=vm) if vm is not None else Decoder()
            for rec in qio.iter_records(f, decoder=dec):
                if isinstance(rec, XbzrlePage):
                    page = image.blocks[rec.block].pages()[rec.page_offset // PAGE]
                    old = page.tobytes()
                    payload = bytes(rec.encoded)
                    image.apply(rec, dec.page_size)
                    mine = xbzrle.encode(old, page, variant=variant)
                    generic = xbzrle.encode(old, page, variant="generic")
                    name = edge.get(rec.page_offset, "other") if rec.block == "pc.ram" else "other"
                    rows.append((rec.offset, name, len(payload),
                                 None if mine is None else len(mine), mine == payload,
                                 None if generic is None else len(generic)))
                    continue
                image.apply(rec, dec.page_size)
    finally:
        image.close()
    return rows


def test_xbzrle_overflow_boundary_matches_qemu(xbzrle_run):
    """Every XBZRLE payload QEMU sent is what the encoder it runs on this host
    makes of (page before, page after), including the pages whose delta is
    4095/4096 bytes with an unchanged last 64-byte block: QEMU's AVX512
    encoder sends those, its generic one sends them plain."""
    variant = xbzrle.host_variant()
    rows = _replay_with_host_encoder(xbzrle_run["path"], variant)
    bad = [(hex(o), name, n, m) for o, name, n, m, ok, _ in rows if not ok]
    assert not bad, (f"{len(bad)} of {len(rows)} XBZRLE records differ from "
                     f"encode(variant={variant!r}) (offset, page, QEMU bytes, ours): {bad[:10]}")
    assert len(rows) >= 1000
    by_name = collections.defaultdict(list)
    for o, name, n, m, ok, generic in rows:
        by_name[name].append((n, generic))
    boundary = {"len4095_tail64": PAGE - 1, "len4096_tail64": PAGE}
    for name, length in boundary.items():
        records = by_name[name]
        # (a page QEMU copies while the guest is rewriting it has a smaller delta)
        assert all(n <= length for n, _ in records), (name, records[:5])
        if variant == "avx512":
            # a whole rewrite of the page's layout gives a delta of exactly
            # this size, which the generic encoder refuses
            full = [generic for n, generic in records if n == length]
            assert full and all(generic is None for generic in full), (name, records[:5])
        else:
            assert all(n < PAGE - 1 for n, _ in records), (name, records[:5])
    # pages that neither of QEMU's encoders sends whole-layout deltas for
    for name in ("len4095_tail128", "len4095_tail92"):
        assert all(n < PAGE - 1 for n, _ in by_name[name]), (name, by_name[name][:5])
    variant_only = sum(1 for _, _, n, m, ok, generic in rows if generic != m)
    print(f"\nXBZRLE records compared with encode(variant={variant!r}): {len(rows)} "
          f"equal; {variant_only} of them differ from the generic encoder's output "
          f"({', '.join(f'{k}: {len(by_name[k])}' for k in boundary)})")


# --------------------------------------------------------------------------
# c: postcopy through the recording relay
# --------------------------------------------------------------------------

@pytest.mark.parametrize("destination", ["paused", "running"])
def test_live_postcopy_through_relay(bios, tmp_path, destination):
    """Precopy a running guest slowly, switch to postcopy, record the stream.

    With a paused destination (-S) its final memory is exactly the stream's;
    a running destination keeps executing the workload after POSTCOPY_RUN
    (faulting pages in through the return path), so there only the pages the
    workload never writes are compared with the destination, and everything
    with the source (paused since the switchover).
    """
    path = str(tmp_path / "postcopy.mig")
    t0 = time.monotonic()
    with _guest(bios, paused=False) as src, \
            _guest(bios, incoming=True, paused=(destination == "paused")) as dst:
        for g in (src, dst):
            g.set_capabilities(postcopy_ram=True)
        src.set_parameters(max_bandwidth=SLOW_BANDWIDTH, downtime_limit=1,
                           max_postcopy_bandwidth=16 << 20)
        _wait_running(src)
        dst.migrate_incoming(f"unix:{os.path.join(dst.tmpdir, 'in.sock')}")
        with h.Relay(dst.incoming_uri(), record=path, timeout=120) as relay:
            src.migrate(relay.uri)
            mid = _wait_iterations(src, syncs=3, min_seconds=1.0, timeout=40)
            assert mid["status"] == "active", mid.get("status")
            src.qmp("migrate-start-postcopy")
            _wait_for("postcopy-active",
                      lambda: src.query_migrate()["status"] in ("postcopy-active", "completed"),
                      30)
            info = src.wait_migration(60)
            dst.wait_incoming(60)
            assert relay.wait(30), f"relay still busy: {relay.errors}"
            assert not relay.errors, relay.errors
            assert relay.returned > 0       # the return path carried messages back
        assert src.status() == "postmigrate"
        src_memory = _dump(src)
        if destination == "running":
            _wait_for("the destination to run", lambda: dst.status() == "running", 30)
            dst.stop()
        else:
            assert dst.status() == "paused"
        dst_memory = _dump(dst)
        dst_counter = _counter(dst)
    seconds = time.monotonic() - t0

    with qemuram.open(path, verify=True) as st:
        assert st.roundtrip, f"re-encoding differs at offset {st.roundtrip_mismatch}"
        names = [c["command"] for c in st.commands]
        for cmd in ("POSTCOPY_ADVISE", "PACKAGED", "POSTCOPY_LISTEN", "POSTCOPY_RUN",
                    "POSTCOPY_RAM_DISCARD"):
            assert cmd in names, (cmd, names)
        at = {c["command"]: c["offset"] for c in reversed(st.commands)}
        assert at["POSTCOPY_ADVISE"] < at["PACKAGED"] < at["POSTCOPY_LISTEN"] < at["POSTCOPY_RUN"]
        # device state travelled inside the package
        packaged = [s for s in st.sections if s["offset"] > at["PACKAGED"]
                    and s["type"] == "FULL"]
        assert len(packaged) >= 5
        # postcopy streams carry no vmdesc: device payloads are found by footer scan
        measured = collections.Counter(s.get("measured_by") for s in packaged)
        assert set(measured) <= {"vmdesc", "footer-scan"} and all(
            "size" in s for s in packaged), measured
        postcopy_pages = _pages_in_postcopy(st)
        assert postcopy_pages > 0
        block = st.ram["pc.ram"]
        _assert_ram_equal(block, src_memory, "source")
        decoded_counter = struct.unpack("<I", block.read(workload.STATUS_ADDR, 4))[0]
        if destination == "paused":
            _assert_ram_equal(block, dst_memory, "destination")
            assert dst_counter == decoded_counter
        else:
            # the workload writes its stack page, the status page and the region
            written = ((0x7F000, 0x80000), (workload.STATUS_ADDR, workload.STATUS_ADDR + PAGE),
                       REGION)
            _assert_ram_equal(block, dst_memory, "destination", skip=written)
            assert dst_counter > decoded_counter, "the destination did not run the workload"
            assert info["ram"]["postcopy-requests"] > 0
    print(f"\npostcopy ({destination} destination): {mid['ram']['dirty-sync-count']} "
          f"precopy syncs, {postcopy_pages} pages after PACKAGED, "
          f"{info['ram']['postcopy-requests']} page requests, {len(packaged)} device "
          f"sections in PACKAGED measured by {dict(measured)}, commands "
          f"{dict(collections.Counter(names))}, {seconds:.1f}s")


# --------------------------------------------------------------------------
# d: multifd through the relay (main channel decoded)
# --------------------------------------------------------------------------

MULTIFD_MAGIC = b"\x11\x22\x33\x44"


def test_live_multifd_main_channel(bios, tmp_path):
    """Multifd opens the main channel plus one connection per channel to the
    same URI; the relay records each. The main channel is a complete stream
    without page data (pages travel in the multifd packets), so qemuram can
    check its structure and byte-exact re-encoding, not memory."""
    channels = 2
    record = str(tmp_path / "multifd.mig")
    with _guest(bios, paused=False) as src, _guest(bios, incoming=True) as dst:
        for g in (src, dst):
            g.set_capabilities(multifd=True)
            g.set_parameters(multifd_channels=channels)
        src.set_parameters(max_bandwidth=SLOW_BANDWIDTH, downtime_limit=1)
        _wait_running(src)
        dst.migrate_incoming(f"unix:{os.path.join(dst.tmpdir, 'in.sock')}")
        with h.Relay(dst.incoming_uri(), record=record, max_connections=1 + channels,
                     timeout=120) as relay:
            src.migrate(relay.uri)
            mid = _wait_iterations(src, syncs=4, min_seconds=1.0, timeout=40)
            src.set_parameters(max_bandwidth=h.FAST_BANDWIDTH, downtime_limit=2000)
            info = src.wait_migration(60)
            dst.wait_incoming(60)
            assert relay.wait(30), f"relay still busy: {relay.errors}"
            assert not relay.errors, relay.errors
            paths = relay.record_paths
            heads = []
            for p in paths:
                with open(p, "rb") as f:
                    heads.append(f.read(4))
        assert len(paths) == 1 + channels
        src_memory = _dump(src)
        # QEMU itself moved the memory correctly (sanity of the setup)
        for addr, data in _dump(dst).items():
            assert data == src_memory[addr], h.describe_difference(data, src_memory[addr],
                                                                   base=addr)
    mains = [p for p, head in zip(paths, heads) if head == b"QEVM"]
    assert len(mains) == 1, heads
    assert sorted(heads).count(MULTIFD_MAGIC) == channels, heads

    with qemuram.open(mains[0], verify=True) as st:
        assert st.roundtrip, f"re-encoding differs at offset {st.roundtrip_mismatch}"
        flushes = sum(s.multifd_flushes for s in st.ram_sections)
        assert flushes >= 3, flushes
        for name, blk in st.ram.items():
            assert blk.counts["page"] == blk.counts["zero"] == blk.counts["xbzrle"] == 0, \
                (name, blk.counts)
        assert "pc.ram" in st.ram and st.ram["pc.ram"].size == RAM
        assert any(s["type"] == "FULL" for s in st.sections)
    print(f"\nmultifd: {info['ram']['dirty-sync-count']} syncs "
          f"({mid['ram']['dirty-sync-count']} before raising the limits), {flushes} "
          f"MULTIFD_FLUSH, main channel {os.path.getsize(mains[0])} bytes, "
          f"channels {[os.path.getsize(p) for p in paths]}")
