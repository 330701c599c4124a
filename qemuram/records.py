"""Plain data classes for everything the decoder yields and the encoder takes.

One record is one contiguous span of the stream (``offset`` is where it
starts).  Concatenating ``encode(record)`` over all records of a stream gives
the stream back byte for byte; large payloads are numpy views of the input
buffer while decoding (valid until the decoder is fed again) or views of a
memory image while encoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import numpy as np

from .wire import Command, RamFlag, SectionType


# ---------------------------------------------------------------- outer framing

@dataclass
class Header:
    """``QEVM`` magic and savevm format version."""
    version: int = 3
    offset: int = 0


@dataclass
class ConfigSubsection:
    """One subsection of the configuration (name, version, raw field bytes)."""
    name: str
    version: int
    body: bytes


@dataclass
class Configuration:
    """The 0x07 configuration record: machine type plus subsections."""
    machine: str
    subsections: List[ConfigSubsection] = field(default_factory=list)
    offset: int = 0

    @property
    def capabilities(self) -> List[str]:
        for sub in self.subsections:
            if sub.name == "configuration/capabilities":
                return parse_capabilities(sub.body)
        return []

    @property
    def target_page_bits(self) -> Optional[int]:
        for sub in self.subsections:
            if sub.name == "configuration/target-page-bits" and len(sub.body) >= 4:
                return int.from_bytes(sub.body[:4], "big")
        return None

    @property
    def uuid(self) -> Optional[bytes]:
        for sub in self.subsections:
            if sub.name == "configuration/uuid":
                return bytes(sub.body)
        return None


def parse_capabilities(body: bytes) -> List[str]:
    count = int.from_bytes(body[:4], "big")
    pos, names = 4, []
    for _ in range(count):
        n = body[pos]
        names.append(bytes(body[pos + 1:pos + 1 + n]).decode("ascii", "replace"))
        pos += 1 + n
    return names


def build_capabilities(names: List[str]) -> bytes:
    out = bytearray(len(names).to_bytes(4, "big"))
    for name in names:
        raw = name.encode("ascii")
        out.append(len(raw))
        out += raw
    return bytes(out)


@dataclass
class SectionHeader:
    """START / PART / END / FULL header.  idstr, instance and version only on START/FULL."""
    kind: SectionType
    section_id: int
    idstr: str = ""
    instance_id: int = 0
    version_id: int = 0
    offset: int = 0


@dataclass
class SectionFooter:
    """The 0x7e footer that closes a section on modern machine types."""
    section_id: int
    offset: int = 0


@dataclass
class OpaquePayload:
    """Section payload kept as exact bytes (device state, non-ram live sections).

    ``measured_by`` says how its end was found: ``"vmdesc"`` (walked the JSON
    field sizes) or ``"footer-scan"`` (no description; next record validated).
    """
    section_id: int
    idstr: str
    data: bytes
    measured_by: str
    offset: int = 0


@dataclass
class CommandRecord:
    """A 0x08 COMMAND.  ``data`` is the command's own payload (len bytes).

    For PACKAGED, ``data`` is the be32 length; the nested records follow as
    their own records and a ``PackageEnd`` marks where the package stops.
    """
    cmd: int
    data: bytes
    offset: int = 0

    @property
    def name(self) -> str:
        try:
            return Command(self.cmd).name
        except ValueError:
            return f"CMD_{self.cmd}"

    @property
    def advise(self) -> Optional[Tuple[int, int]]:
        """(host page size summary, target page size) of POSTCOPY_ADVISE."""
        if self.cmd == Command.POSTCOPY_ADVISE and len(self.data) == 16:
            return (int.from_bytes(self.data[:8], "big"), int.from_bytes(self.data[8:], "big"))
        return None


@dataclass
class PackageEnd:
    """End of a PACKAGED command's nested stream (encodes to nothing)."""
    offset: int = 0


@dataclass
class EndOfStream:
    """The 0x00 EOF byte."""
    offset: int = 0


@dataclass
class VMDescription:
    """The JSON trailer after EOF: ``0x06``, be32 length, JSON bytes."""
    json_bytes: bytes
    offset: int = 0

    def parsed(self) -> Any:
        import json
        return json.loads(self.json_bytes)


