"""Paused-guest integration matrix: real QEMU writes -> qemuram reads and checks;
qemuram writes -> real QEMU reads and checks.

The cases are defined in ``tests/integration/matrix.py``; ``proven_table.py``
turns a junit/json result of this file into the "proven" table. Every guest
is paused (-S) with deterministic planted patterns; memory is compared with
QMP ``pmemsave`` on the source and on every destination.

    python -m pytest tests/integration/test_matrix.py -n 2 -q

Without QEMU (or hugepages) the tests skip with a message naming what is
missing; with CI=true they fail instead (``harness.require``).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest

try:
    from . import harness as h
    from . import matrix as M
except ImportError:  # run outside the package layout
    from tests.integration import harness as h
    from tests.integration import matrix as M

import qemuram
from qemuram import io as qio
from qemuram.canonical import CanonicalWriter, write_atomic
from qemuram.errors import StreamError
from qemuram.framing import Decoder, encode_record
from qemuram.records import (CommandRecord, MappedRamArea, PageRun, RamBlockEntry, RamEos,
                             RamMemSize, SectionFooter, SectionHeader)
from qemuram.wire import RamFlag, SectionType

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MIN_QEMU = (10, 0)
TIMEOUT = 300.0


def _params(test: str):
    out = []
    for c in M.cases_for(test):
        marks = [pytest.mark.hugepages] if c.hugepages else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


# --------------------------------------------------------------------------
# Preconditions and resources
# --------------------------------------------------------------------------

def _qmp_importable() -> Tuple[bool, str]:
    try:
        ok = importlib.util.find_spec("qemu.qmp") is not None
    except (ImportError, ValueError):
        ok = False
    return ok, "pip install qemu.qmp"


def _require_qemu() -> None:
    h.require(h.qemu_available(MIN_QEMU), "qemu-system-x86_64 (QEMU >= 10.0)")
    h.require(_qmp_importable(), "Python package qemu.qmp")


def _wait_free_hugepages(page: int, nbytes: int, timeout: float = 120.0) -> None:
    """Wait (bounded) for reserved hugepages that another user is releasing."""
    try:
        with open(f"/sys/kernel/mm/hugepages/hugepages-{page >> 10}kB/nr_hugepages") as f:
            total = int(f.read())
    except (OSError, ValueError):
        return
    if h.hugetlbfs_mount(page) is None or total * page < nbytes:
        return                                  # not set up: nothing to wait for
    deadline = time.monotonic() + timeout
    while not h.hugepages_status(page, nbytes)[0] and time.monotonic() < deadline:
        time.sleep(0.5)


@contextlib.contextmanager
def backing(case: M.Case, guests: int):
    """Require the case's memory backend for ``guests`` concurrent guests.

    1 GiB-page cases hold ``matrix.hugetlb1g_lock`` for their whole run so
    parallel xdist workers never compete for the two 1 GiB pages.
    """
    need = case.memory * guests
    what = f"{case.backend} backing for {guests} x {case.memory >> 20} MiB guest(s)"
    if case.needs_1g_pages:
        with M.hugetlb1g_lock():
            _wait_free_hugepages(case.hugepage_size, need)
            h.require(h.backend_status(case.backend, need), what)
            yield
        return
    h.require(h.backend_status(case.backend, need), what)
    if case.dimms:
        h.require((os.path.isdir("/dev/shm"), "/dev/shm missing"),
                  "tmpfs /dev/shm for the shared file DIMM")
    yield


@pytest.fixture
def props(record_property):
    """Record facts about the run in the junit/json report (for proven_table)."""
    record_property("qemu_version", ".".join(map(str, h.qemu_version())) or "unknown")
    return record_property


# --------------------------------------------------------------------------
# Guests
# --------------------------------------------------------------------------

def _size_opt(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else str(n)


def dimm_args(case: M.Case, shm_dir: Optional[str]) -> List[str]:
    """-object/-device arguments of the case's DIMMs (explicit addresses).

    A file DIMM's mem-path is ``shm_dir/<id>``: the same path on source and
    destination, as x-ignore-shared requires for a block it does not send.
    """
    args: List[str] = []
    for d in case.dimms:
        share = "on" if d.share else "off"
        if d.backend == "file":
            obj = (f"memory-backend-file,id={d.block},size={_size_opt(d.size)},"
                   f"mem-path={os.path.join(shm_dir, d.id)},share={share}")
        elif d.backend == "memfd":
            obj = f"memory-backend-memfd,id={d.block},size={_size_opt(d.size)},share={share}"
        else:
            raise ValueError(f"unsupported DIMM backend {d.backend}")
        args += ["-object", obj, "-device", f"pc-dimm,id={d.id},memdev={d.block},addr={d.addr:#x}"]
    return args


def make_guest(case: M.Case, *, incoming: bool = False, plant: bool = True,
               shm_dir: Optional[str] = None) -> h.Guest:
    kwargs = {}
    if case.dimms:
        kwargs = dict(slots=len(case.dimms), maxmem=case.memory + h.GiB,
                      extra_args=dimm_args(case, shm_dir))
    planted = [(a, d) for _, a, d in M.planted_ranges(case)] if plant else []
    return h.Guest(case.machine, case.memory, case.backend, paused=True, incoming=incoming,
                   plant=planted, **kwargs)


def configure(guest: h.Guest, caps: Dict[str, bool], params: Dict[str, object]) -> None:
    guest.set_capabilities(caps)
    guest.set_parameters(params)


# --------------------------------------------------------------------------
# Memory snapshots and comparisons
# --------------------------------------------------------------------------

CHUNK = 32 << 20


def _as_array(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return np.frombuffer(x, dtype=np.uint8)


def assert_same(a, b, *, base: int, what: str, names=("a", "b")) -> None:
    """Equal byte ranges (numpy/memmap/bytes), chunk by chunk; says where they differ."""
    a, b = _as_array(a), _as_array(b)
    assert a.shape[0] == b.shape[0], f"{what}: sizes differ: {a.shape[0]:#x} vs {b.shape[0]:#x}"
    for i in range(0, a.shape[0], CHUNK):
        ca, cb = a[i:i + CHUNK], b[i:i + CHUNK]
        if not np.array_equal(ca, cb):
            raise AssertionError(f"{what}: " + h.describe_difference(
                ca.tobytes(), cb.tobytes(), base=base + i, names=names))


class Snapshot:
    """pmemsave of every RAM region of a case, kept in files under ``directory``."""

    def __init__(self, guest: h.Guest, case: M.Case, directory: Path, tag: str,
                 skip_blocks: Sequence[str] = ()):
        self.case = case
        self.files: Dict[M.Region, Path] = {}
        for r in M.ram_regions(case):
            if r.block in skip_blocks:
                continue
            path = directory / f"pmem-{tag}-{r.addr:x}.bin"
            guest.qmp("pmemsave", val=r.addr, size=r.length, filename=str(path),
                      _timeout=TIMEOUT)
            assert path.stat().st_size == r.length, f"pmemsave {r.addr:#x}: short file"
            self.files[r] = path

    def region(self, r: M.Region) -> np.ndarray:
        return np.memmap(self.files[r], dtype=np.uint8, mode="r")

    def read(self, addr: int, length: int) -> bytes:
        r = M.region_of(self.case, addr)
        off = addr - r.addr
        return self.region(r)[off:off + length].tobytes()

    def remove(self) -> None:
        for p in self.files.values():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def check_source_planted(guest: h.Guest, case: M.Case) -> None:
    for name, addr, data in M.planted_ranges(case):
        got = guest.pmemsave(addr, len(data))
        assert got == data, f"source pmemsave of planted {name}: " + h.describe_difference(
            got, data, base=addr, names=("pmemsave", "planted"))


def check_decoded(st, case: M.Case, snap: Snapshot, skip_blocks: Sequence[str] = ()) -> None:
    """Decoded memory == the source's pmemsave: planted ranges and whole regions."""
    for name, addr, data in M.planted_ranges(case):
        r = M.region_of(case, addr)
        if r.block in skip_blocks:
            continue
        blk = st.ram[r.block]
        got = blk.read(r.block_offset + addr - r.addr, len(data))
        assert got == snap.read(addr, len(data)) == data, \
            f"decoded planted {name} ({r.block}): " + h.describe_difference(
                got, data, base=addr, names=("decoded", "planted"))
    for r, path in snap.files.items():
        if r.block in skip_blocks:
            continue
        blk = st.ram[r.block]
        assert blk.size >= r.block_offset + r.length, f"block {r.block} too small"
        assert_same(blk.array()[r.block_offset:r.block_offset + r.length], snap.region(r),
                    base=r.addr, what=f"decoded {r.block} vs pmemsave",
                    names=("decoded", "pmemsave"))


