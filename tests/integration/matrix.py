"""Case definitions of the paused-guest integration matrix (real QEMU <-> qemuram).

Importable without QEMU or pytest: ``tests/integration/test_matrix.py`` turns
every ``Case`` into one parametrized test, and ``proven_table.py`` joins the
same definitions with a pytest result file to print which cases are proven.

Families (``Case.family``) and the test function that runs them:

  paused         test_paused         a paused guest saved with ``migrate file:``
                                     for each memory backend x machine
  mapped-ram     test_mapped_ram     mapped-ram (optionally + multifd) files,
                                     and sequential <-> mapped-ram conversions
  postcopy       test_postcopy       postcopy-ram advised streams captured through
                                     the recording Relay on 4 KiB / 2 MiB / 1 GiB
                                     backings
  ignore-shared  test_ignore_shared  x-ignore-shared with a shared file DIMM (not
                                     sent) and a shared memfd DIMM (sent)
  zero-none      test_zero_none      zero-page-detection=none (full zero pages)
  bad-streams    test_bad_streams    truncated / byte-flipped copies of one stream
                                     of each family above, into qemuram

Every case's guest is paused (-S: its CPUs never run) and gets the same
deterministic planted patterns (``planted_ranges``).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import struct
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096

#: Arrow labels used in ``Case.directions`` (and in the proven table).
QEMU_TO_QEMURAM = "QEMU→qemuram"
QEMURAM_TO_QEMU = "qemuram→QEMU"
SEQ_TO_MAPPED = "sequential→mapped-ram→QEMU"
MAPPED_TO_SEQ = "mapped-ram→sequential→QEMU"
CORRUPT_TO_QEMURAM = "corrupted QEMU stream→qemuram (rejects)"

#: Huge page size by backend kind (the harness's ``hugetlb2m``/``hugetlb1g``).
HUGE_PAGE = {"hugetlb2m": 2 * MiB, "hugetlb1g": 1 * GiB}

#: Guest-physical address of the first DIMM in the x-ignore-shared cases: the
#: start of the device-memory region of a pc/q35 guest with < 3.5 GiB of RAM.
DEVICE_MEMORY_BASE = 0x1_0000_0000


@dataclass(frozen=True)
class DimmSpec:
    """A pc-dimm of the x-ignore-shared cases (placed at an explicit address)."""
    id: str
    size: int
    backend: str          # "file" (memory-backend-file on tmpfs) or "memfd"
    share: bool
    addr: int

    @property
    def block(self) -> str:
        return f"{self.id}-mem"


@dataclass(frozen=True)
class Case:
    """One row of the matrix.

    ``capabilities`` / ``parameters`` are the migration settings of the source
    (and of every destination, which needs the same ones to accept the stream).
    ``transport`` is "file" (``migrate file:``) or "relay" (QEMU -> recording
    Relay -> destination QEMU, with a return path). ``of`` names, for a
    bad-streams case, the case whose stream is corrupted.
    """
    id: str
    family: str
    test: str
    machine: str
    backend: str = "default"
    memory: int = 64 * MiB
    capabilities: Tuple[str, ...] = ()
    parameters: Tuple[Tuple[str, object], ...] = ()
    dimms: Tuple[DimmSpec, ...] = ()
    transport: str = "file"
    directions: Tuple[str, ...] = (QEMU_TO_QEMURAM, QEMURAM_TO_QEMU)
    of: Optional[str] = None
    notes: str = ""

    @property
    def node_name(self) -> str:
        """The pytest test name (``test_x[id]``) as it appears in junit/json reports."""
        return f"{self.test}[{self.id}]"

    @property
    def hugepage_size(self) -> Optional[int]:
        return HUGE_PAGE.get(self.backend)

    @property
    def hugepages(self) -> bool:
        return self.hugepage_size is not None

    @property
    def needs_1g_pages(self) -> bool:
        return self.backend == "hugetlb1g"

    @property
    def caps(self) -> Dict[str, bool]:
        return {c: True for c in self.capabilities}

    @property
    def params(self) -> Dict[str, object]:
        return dict(self.parameters)

    @property
    def settings_text(self) -> str:
        """Capabilities and parameters as one short string for tables."""
        parts = list(self.capabilities)
        parts += [f"{k}={v}" for k, v in self.parameters]
        return ", ".join(parts) or "—"


# --------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------

#: Backends of the paused family; hugetlb1g is q35 only (two 1 GiB pages exist).
PAUSED_BACKENDS = ("default", "ram", "memfd", "file", "hugetlb2m")


def _paused_cases() -> List[Case]:
    out = []
    for machine in ("q35", "pc"):
        for backend in PAUSED_BACKENDS:
            out.append(Case(id=f"{machine}-{backend}", family="paused", test="test_paused",
                            machine=machine, backend=backend))
    out.append(Case(id="q35-hugetlb1g", family="paused", test="test_paused",
                    machine="q35", backend="hugetlb1g", memory=1 * GiB,
                    notes="1 GiB RAM on one 1 GiB page; serialized by a file lock"))
    return out


def _mapped_ram_cases() -> List[Case]:
    out = []
    for machine in ("q35", "pc"):
        out.append(Case(id=f"{machine}-mapped-ram", family="mapped-ram",
                        test="test_mapped_ram", machine=machine,
                        capabilities=("mapped-ram",),
                        directions=(QEMU_TO_QEMURAM, QEMURAM_TO_QEMU, SEQ_TO_MAPPED,
                                    MAPPED_TO_SEQ)))
    out.append(Case(id="q35-mapped-ram-multifd", family="mapped-ram", test="test_mapped_ram",
                    machine="q35", capabilities=("mapped-ram", "multifd"),
                    parameters=(("multifd-channels", 2),),
                    directions=(QEMU_TO_QEMURAM, QEMURAM_TO_QEMU, SEQ_TO_MAPPED,
                                MAPPED_TO_SEQ)))
    return out


def _postcopy_cases() -> List[Case]:
    out = []
    for backend, memory, label in (("default", 64 * MiB, "4k"), ("hugetlb2m", 64 * MiB, "2m"),
                                   ("hugetlb1g", 1 * GiB, "1g")):
        out.append(Case(id=f"q35-postcopy-{label}", family="postcopy", test="test_postcopy",
                        machine="q35", backend=backend, memory=memory,
                        capabilities=("postcopy-ram",), transport="relay",
                        notes="advised, completed as precopy; re-encoded stream fed "
                              "to the destination with migrate-incoming file:"))
    return out


IGNORE_SHARED_DIMMS = (
    DimmSpec("dimm0", 32 * MiB, "file", True, DEVICE_MEMORY_BASE),
    DimmSpec("dimm1", 32 * MiB, "memfd", True, DEVICE_MEMORY_BASE + 32 * MiB),
)


def _other_cases() -> List[Case]:
    return [
        Case(id="q35-ignore-shared", family="ignore-shared", test="test_ignore_shared",
             machine="q35", capabilities=("x-ignore-shared",), dimms=IGNORE_SHARED_DIMMS,
             notes="dimm0: memory-backend-file share=on (not sent, same file on the "
                   "destination); dimm1: memory-backend-memfd share=on (sent)"),
        Case(id="q35-zero-none", family="zero-none", test="test_zero_none", machine="q35",
             parameters=(("zero-page-detection", "none"),)),
    ]


FAMILY_CASES: List[Case] = (_paused_cases() + _mapped_ram_cases() + _postcopy_cases()
                            + _other_cases())

#: The stream each bad-streams case corrupts: one per family.
BAD_STREAM_SOURCES = ("q35-default", "q35-mapped-ram", "q35-postcopy-2m",
                      "q35-ignore-shared", "q35-zero-none")


def _bad_stream_cases() -> List[Case]:
    by_id = {c.id: c for c in FAMILY_CASES}
    out = []
    for src_id in BAD_STREAM_SOURCES:
        s = by_id[src_id]
        out.append(Case(id=f"bad-{src_id}", family="bad-streams", test="test_bad_streams",
                        machine=s.machine, backend=s.backend, memory=s.memory,
                        capabilities=s.capabilities, parameters=s.parameters,
                        dimms=s.dimms, transport=s.transport,
                        directions=(CORRUPT_TO_QEMURAM,), of=src_id,
                        notes="truncations and byte flips: qemuram.open raises a "
                              "StreamError subclass; CLI verify/extract exit 1, "
                              "no traceback, nothing left behind"))
    return out


CASES: List[Case] = FAMILY_CASES + _bad_stream_cases()
BY_ID: Dict[str, Case] = {c.id: c for c in CASES}
BY_NODE: Dict[str, Case] = {c.node_name: c for c in CASES}
assert len(BY_ID) == len(CASES), "duplicate case ids"


def cases_for(test: str) -> List[Case]:
    return [c for c in CASES if c.test == test]


# --------------------------------------------------------------------------
# Guest contents
# --------------------------------------------------------------------------

def planted_ranges(case: Case) -> List[Tuple[str, int, bytes]]:
    """Deterministic (seeded by the case's machine/memory) planted patterns.

    The same for every case with the same machine and RAM size, so two source
    guests of a case (e.g. a mapped-ram and a sequential save) hold the same
    memory. DIMM patterns are added for cases with DIMMs.
    """
    rng = random.Random(f"qemuram-matrix:{case.machine}:{case.memory}")
    top = b"".join(struct.pack(">Q", 0x70CE_0000_0000_0000 | i) for i in range(PAGE // 8))
    ranges = [
        ("random-block", 0x100000, rng.randbytes(16 * KiB)),
        ("aa-page", 0x200000, b"\xaa" * PAGE),
        ("partly-zero-page", 0x300000,
         bytes(1536) + rng.randbytes(1024) + bytes(1024) + b"\x5a" * 504 + bytes(8)),
        ("top-of-ram", case.memory - PAGE, top),
    ]
    if case.machine == "pc":
        ranges.append(("pc-low-9f000", 0x9F000, bytes(range(256)) * (PAGE // 256)))
    for d in case.dimms:
        drng = random.Random(f"qemuram-matrix:{d.id}")
        tag = d.id.encode() + b"-end-"
        ranges += [
            (f"{d.id}-start", d.addr, drng.randbytes(8 * KiB)),
            (f"{d.id}-end", d.addr + d.size - PAGE,
             (tag * (PAGE // len(tag) + 1))[:PAGE]),
        ]
    return ranges


@dataclass(frozen=True)
class Region:
    """A guest-physical range that is plain RAM, and where it is in the stream."""
    addr: int
    length: int
    block: str
    block_offset: int


def ram_regions(case: Case) -> List[Region]:
    """Whole-RAM regions compared with pmemsave (as in tests/data/fixtures.json).

    Main RAM (block pc.ram, block offset == guest-physical address for guests
    below 2 GiB): below 0xA0000 (VGA window / ROM shadows above it read as
    something else) and from 1 MiB to the top of low RAM; each DIMM whole.
    """
    if case.memory >= 2 * GiB:
        raise ValueError("ram_regions assumes all main RAM is below 2 GiB")
    out = [Region(0, 0xA0000, "pc.ram", 0),
           Region(0x100000, case.memory - 0x100000, "pc.ram", 0x100000)]
    for d in case.dimms:
        out.append(Region(d.addr, d.size, d.block, 0))
    return out


def region_of(case: Case, addr: int) -> Region:
    for r in ram_regions(case):
        if r.addr <= addr < r.addr + r.length:
            return r
    raise ValueError(f"{addr:#x} is in no RAM region of {case.id}")


# --------------------------------------------------------------------------
# 1 GiB pages: one user at a time
# --------------------------------------------------------------------------

LOCK_1G = os.path.join(tempfile.gettempdir(), "qemuram-hugetlb1g.lock")


@contextlib.contextmanager
def hugetlb1g_lock(timeout: float = 900.0) -> Iterator[float]:
    """Hold an exclusive fcntl lock while a test uses 1 GiB huge pages.

    Only two 1 GiB pages exist (ci/setup-hugepages.sh), so cases that need
    them run one at a time even under pytest-xdist. Yields the seconds spent
    waiting. Raises TimeoutError when the lock is not had within ``timeout``.
    """
    t0 = time.monotonic()
    fd = os.open(LOCK_1G, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"{LOCK_1G} still locked after {timeout}s") from None
                time.sleep(0.2)
        try:
            yield time.monotonic() - t0
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