# ---------------------------------------------------------------- "ram" section

@dataclass
class MappedRamHeader:
    """Per-block mapped-ram header (packed, big-endian)."""
    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int


@dataclass
class RamBlockInfo:
    """One entry of the MEM_SIZE block list.

    ``host_page_size`` is the postcopy page-size field (present only when the
    block's page size differs from the source's normal page size); ``addr`` the
    x-ignore-shared region address; ``mapped_ram`` the mapped-ram header.
    """
    name: str
    used_length: int
    host_page_size: Optional[int] = None
    addr: Optional[int] = None
    mapped_ram: Optional[MappedRamHeader] = None


@dataclass
class RamMemSize:
    """The MEM_SIZE record of the setup section: the block list.

    In mapped-ram files only the first block entry is at ``offset``; each later
    entry follows the previous block's page area, and ``block_offsets`` says
    where each entry starts.  The mapped-ram areas between entries are carried
    by ``MappedRamArea`` records.
    """
    total: int
    blocks: List[RamBlockInfo]
    offset: int = 0


@dataclass
class RamBlockEntry:
    """One block entry of a mapped-ram block list (the entries are spread out)."""
    block: RamBlockInfo
    offset: int = 0


@dataclass
class MappedRamArea:
    """Raw bytes of a mapped-ram block's bitmap + padding + page area (a chunk).

    Kept verbatim: the bitmap says which pages hold data; pages whose bit is
    clear read as zero whatever the file holds there.
    """
    block: str
    data: Any            # bytes-like or numpy uint8 array; None when skipped (lazy)
    offset: int = 0      # absolute file offset of data[0]
    length: Optional[int] = None   # set for a lazy chunk: bytes left in the file, unread

    @property
    def size(self) -> int:
        return self.length if self.data is None else len(self.data)


@dataclass
class PageRun:
    """A run of page records of one kind for one block.

    ``page_offsets`` (uint64) are byte offsets within the block.  Only the
    first record can carry the block name (``named``); all others have
    CONTINUE.  ``data`` is a (count, page_size) uint8 array for PAGE runs and
    None for ZERO runs.
    """
    kind: RamFlag                      # ZERO or PAGE
    block: str
    page_offsets: np.ndarray
    named: bool
    data: Optional[np.ndarray] = None
    offset: int = 0

    @property
    def count(self) -> int:
        return int(self.page_offsets.shape[0])


@dataclass
class XbzrlePage:
    """One XBZRLE record: delta against the page's current content."""
    block: str
    page_offset: int
    named: bool
    encoded: Any
    offset: int = 0


@dataclass
class XbzrleRun:
    """Consecutive CONTINUE XBZRLE records of one block, as one event.

    Only a ``Decoder(xbzrle_runs=True)`` yields these (it is how a whole
    stream is loaded fast); otherwise each record is an ``XbzrlePage``.
    ``data`` is a uint8 view of the input from the first record header on;
    record ``k``'s encoded delta is ``data[starts[k]:starts[k] + lengths[k]]``.
    """
    block: str
    page_offsets: np.ndarray
    data: Any
    starts: np.ndarray
    lengths: np.ndarray
    offset: int = 0

    @property
    def count(self) -> int:
        return int(self.page_offsets.shape[0])

    def pages(self):
        """The same records as ``XbzrlePage`` events."""
        for k in range(self.count):
            s = int(self.starts[k])
            yield XbzrlePage(block=self.block, page_offset=int(self.page_offsets[k]),
                             named=False, encoded=self.data[s:s + int(self.lengths[k])],
                             offset=self.offset + s - 11)


@dataclass
class CompressedPage:
    """One pre-9.1 COMPRESS_PAGE record: a zlib stream holding one page."""
    block: str
    page_offset: int
    named: bool
    compressed: Any
    offset: int = 0


@dataclass
class RamEos:
    """EOS: ends one ram section payload."""
    offset: int = 0


@dataclass
class RamMultifdFlush:
    """MULTIFD_FLUSH marker."""
    offset: int = 0


PAGE_RECORDS = (PageRun, XbzrlePage, XbzrleRun, CompressedPage)