def load_and_check(case: M.Case, stream: Path, snap: Snapshot, tmp_path: Path, tag: str, *,
                   caps: Optional[Dict[str, bool]] = None,
                   params: Optional[Dict[str, object]] = None,
                   shm_dir: Optional[str] = None, uri: Optional[str] = None) -> dict:
    """Load ``stream`` in a fresh destination; its memory must equal ``snap``."""
    with make_guest(case, incoming=True, plant=False, shm_dir=shm_dir) as dst:
        configure(dst, case.caps if caps is None else caps,
                  case.params if params is None else params)
        dst.migrate_incoming(uri or f"file:{stream}")
        info = dst.wait_incoming(TIMEOUT)
        for r, _ in snap.files.items():
            path = tmp_path / f"pmem-{tag}-{r.addr:x}.bin"
            dst.qmp("pmemsave", val=r.addr, size=r.length, filename=str(path),
                    _timeout=TIMEOUT)
            try:
                assert_same(np.memmap(path, dtype=np.uint8, mode="r"), snap.region(r),
                            base=r.addr, what=f"{tag}: destination vs source ({r.block})",
                            names=("destination", "source"))
            finally:
                path.unlink()
        return info


# --------------------------------------------------------------------------
# Capturing QEMU streams
# --------------------------------------------------------------------------

