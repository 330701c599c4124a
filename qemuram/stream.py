"""``qemuram.open``: decode a whole stream into a memory image plus its non-RAM parts."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from . import io as qio
from .framing import Decoder, encode_record
from .image import MemoryImage, RamBlock
from .ram import page_run_matches
from .records import (CommandRecord, CompressedPage, Configuration, MappedRamArea,
                      OpaquePayload, PageRun, RamBlockEntry, RamEos, RamMemSize,
                      RamMultifdFlush, SectionFooter, SectionHeader, XbzrlePage, XbzrleRun)
from .wire import RamFlag, SectionType

RAM_RECORDS = (PageRun, XbzrlePage, XbzrleRun, CompressedPage, RamEos, RamMultifdFlush,
               RamMemSize, RamBlockEntry, MappedRamArea)


@dataclass
class RamSectionSummary:
    """What one "ram" section held, in the template: enough to re-create its
    shape (which section kind, how many page records, flushes)."""
    kind: SectionType
    section_id: int
    page_records: int = 0
    zero_records: int = 0
    xbzrle_records: int = 0
    multifd_flushes: int = 0
    offset: int = 0


class Stream:
    """A decoded QEMU migration stream.

    ``ram`` maps block names to ``RamBlock`` (content in sparse temporary
    files, removed by ``close()``); ``template`` holds every non-RAM record in
    order with ``RamSectionSummary`` markers where ram payloads were.
    """

    def __init__(self):
        self.machine: Optional[str] = None
        self.page_size: Optional[int] = None
        self.page_size_source: Optional[str] = None
        self.capabilities: List[str] = []
        self.configuration: Optional[Configuration] = None
        self.format = "sequential"
        self.ram: "OrderedDict[str, RamBlock]" = OrderedDict()
        self.template: list = []
        self.sections: List[dict] = []
        self.commands: List[dict] = []
        self.vmdesc: Optional[dict] = None
        self.notes: List[str] = []
        self.size = 0
        self.container: Optional[dict] = None
        self.postcopy_advise = None
        self.image: Optional[MemoryImage] = None
        self._physical = None
        self.roundtrip: Optional[bool] = None          # set when opened with verify=True
        self.roundtrip_mismatch: Optional[int] = None

    # -- context manager
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.image is not None:
            self.image.close()

    @property
    def ram_sections(self) -> List[RamSectionSummary]:
        return [t for t in self.template if isinstance(t, RamSectionSummary)]

    @property
    def physical(self):
        """Guest-physical view (x86 pc/q35): see ``qemuram.physmap``."""
        if self._physical is None:
            from . import physmap
            self._physical = physmap.for_stream(self)
        return self._physical

    def counts(self) -> Dict[str, Dict[str, int]]:
        return {n: dict(b.counts) for n, b in self.ram.items()}


def verify(src, *, page_size: Optional[int] = None,
           block_page_sizes: Optional[Dict[str, int]] = None, snapshot: Optional[str] = None,
           progress: Optional[Callable[[int], None]] = None) -> Stream:
    """Decode every record and check the lossless round trip, without keeping
    guest memory (``Stream.ram`` blocks have sizes and counts but no content).

    XBZRLE and compressed pages are still decoded (against a scratch page), so
    every record is proven to decode; only the final memory is not built.
    """
    st = _decode_source(src, MemoryImage(content=False), snapshot=snapshot, page_size=page_size,
                        block_page_sizes=block_page_sizes, progress=progress,
                        check_roundtrip=True)
    st.image.close()
    return st


def open(src, *, page_size: Optional[int] = None,
         block_page_sizes: Optional[Dict[str, int]] = None, workdir: Optional[str] = None,
         snapshot: Optional[str] = None, progress: Optional[Callable[[int], None]] = None,
         file_names: Optional[Dict[str, str]] = None, verify: bool = False,
         placement=None) -> Stream:
    """Decode a stream (path, '-', or binary file) into a ``Stream``.

    Raises a ``StreamError`` subclass for any invalid input; no partial
    result is returned.  With ``verify=True`` every record is re-encoded and
    compared with the input bytes it came from (``Stream.roundtrip``).

    Without ``workdir``, the pages of a mapped-ram file are read from the
    file in place when needed (it must not change while the Stream is open);
    other content goes to sparse scratch files removed by ``close()``.
    ``placement`` is the memory image's block placement hook (see
    ``canonical.DirectMappedRam``).
    """
    image = MemoryImage(workdir, keep=workdir is not None, file_names=file_names,
                        attach=workdir is None, placement=placement)
    return _decode_source(src, image, snapshot=snapshot, page_size=page_size,
                          block_page_sizes=block_page_sizes, progress=progress,
                          check_roundtrip=verify)


def _decode_source(src, image: MemoryImage, *, snapshot, **options) -> Stream:
    """Open the input (unwrapping containers), decode it into ``image``; on any
    error the image is removed before the error propagates."""
    st = Stream()
    st.image = image
    try:
        f, st.container = qio.open_input(src, snapshot=snapshot)
    except BaseException:
        image.close()
        raise
    try:
        decode_into(f, st, image, **options)
    except BaseException:
        image.close()
        raise
    finally:
        if f is not src and hasattr(f, "close") and src not in ("-", None):
            f.close()
    return st


def decode_into(f, st: Stream, image: MemoryImage, *, progress=None, check_roundtrip=False,
                **options) -> Decoder:
    opts = {k: v for k, v in options.items() if v is not None}
    if qio.is_seekable(f):
        vm = qio.read_vmdesc_ahead(f, f.tell())
        if vm is not None:
            opts["vmdesc"] = vm
    dec = Decoder(xbzrle_runs=True, **opts)
    image.context = (st, dec)
    lazy = False
    if qio.is_seekable(f):
        extent = qio.source_extent(f)
        if not image.content:
            lazy = True                       # verify: pages of a mapped-ram area are not read
        elif extent is not None:
            image.set_source(extent[0], extent[1] - dec.offset)
            lazy = True
    cur: Optional[RamSectionSummary] = None
    last_report = 0
    for rec in qio.iter_records(f, decoder=dec, lazy_pages=lazy):
        if check_roundtrip and st.roundtrip_mismatch is None:
            if isinstance(rec, PageRun):
                n = page_run_matches(rec, dec._buf, rec.offset - dec._base, dec.page_size)
            elif isinstance(rec, MappedRamArea) and rec.data is None:
                n = rec.length                # bytes left in the file are the file's bytes
            else:
                enc = encode_record(rec, dec.page_size)
                n = len(enc) if dec.raw(rec.offset, len(enc)) == enc else None
            if n is None or rec.offset != st.size:
                st.roundtrip_mismatch = rec.offset
                n = 0
            st.size = rec.offset + n
        if isinstance(rec, RAM_RECORDS):
            image.apply(rec, dec.page_size)
            if cur is not None:
                if isinstance(rec, PageRun):
                    if rec.kind == RamFlag.ZERO:
                        cur.zero_records += rec.count
                    else:
                        cur.page_records += rec.count
                elif isinstance(rec, XbzrleRun):
                    cur.xbzrle_records += rec.count
                elif isinstance(rec, XbzrlePage):
                    cur.xbzrle_records += 1
                elif isinstance(rec, RamMultifdFlush):
                    cur.multifd_flushes += 1
            if progress is not None and rec.offset - last_report > (64 << 20):
                last_report = rec.offset
                progress(rec.offset)
            continue
        if isinstance(rec, SectionHeader):
            st.sections.append({"offset": rec.offset, "type": rec.kind.name,
                                "section_id": rec.section_id, "idstr": rec.idstr,
                                **({"instance_id": rec.instance_id, "version_id": rec.version_id}
                                   if rec.kind in (SectionType.START, SectionType.FULL) else {})})
            st.template.append(rec)
            if rec.idstr == "ram":
                cur = RamSectionSummary(kind=rec.kind, section_id=rec.section_id,
                                        offset=rec.offset)
                st.template.append(cur)
            continue
        if isinstance(rec, SectionFooter):
            cur = None
        elif isinstance(rec, CommandRecord):
            st.commands.append({"offset": rec.offset, "command": rec.name,
                                "length": len(rec.data)})
            rec.data = bytes(rec.data)
        elif isinstance(rec, OpaquePayload):
            rec.data = bytes(rec.data)
            st.sections[-1]["size"] = len(rec.data)
            st.sections[-1]["measured_by"] = rec.measured_by
        elif isinstance(rec, Configuration):
            st.configuration = rec
        st.template.append(rec)
    image.flush()
    st.machine = dec.machine
    st.page_size = dec.page_size
    st.page_size_source = dec.page_size_source
    st.capabilities = list(dec.capabilities)
    st.format = "mapped-ram" if "mapped-ram" in dec.capabilities else "sequential"
    st.vmdesc = dec.vmdesc
    st.notes = list(dec.notes)
    st.postcopy_advise = dec.postcopy_advise
    if check_roundtrip:
        st.roundtrip = st.roundtrip_mismatch is None and st.size == dec.offset
    st.size = dec.offset
    st.ram = image.blocks
    _set_guest_addresses(st)
    return dec


def _set_guest_addresses(st: Stream) -> None:
    """Fill ``RamBlock.gpa`` where the machine type says where a block starts."""
    try:
        ranges = st.physical.ranges
    except Exception:  # not an x86 machine type qemuram maps, or no pc.ram
        st._physical = None
        return
    for r in ranges:
        blk = st.ram.get(r.block)
        if blk is not None and r.block_offset == 0:
            blk.gpa = r.gpa