def capture_file(case: M.Case, tmp_path: Path, name: str, *,
                 caps: Optional[Dict[str, bool]] = None,
                 params: Optional[Dict[str, object]] = None,
                 shm_dir: Optional[str] = None, snapshot: bool = True,
                 skip_blocks: Sequence[str] = ()) -> Tuple[Path, Optional[Snapshot]]:
    """A source guest saved with ``migrate file:``; returns (stream, pmemsave snapshot)."""
    path = tmp_path / f"{name}.mig"
    snap = None
    try:
        with make_guest(case, shm_dir=shm_dir) as src:
            if snapshot:
                check_source_planted(src, case)
                snap = Snapshot(src, case, tmp_path, name, skip_blocks)
            configure(src, case.caps if caps is None else caps,
                      case.params if params is None else params)
            src.save(str(path), timeout=TIMEOUT)
    except BaseException:
        if snap is not None:
            snap.remove()       # up to 1 GiB per region
        raise
    return path, snap


def capture_relay(case: M.Case, tmp_path: Path, name: str, *,
                  snapshot: bool = True) -> Tuple[Path, Optional[Snapshot], int]:
    """Source -> recording Relay -> destination (both with the case's settings).

    Returns (recorded source-to-destination bytes, source snapshot, bytes that
    went back on the return path). The first destination is checked too.
    """
    path = tmp_path / f"{name}.mig"
    snap = None
    try:
        with make_guest(case) as src, make_guest(case, incoming=True, plant=False) as dst:
            if snapshot:
                check_source_planted(src, case)
                snap = Snapshot(src, case, tmp_path, name)
            for g in (src, dst):
                configure(g, case.caps, case.params)
            dst.migrate_incoming(f"unix:{os.path.join(dst.tmpdir, 'incoming.sock')}")
            with h.Relay(dst.incoming_uri(), record=str(path), timeout=TIMEOUT) as relay:
                src.migrate(relay.uri)
                src.wait_migration(TIMEOUT)
                dst.wait_incoming(TIMEOUT)
                assert relay.wait(60), f"relay did not finish: {relay.errors}"
                assert not relay.errors, relay.errors
                returned = relay.returned
            for pname, addr, data in M.planted_ranges(case):
                got = dst.pmemsave(addr, len(data))
                assert got == data, f"relay destination: planted {pname}: " + \
                    h.describe_difference(got, data, base=addr)
    except BaseException:
        if snap is not None:
            snap.remove()
        raise
    return path, snap, returned


# --------------------------------------------------------------------------
# Canonical re-encoding and stream comparison
# --------------------------------------------------------------------------

def write_canonical(st, path: Path, **kw) -> Path:
    writer = CanonicalWriter(st, **kw)
    write_atomic(str(path), writer.write)
    return path


def first_file_difference(a: Path, b: Path) -> Optional[int]:
    """Offset of the first differing byte of two files (None when equal, like cmp)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if ca != cb:
                n = min(len(ca), len(cb))
                off = h.first_difference(ca[:n], cb[:n])
                return pos + (n if off is None else off)
            if not ca:
                return None
            pos += len(ca)


RAM_RECORD_TYPES = ("PageRun", "MappedRamArea", "RamMemSize", "RamBlockEntry",
                    "RamMultifdFlush")


def record_atoms(path: Path, ram_only: bool = False) -> list:
    """The stream as a list of (record type, block, page offset[, page hash]) and
    exact bytes of every non-page record, ignoring where ram PART/END sections
    begin and end (their headers, footers and EOS markers are dropped).

    Consecutive mapped-ram area chunks of a block are joined into one atom (their
    chunking depends on read sizes). ``ram_only`` keeps only RAM records.
    """
    atoms: list = []
    area = None                        # [block, start offset, hash] being joined
    with open(path, "rb") as f:
        vm = qio.read_vmdesc_ahead(f, 0)
        dec = Decoder(vmdesc=vm) if vm is not None else Decoder()
        ram_sid = None
        in_iter = False
        for rec in qio.iter_records(f, decoder=dec):
            if isinstance(rec, SectionHeader):
                if rec.idstr == "ram" and rec.kind == SectionType.START:
                    ram_sid = rec.section_id
                elif rec.section_id == ram_sid and rec.kind in (SectionType.PART,
                                                               SectionType.END):
                    in_iter = True
                    continue
            elif isinstance(rec, SectionFooter) and in_iter and rec.section_id == ram_sid:
                in_iter = False
                continue
            elif isinstance(rec, RamEos) and in_iter:
                continue
            if isinstance(rec, MappedRamArea):
                if area is None or area[0] != rec.block:
                    area = [rec.block, rec.offset, hashlib.blake2b(digest_size=16)]
                    atoms.append(area)
                area[2].update(np.asarray(rec.data, dtype=np.uint8).tobytes())
                continue
            area = None
            if ram_only and type(rec).__name__ not in RAM_RECORD_TYPES:
                continue
            if isinstance(rec, PageRun):
                offs = np.asarray(rec.page_offsets).tolist()
                if rec.kind == RamFlag.ZERO:
                    atoms += [("ZERO", rec.block, o) for o in offs]
                else:
                    data = np.asarray(rec.data)
                    atoms += [("PAGE", rec.block, o,
                               hashlib.blake2b(data[i].tobytes(), digest_size=16).digest())
                              for i, o in enumerate(offs)]
                continue
            atoms.append((type(rec).__name__, bytes(encode_record(rec, dec.page_size))))
    return [("MappedRamArea", a[0], a[1], a[2].digest()) if isinstance(a, list) else a
            for a in atoms]


def assert_same_ram_records(a: Path, b: Path, what: str) -> None:
    """Equal RAM records (block lists, pages, mapped-ram areas), device state aside."""
    ra, rb = record_atoms(a, ram_only=True), record_atoms(b, ram_only=True)
    if ra != rb:
        i = next((k for k, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
        show = lambda atoms: repr(atoms[i])[:200] if i < len(atoms) else "<end>"  # noqa: E731
        raise AssertionError(f"{what}: RAM records differ at #{i} of {len(ra)}/{len(rb)}: "
                             f"{show(ra)} vs {show(rb)}")


def assert_canonical_matches(canon: Path, original: Path) -> str:
    """Byte equality, else record equality ignoring PART section boundaries.

    Returns "bytes" or "records" (which one held).
    """
    off = first_file_difference(canon, original)
    if off is None:
        return "bytes"
    a, b = record_atoms(canon), record_atoms(original)
    if a == b:
        return "records"
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    show = lambda atoms: repr(atoms[i])[:160] if i < len(atoms) else "<end>"  # noqa: E731
    raise AssertionError(
        f"canonical re-encode differs from QEMU's stream: first byte difference at "
        f"{off:#x} (sizes {canon.stat().st_size} vs {original.stat().st_size}); records "
        f"differ too at record #{i}: canonical {show(a)} vs QEMU {show(b)}")


def open_verified(path: Path):
    st = qemuram.open(str(path), verify=True)
    assert st.roundtrip is True, (f"{path.name}: re-encoding differs from the input at byte "
                                  f"{st.roundtrip_mismatch}")
    return st


# --------------------------------------------------------------------------
# 1. paused guest: each backend x machine
# --------------------------------------------------------------------------

@pytest.mark.parametrize("case", _params("test_paused"))
def test_paused(case: M.Case, tmp_path: Path, props) -> None:
    _require_qemu()
    with backing(case, guests=1):
        stream, snap = capture_file(case, tmp_path, "qemu")
        try:
            with open_verified(stream) as st:
                assert st.format == "sequential" and st.capabilities == []
                check_decoded(st, case, snap)
                pc_ram = st.ram["pc.ram"]
                assert pc_ram.size == case.memory
                assert pc_ram.host_page_size is None  # no postcopy advise: no field
                assert pc_ram.sent.all(), "a paused save sends every page of pc.ram"
                canon = write_canonical(st, tmp_path / "canonical.mig", layout="sequential")
            props("canonical_match", assert_canonical_matches(canon, stream))
            props("proven", M.QEMU_TO_QEMURAM)
            stream.unlink()
            load_and_check(case, canon, snap, tmp_path, "dst")
            props("proven", M.QEMURAM_TO_QEMU)
        finally:
            snap.remove()


# --------------------------------------------------------------------------
# 2. mapped-ram (+ multifd): byte-equal canonical file, conversions both ways
# --------------------------------------------------------------------------

def _same_blocks(a, b, what: str) -> None:
    assert list(a.ram) == list(b.ram), f"{what}: block lists differ"
    for name, ba in a.ram.items():
        bb = b.ram[name]
        assert ba.size == bb.size, f"{what}: {name} sizes differ"
        assert_same(ba.array(), bb.array(), base=0, what=f"{what}: block {name}",
                    names=("a", "b"))


@pytest.mark.parametrize("case", _params("test_mapped_ram"))
def test_mapped_ram(case: M.Case, tmp_path: Path, props) -> None:
    _require_qemu()
    with backing(case, guests=1):
        qemu_mr, snap = capture_file(case, tmp_path, "qemu-mapped")
        try:
            # a second source guest with the same planted data, saved sequentially
            qemu_seq, snap_seq = capture_file(case, tmp_path, "qemu-seq", caps={}, params={})
            for r in snap.files:
                assert_same(snap_seq.region(r), snap.region(r), base=r.addr,
                            what="the two source guests' memory", names=("seq", "mapped"))
            snap_seq.remove()

            with open_verified(qemu_mr) as mr, open_verified(qemu_seq) as seq:
                assert mr.format == "mapped-ram" and "mapped-ram" in mr.capabilities
                check_decoded(mr, case, snap)
                check_decoded(seq, case, snap)
                canon = write_canonical(mr, tmp_path / "canonical-mapped.mig",
                                        layout="mapped-ram")
                off = first_file_difference(canon, qemu_mr)
                assert off is None, (f"canonical mapped-ram file differs from QEMU's at byte "
                                     f"{off:#x} (cmp)")
                props("canonical_match", "bytes")
                props("proven", M.QEMU_TO_QEMURAM)
                to_mapped = write_canonical(seq, tmp_path / "seq-to-mapped.mig",
                                            layout="mapped-ram")
                to_seq = write_canonical(mr, tmp_path / "mapped-to-seq.mig",
                                         layout="sequential")
            # conversions decode to the same memory as QEMU's own files
            # conversions: the same memory and the same RAM records as QEMU's own
            # file of the other layout (device state comes from another guest)
            with open_verified(to_mapped) as a, open_verified(qemu_mr) as b:
                assert a.format == "mapped-ram" and a.capabilities == b.capabilities
                _same_blocks(a, b, "sequential->mapped-ram vs QEMU mapped-ram")
            assert_same_ram_records(to_mapped, qemu_mr,
                                    "sequential->mapped-ram vs QEMU mapped-ram")
            with open_verified(to_seq) as a, open_verified(qemu_seq) as b:
                assert a.format == "sequential" and a.capabilities == []
                _same_blocks(a, b, "mapped-ram->sequential vs QEMU sequential")
            assert_same_ram_records(to_seq, qemu_seq, "mapped-ram->sequential vs QEMU sequential")
            qemu_seq.unlink()

            load_and_check(case, canon, snap, tmp_path, "dst-canonical")
            props("proven", M.QEMURAM_TO_QEMU)
            load_and_check(case, to_mapped, snap, tmp_path, "dst-seq-to-mapped")
            props("proven", M.SEQ_TO_MAPPED)
            load_and_check(case, to_seq, snap, tmp_path, "dst-mapped-to-seq", caps={},
                           params={})
            props("proven", M.MAPPED_TO_SEQ)
        finally:
            snap.remove()


# --------------------------------------------------------------------------
# 3. postcopy-ram advised streams through the recording relay
# --------------------------------------------------------------------------

@pytest.mark.parametrize("case", _params("test_postcopy"))
def test_postcopy(case: M.Case, tmp_path: Path, props) -> None:
    _require_qemu()
    with backing(case, guests=2):
        recorded, snap, returned = capture_relay(case, tmp_path, "relay")
        try:
            assert returned > 0, "the return path was not used"
            with open_verified(recorded) as st:
                assert st.postcopy_advise is not None, "no POSTCOPY_ADVISE decoded"
                assert "postcopy-ram" not in st.capabilities  # not a config capability
                pc_ram = st.ram["pc.ram"]
                assert pc_ram.host_page_size == case.hugepage_size, \
                    f"pc.ram host page size field: {pc_ram.host_page_size!r}"
                for name, b in st.ram.items():
                    if name != "pc.ram":
                        assert b.host_page_size is None, f"{name}: {b.host_page_size!r}"
                # the advise's summary of host page sizes: OR of all of them
                assert st.postcopy_advise[0] == (case.hugepage_size or 0) | 4096
                assert st.postcopy_advise[1] == 4096
                check_decoded(st, case, snap)
                canon = write_canonical(st, tmp_path / "canonical.mig")
            props("canonical_match", assert_canonical_matches(canon, recorded))
            props("proven", M.QEMU_TO_QEMURAM)
            recorded.unlink()
            # The re-encoded stream has POSTCOPY_ADVISE; a destination with
            # postcopy-ram accepts it from a file when postcopy never starts.
            load_and_check(case, canon, snap, tmp_path, "dst")
            props("proven", M.QEMURAM_TO_QEMU)
        finally:
            snap.remove()


# --------------------------------------------------------------------------
# 4a. x-ignore-shared: a shared file DIMM (skipped) and a shared memfd DIMM (sent)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("case", _params("test_ignore_shared"))
def test_ignore_shared(case: M.Case, tmp_path: Path, props) -> None:
    _require_qemu()
    with backing(case, guests=2):
        shm_dir = tempfile.mkdtemp(prefix="qemuram-matrix-", dir="/dev/shm")
        snap = None
        try:
            skipped = [d for d in case.dimms if d.backend == "file" and d.share]
            sent = [d for d in case.dimms if d not in skipped]
            assert skipped and sent
            stream, snap = capture_file(case, tmp_path, "qemu", shm_dir=shm_dir)
            with open_verified(stream) as st:
                assert st.capabilities == ["x-ignore-shared"]
                for d in case.dimms:
                    b = st.ram[d.block]
                    assert b.size == d.size
                    # QEMU sends the block's MemoryRegion address: the offset in
                    # the device-memory region, which starts at 4 GiB here.
                    assert b.addr == d.addr - M.DEVICE_MEMORY_BASE, \
                        f"{d.block}: address {b.addr!r}"
                for d in skipped:
                    b = st.ram[d.block]
                    assert not b.sent.any() and sum(b.counts.values()) == 0, \
                        f"{d.block} (shared file) has page records: {b.counts}"
                for d in sent:
                    b = st.ram[d.block]
                    assert b.sent.all(), f"{d.block} (memfd) not fully sent"
                    assert b.counts["page"] + b.counts["zero"] == d.size // M.PAGE, b.counts
                    assert b.counts["page"] >= 3, b.counts  # the planted pages
                main = st.ram["pc.ram"]
                assert main.sent.all() and main.addr == 0
                # memory of the memfd DIMM (and main RAM) vs pmemsave; the
                # file DIMM's content is not in the stream.
                check_decoded(st, case, snap, skip_blocks=[d.block for d in skipped])
                canon = write_canonical(st, tmp_path / "canonical.mig")
                # QEMU split this stream's pages over two PART sections; a compact
                # re-encode (one PART) is still record-equal (checks the fallback)
                compact = write_canonical(st, tmp_path / "compact.mig", compact=True)
            assert assert_canonical_matches(compact, stream) in ("bytes", "records")
            props("canonical_match", assert_canonical_matches(canon, stream))
            props("proven", M.QEMU_TO_QEMURAM)
            # destination: same shared file for dimm0, x-ignore-shared on
            load_and_check(case, canon, snap, tmp_path, "dst", shm_dir=shm_dir)
            props("proven", M.QEMURAM_TO_QEMU)
        finally:
            if snap is not None:
                snap.remove()
            shutil.rmtree(shm_dir, ignore_errors=True)


# --------------------------------------------------------------------------
# 4b. zero-page-detection none: full pages instead of ZERO records
# --------------------------------------------------------------------------

@pytest.mark.parametrize("case", _params("test_zero_none"))
def test_zero_none(case: M.Case, tmp_path: Path, props) -> None:
    _require_qemu()
    with backing(case, guests=1):
        stream, snap = capture_file(case, tmp_path, "qemu")
        try:
            with open_verified(stream) as st:
                for name, b in st.ram.items():
                    assert b.counts["zero"] == 0, f"{name}: ZERO records {b.counts}"
                pc_ram = st.ram["pc.ram"]
                assert pc_ram.sent.all()
                assert pc_ram.counts["page"] >= case.memory // M.PAGE
                check_decoded(st, case, snap)
                writer_default = CanonicalWriter(st)
                assert writer_default.zero_pages == "full"
                canon = write_canonical(st, tmp_path / "canonical.mig", zero_pages="full")
            props("canonical_match", assert_canonical_matches(canon, stream))
            props("proven", M.QEMU_TO_QEMURAM)
            stream.unlink()
            load_and_check(case, canon, snap, tmp_path, "dst")
            props("proven", M.QEMURAM_TO_QEMU)
            canon.unlink()
        finally:
            snap.remove()


# --------------------------------------------------------------------------
# 5. bad streams into qemuram
# --------------------------------------------------------------------------

def _write_sparse(path: Path, data, patch: Optional[Tuple[int, int]] = None) -> None:
    """Write ``data`` leaving all-zero MiB chunks as holes (mapped-ram files are
    sparse; so are zero-page-detection=none streams mostly), then apply
    ``patch`` = (offset, new byte value)."""
    step = 1 << 20
    arr = np.frombuffer(data, dtype=np.uint8)
    with open(path, "wb") as f:
        for i in range(0, arr.shape[0], step):
            chunk = arr[i:i + step]
            if chunk.any():
                f.seek(i)
                f.write(chunk.tobytes())
        f.truncate(arr.shape[0])
        if patch is not None:
            f.seek(patch[0])
            f.write(bytes([patch[1]]))


def _structure(path: Path) -> Dict[str, list]:
    """Record offsets (and a few details) of a valid stream, by record type."""
    out: Dict[str, list] = {}
    with open(path, "rb") as f:
        for rec in qemuram.iter_records(f):
            key = type(rec).__name__
            info = {"offset": rec.offset}
            if isinstance(rec, SectionHeader):
                info.update(kind=rec.kind, idstr=rec.idstr)
            elif isinstance(rec, PageRun):
                info.update(kind=rec.kind, block=rec.block, named=rec.named)
            elif isinstance(rec, RamBlockEntry):
                info.update(name=rec.block.name)
            elif isinstance(rec, RamMemSize):
                info.update(blocks=[(b.name, b.host_page_size, b.addr) for b in rec.blocks])
            elif isinstance(rec, CommandRecord):
                info.update(cmd=rec.name)
            out.setdefault(key, []).append(info)
        # where each block's postcopy host page size field is: MEM_SIZE header
        # (be64), then per block: idstr length, idstr, be64 length, [be64 page
        # size], [be64 address (x-ignore-shared)]
        for m in out.get("RamMemSize", []):
            f.seek(m["offset"])
            head = f.read(64 << 10)
            pos, m["hps_fields"] = 8, {}
            for name, hps, addr in m["blocks"]:
                pos += 1 + len(name) + 8
                if hps:
                    assert int.from_bytes(head[pos:pos + 8], "big") == hps
                    m["hps_fields"][name] = m["offset"] + pos
                    pos += 8
                if addr is not None:
                    pos += 8
    return out


def truncation_offsets(size: int, s: Dict[str, list], want: int = 20) -> List[int]:
    """~``want`` truncation points: structural ones plus evenly spaced fill.

    Never ``eof + 1``: a stream that ends right after its EOF byte is a valid
    stream without the optional vmdesc trailer.
    """
    eof = s["EndOfStream"][0]["offset"]
    first = lambda key, add: s[key][0]["offset"] + add if key in s else None  # noqa: E731
    ram_start = next(x["offset"] for x in s["SectionHeader"] if x["idstr"] == "ram")
    pts = {1, 4, 8, 12, ram_start + 1, eof, size - 1,
           first("Configuration", 5), first("RamMemSize", 9), first("PageRun", 3),
           first("PageRun", 40), first("MappedRamArea", 4096 + 17), first("CommandRecord", 2),
           first("OpaquePayload", 9)}
    if "VMDescription" in s:
        vd = s["VMDescription"][0]["offset"]
        pts |= {vd + 3, (vd + size) // 2}
    pts.discard(None)
    fill = max(want - len(pts), 4)
    pts |= {ram_start + (eof - ram_start) * k // (fill + 1) for k in range(1, fill + 1)}
    return sorted(p for p in pts if 0 < p < size and p != eof + 1)


def byte_flips(s: Dict[str, list]) -> List[Tuple[str, int, int]]:
    """(what, offset, new byte value) structural corruptions that make a stream invalid."""
    out = [("magic Q->q", 0, ord("q")), ("format version 3->4", 7, 4)]
    ram_start = next(x["offset"] for x in s["SectionHeader"] if x["idstr"] == "ram")
    out.append(("ram START section type 0x01->0x0f", ram_start, 0x0F))
    out.append(("first section footer 0x7e->0x7f", s["SectionFooter"][0]["offset"], 0x7F))
    out.append(("EOF byte 0x00->0x55", s["EndOfStream"][0]["offset"], 0x55))
    if "CommandRecord" in s:  # 0x08, be16 command number
        out.append(("command number ->0x7f", s["CommandRecord"][0]["offset"] + 2, 0x7F))
    zero = [x for x in s.get("PageRun", []) if x["kind"] == RamFlag.ZERO and x["named"]]
    if zero:
        o, blk = zero[0]["offset"], zero[0]["block"]
        out.append(("ZERO record flags -> ZERO|PAGE", o + 7, 0x0A))
        out.append(("ZERO record fill byte 0->1", o + 8 + 1 + len(blk), 0x01))
        out.append(("record block name first char", o + 8 + 1, ord("X")))
    page = [x for x in s.get("PageRun", []) if x["kind"] == RamFlag.PAGE]
    if page:
        out.append(("PAGE record flags -> bit 0x01 (obsolete FULL)", page[0]["offset"] + 7,
                    0x09 | (0x20 if not page[0]["named"] else 0)))
    for m in s.get("RamMemSize", []):
        for name, hps, _ in m["blocks"]:
            if hps:  # postcopy: be64 page size after the block's be64 length
                field = m["hps_fields"][name]
                out.append((f"{name} host page size field {hps:#x}->non-power-of-two",
                            field + 5, ((hps >> 16) & 0xFF) | 0x10))
    if "RamBlockEntry" in s:  # mapped-ram: len byte, idstr, be64 size, header (be32 version)
        e = s["RamBlockEntry"][0]
        out.append(("mapped-ram block idstr length", e["offset"], 0xFF))
        out.append(("mapped-ram header version 1->0x7f",
                    e["offset"] + 1 + len(e["name"]) + 8 + 3, 0x7F))
    return out


#: bytecode cache for the CLI subprocesses (PYTHONDONTWRITEBYTECODE would make
#: every run recompile qemuram); outside the repository.
PYCACHE = os.path.join(tempfile.gettempdir(), "qemuram-matrix-pycache")


def _cli(args: Sequence[str], tmpdir: Path) -> subprocess.CompletedProcess:
    """``python -m qemuram.cli ARGS`` with TMPDIR=tmpdir."""
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONPYCACHEPREFIX=PYCACHE,
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO),
                                                      os.environ.get("PYTHONPATH")) if p))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return subprocess.run([sys.executable, "-m", "qemuram.cli", *args], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=300)


def _cli_inprocess(args: Sequence[str], tmpdir: Path) -> subprocess.CompletedProcess:
    """``qemuram.cli.main(ARGS)`` in this process (tempfile's directory = tmpdir);
    an exception escaping main() is reported as a traceback, as Python would."""
    from qemuram import cli
    out, err = io.StringIO(), io.StringIO()
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmpdir)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(list(args))
    except BaseException:  # noqa: BLE001 - what the interpreter would print
        rc = 1
        err.write("Traceback (most recent call last) [escaped main()]:\n"
                  + traceback.format_exc())
    finally:
        tempfile.tempdir = saved
    return subprocess.CompletedProcess(["qemuram.cli.main", *args], rc, out.getvalue(),
                                       err.getvalue())


def _cli_check(cmd: str, what: str, path: Path, work: Path,
               runner=_cli) -> Optional[str]:
    """Run ``qemuram verify`` / ``qemuram extract`` on a bad stream; a problem or None.

    Exit status 1, an error message, no traceback; nothing left in TMPDIR
    and, for extract, nothing in the fresh output directory's parent.
    """
    tmpdir = work / "tmp"
    parent = work / "extract"
    tmpdir.mkdir(parents=True)
    parent.mkdir()
    args = ["verify", str(path)] if cmd == "verify" else \
        ["extract", str(path), "-o", str(parent / "out")]
    r = runner(args, tmpdir)
    left = sorted(os.listdir(tmpdir)) + sorted(os.listdir(parent))
    expect = "INVALID" if cmd == "verify" else "invalid stream"
    problem = None
    if r.returncode != 1 or "Traceback" in r.stderr or expect not in r.stderr or left:
        how = "python -m qemuram.cli" if runner is _cli else "qemuram.cli.main"
        problem = (f"{what}: {how} {cmd} exit {r.returncode}"
                   + (f", left {left}" if left else "") + ": "
                   + (r.stderr or r.stdout).strip()[-600:])
    shutil.rmtree(work, ignore_errors=True)
    return problem


#: Run ``qemuram extract`` on every n-th bad input (it costs one Python start each).
EXTRACT_EVERY = 8


@pytest.mark.parametrize("case", _params("test_bad_streams"))
def test_bad_streams(case: M.Case, tmp_path: Path, props) -> None:
    _require_qemu()
    src_case = M.BY_ID[case.of]
    with backing(src_case, guests=2 if src_case.transport == "relay" else 1):
        shm_dir = None
        try:
            if src_case.transport == "relay":
                stream, _, _ = capture_relay(src_case, tmp_path, "good", snapshot=False)
            else:
                if src_case.dimms:
                    shm_dir = tempfile.mkdtemp(prefix="qemuram-matrix-", dir="/dev/shm")
                stream, _ = capture_file(src_case, tmp_path, "good", shm_dir=shm_dir,
                                         snapshot=False)
        finally:
            if shm_dir:
                shutil.rmtree(shm_dir, ignore_errors=True)
    good = _cli(["verify", str(stream)], tmp_path)
    assert good.returncode == 0, f"the intact stream does not verify: {good.stderr}"

    data = stream.read_bytes()
    s = _structure(stream)
    bad: List[Tuple[str, Path]] = []
    for off in truncation_offsets(len(data), s):
        path = tmp_path / f"bad-{len(bad):02d}.mig"
        _write_sparse(path, memoryview(data)[:off])
        bad.append((f"truncated at {off:#x} of {len(data):#x}", path))
    for what, off, value in byte_flips(s):
        assert data[off] != value, f"flip {what}: byte already {value:#x}"
        path = tmp_path / f"bad-{len(bad):02d}.mig"
        _write_sparse(path, data, patch=(off, value))
        bad.append((f"byte {off:#x} {data[off]:#04x}->{value:#04x} ({what})", path))
    del data
    assert len(bad) >= 25

    failures: List[str] = []
    errors: Dict[str, int] = {}
    # library: a StreamError subclass, nothing else
    for what, path in bad:
        try:
            with qemuram.open(str(path), verify=True) as st:
                failures.append(f"{what}: qemuram.open accepted it (roundtrip={st.roundtrip})")
        except StreamError as err:
            errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
        except Exception as err:  # noqa: BLE001 - anything else is a bug
            failures.append(f"{what}: qemuram.open raised {type(err).__name__}: {err}")
    # CLI in this process (main()): verify and extract on every bad input
    for i, (what, path) in enumerate(bad):
        for cmd in ("verify", "extract"):
            p = _cli_check(cmd, what, path, tmp_path / f"main-{cmd}-{i}", _cli_inprocess)
            if p:
                failures.append(p)
    # the real CLI (python -m qemuram.cli): verify on every bad input, extract
    # on some (one interpreter start each); two at a time
    jobs = [("verify", what, path) for what, path in bad]
    jobs += [("extract", what, path) for i, (what, path) in enumerate(bad)
             if i % EXTRACT_EVERY == 0 or i >= len(bad) - 2]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(lambda j: _cli_check(j[0], j[1], j[2],
                                                tmp_path / f"cli-{j[0]}-{j[2].stem}"), jobs)
        failures += [p for p in results if p]
    for _, path in bad:
        path.unlink()
    props("bad_inputs", f"{len(bad)} ({len(jobs)} CLI runs): "
          + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())))
    assert not failures, f"{len(failures)} problems with {len(bad)} bad inputs:\n" + \
        "\n".join(failures)
    props("proven", M.CORRUPT_TO_QEMURAM)
