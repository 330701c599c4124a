"""Canonical encoder: a memory image plus a template's non-RAM records -> a stream
written the way QEMU 10.0 writes it for a paused guest.

References: QEMU migration/ram.c (ram_save_setup, ram_find_and_save_block,
save_page_header, save_zero_page, mapped_ram_setup_ramblock,
ram_save_file_bmap) and migration/savevm.c (the configuration subsections,
the vmdesc).  Sequential layout: every page of every block that the source
sent, in block order then ascending offset, a ZERO record for an all-zero page
(unless zero-page detection is off), the block name on the first record and at
each change of block.  mapped-ram layout: per block a header, a bitmap of the
non-zero pages and a 1 MiB-aligned page area where zero pages stay holes.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import mapped_ram
from .errors import UsageError
from .framing import encode_record
from .image import RamBlock, _nonzero_rows, _runs
from .ram import page_run_parts
from .records import (CommandRecord, ConfigSubsection, Configuration, PageRun, RamBlockEntry,
                      RamBlockInfo, RamEos, RamMemSize, RamMultifdFlush, SectionFooter,
                      SectionHeader, VMDescription, build_capabilities)
from .stream import RamSectionSummary, Stream
from .wire import Command, RamFlag, SectionType

# Order of the configuration subsections in QEMU's vmstate_configuration.
_SUBSECTION_ORDER = ["configuration/target-page-bits", "configuration/capabilities",
                     "configuration/uuid"]
_RUN_PAGES = 4096            # pages per PageRun while writing (bounds memory)


class _Planned(Exception):
    """Raised inside a planning write once the mapped-ram layout is known."""


class _NullFile:
    """Counts what would be written (planning the output layout)."""

    def write(self, data) -> int:
        return len(data)

    def seek(self, pos: int) -> int:
        return pos

    def truncate(self, pos: int) -> int:
        return pos


class Sink:
    """Output with a position; holes are skipped by seeking when the file allows."""

    def __init__(self, f, sparse: bool):
        self.f = f
        self.sparse = sparse
        self.pos = 0

    def fileno(self) -> Optional[int]:
        """The OS file behind a seekable output, for copies in the kernel."""
        if not self.sparse:
            return None
        try:
            return self.f.fileno()
        except (AttributeError, OSError, ValueError):
            return None

    def flush(self) -> None:
        self.f.flush()

    def write(self, data) -> None:
        if len(data):
            self.f.write(data)
            self.pos += len(data)

    def skip_to(self, pos: int) -> None:
        gap = pos - self.pos
        if gap < 0:
            raise AssertionError("sink cannot go back")
        if self.sparse:
            self.f.seek(pos)
        else:
            zero = bytes(min(gap, 1 << 20))
            while gap:
                n = min(gap, len(zero))
                self.f.write(zero[:n])
                gap -= n
        self.pos = pos

    def finish(self) -> None:
        if self.sparse:
            self.f.truncate(self.pos)


def _configuration(conf: Configuration, caps: List[str]) -> Configuration:
    subs = [s for s in conf.subsections if s.name != "configuration/capabilities"]
    if caps:
        subs.append(ConfigSubsection("configuration/capabilities", 1, build_capabilities(caps)))
    subs.sort(key=lambda s: _SUBSECTION_ORDER.index(s.name) if s.name in _SUBSECTION_ORDER
              else len(_SUBSECTION_ORDER))
    return Configuration(machine=conf.machine, subsections=subs)


def _vmdesc(raw: bytes, caps: List[str], changed: bool) -> bytes:
    """Rewrite the vmdesc's description of the capabilities subsection."""
    if not changed:
        return raw
    desc = json.loads(raw)
    conf = desc.get("configuration")
    if conf is None:
        return raw
    subs = [s for s in conf.get("subsections", [])
            if s.get("vmsd_name") != "configuration/capabilities"]
    if caps:
        sizes = [1 + len(c) for c in caps]
        if len(set(sizes)) == 1:
            cap_fields = [{"name": "capabilities", "type": "capability", "size": sizes[0]}]
            if len(caps) > 1:
                cap_fields[0] = {"name": "capabilities", "array_len": len(caps),
                                 "type": "capability", "size": sizes[0]}
        else:
            cap_fields = []
            for i, s in enumerate(sizes):
                f = {"name": "capabilities"}
                if i < len(sizes) - 1:
                    f["index"] = i
                f.update({"type": "capability", "size": s})
                cap_fields.append(f)
        subs.append({"vmsd_name": "configuration/capabilities", "version": 1,
                     "fields": [{"name": "caps_count", "type": "uint32", "size": 4}]
                     + cap_fields})
        subs.sort(key=lambda s: _SUBSECTION_ORDER.index(s["vmsd_name"])
                  if s["vmsd_name"] in _SUBSECTION_ORDER else 99)
    if subs:
        conf["subsections"] = subs
    else:
        conf.pop("subsections", None)
    return json.dumps(desc).encode()


class CanonicalWriter:
    """Writes ``stream``'s memory image as QEMU would, keeping its non-RAM records."""

    def __init__(self, stream: Stream, *, layout: Optional[str] = None,
                 zero_pages: Optional[str] = None, compact: bool = False,
                 host_page_sizes: Optional[Dict[str, int]] = None,
                 direct: Optional[Dict[str, int]] = None):
        """``direct`` {block: page area offset}: the blocks' pages were decoded
        straight into the output file there (see ``DirectMappedRam``)."""
        self.st = stream
        self.layout = layout or stream.format
        if self.layout not in ("sequential", "mapped-ram"):
            raise UsageError(f"unknown layout {self.layout!r}")
        P = stream.page_size
        if P is None:
            raise UsageError("the stream's target page size is unknown")
        self.P = P
        summaries = stream.ram_sections
        had_zero = any(s.zero_records for s in summaries)
        had_pages = any(s.page_records or s.xbzrle_records for s in summaries)
        if zero_pages is None:
            zero_pages = "full" if (had_pages and not had_zero) else "records"
        if zero_pages not in ("records", "full"):
            raise UsageError("zero_pages must be 'records' or 'full'")
        self.zero_pages = zero_pages
        self.host_page_sizes = dict(host_page_sizes or {})
        for name in self.host_page_sizes:
            if name not in stream.ram:
                raise UsageError(f"no block named {name!r}; blocks: {', '.join(stream.ram)}")
        caps = [c for c in stream.capabilities if c != "mapped-ram"]
        if self.layout == "mapped-ram":
            caps.append("mapped-ram")
        self.caps = caps
        self.caps_changed = sorted(caps) != sorted(stream.capabilities)
        self.blocks = [b for b in stream.ram.values() if b.sent.any()]
        if (self.layout == "mapped-ram" and "x-ignore-shared" in caps
                and len(self.blocks) < len(stream.ram)):
            skipped = ", ".join(n for n, b in stream.ram.items() if not b.sent.any())
            raise UsageError("a mapped-ram file cannot record that x-ignore-shared skipped "
                             f"{skipped} (QEMU 10 neither saves nor loads x-ignore-shared with "
                             "mapped-ram); keep the sequential layout")
        advise = stream.postcopy_advise
        if advise is not None:
            summary, tps = advise
            self.normal_page = min((1 << b for b in range(64)
                                    if summary >> b & 1 and 1 << b >= tps), default=max(P, 4096))
        else:
            self.normal_page = max(P, 4096)
        self.compact = compact
        self.direct = dict(direct) if direct is not None else None
        self._planned: Optional[Dict[str, Tuple[int, int]]] = None
        self._plan_parts()

    # -- which pages go into which PART/END section
    def _plan_parts(self) -> None:
        summaries = self.st.ram_sections
        total = sum(b.size // self.P for b in self.blocks)
        iters = [s for s in summaries if s.kind in (SectionType.PART, SectionType.END)]
        counts = [s.page_records + s.zero_records + s.xbzrle_records for s in iters]
        self.drop_parts = set()
        if self.layout == "mapped-ram":
            self.part_quota = {id(s): 0 for s in iters}
            return
        if sum(counts) == total and not any(s.xbzrle_records for s in iters) and not self.compact:
            self.part_quota = {id(s): c for s, c in zip(iters, counts)}
        else:
            # One pass: every page in the first PART, other PARTs dropped.
            parts = [s for s in iters if s.kind == SectionType.PART]
            self.part_quota = {id(s): 0 for s in iters}
            if parts:
                self.part_quota[id(parts[0])] = total
                self.drop_parts = {s.section_id for s in parts[1:]} and {id(s) for s in parts[1:]}
            elif iters:
                self.part_quota[id(iters[-1])] = total

    def _advise_data(self, data: bytes) -> bytes:
        """POSTCOPY_ADVISE carries the OR of all blocks' page sizes: keep it in
        step with the page-size fields written in the block list."""
        if not self.host_page_sizes:
            return data
        summary = self.normal_page
        for info in self._block_infos():
            summary |= info.host_page_size or self.normal_page
        return summary.to_bytes(8, "big") + data[8:]

    def _block_infos(self) -> List[RamBlockInfo]:
        out = []
        advised = self.st.postcopy_advise is not None
        for b in self.st.ram.values():
            ps = b.host_page_size
            if b.name in self.host_page_sizes:
                ps = self.host_page_sizes[b.name]
                ps = None if ps == self.normal_page else ps
            out.append(RamBlockInfo(name=b.name, used_length=b.size,
                                    host_page_size=ps if advised else None,
                                    addr=b.addr if "x-ignore-shared" in self.caps else None))
        return out

    # -- page records for the sequential layout
    def _page_runs(self) -> Iterator[PageRun]:
        """Runs of at most _RUN_PAGES pages.  Page data is read into one reused
        buffer, so a run is only valid until the next one is asked for."""
        P = self.P
        buf = np.empty((_RUN_PAGES, P), dtype=np.uint8)
        for b in self.blocks:
            n = b.npages
            named = True
            for start in range(0, n, _RUN_PAGES):
                count = min(_RUN_PAGES, n - start)
                written = b.written[start:start + count]
                offs = np.arange(start, start + count, dtype=np.uint64) * np.uint64(P)
                if written.any():
                    chunk = buf[:count]
                    b.read_into(start * P, memoryview(chunk.reshape(-1)))
                    if self.zero_pages == "full" or b.verified_nonzero:
                        nz = written
                    else:
                        nz = written & _nonzero_rows(chunk)
                else:
                    chunk = None                     # holes: all zero, nothing to read
                    nz = written
                if self.zero_pages == "full":
                    if chunk is None:
                        chunk = buf[:count]
                        chunk[:] = 0
                    yield PageRun(RamFlag.PAGE, b.name, offs, named, data=chunk)
                    named = False
                    continue
                edges = np.flatnonzero(np.diff(nz.astype(np.int8))) + 1
                bounds = [0, *edges.tolist(), count]
                for lo, hi in zip(bounds[:-1], bounds[1:]):
                    if nz[lo]:
                        yield PageRun(RamFlag.PAGE, b.name, offs[lo:hi], named, data=chunk[lo:hi])
                    else:
                        yield PageRun(RamFlag.ZERO, b.name, offs[lo:hi], named)
                    named = False

    @staticmethod
    def _split(run: PageRun, k: int):
        a = PageRun(run.kind, run.block, run.page_offsets[:k], run.named,
                    None if run.data is None else run.data[:k])
        b = PageRun(run.kind, run.block, run.page_offsets[k:], False,
                    None if run.data is None else run.data[k:])
        return a, b

    # -- the whole stream
    def write(self, f, *, sparse: Optional[bool] = None, progress=None) -> int:
        if sparse is None:
            try:
                sparse = f.seekable()
            except (AttributeError, OSError):
                sparse = False
        sink = Sink(f, sparse)
        runs = self._page_runs() if self.layout == "sequential" else iter(())
        out_buf = (np.empty((_RUN_PAGES, 8 + self.P), dtype=np.uint8)
                   if self.layout == "sequential" else None)
        pending: Optional[PageRun] = None
        skipping = False
        section_open = None
        for rec in self.st.template:
            if isinstance(rec, SectionHeader) and rec.idstr == "ram":
                section_open = rec
                continue  # written with its summary
            if isinstance(rec, RamSectionSummary):
                if id(rec) in self.drop_parts:
                    skipping = True
                    continue
                sink.write(encode_record(section_open, self.P))
                if rec.kind == SectionType.START:
                    self._write_setup(sink, rec)
                else:
                    quota = self.part_quota.get(id(rec), 0)
                    while quota > 0:
                        if pending is None:
                            pending = next(runs)
                        run = pending
                        if run.count > quota:
                            run, pending = self._split(run, quota)
                        else:
                            pending = None
                        head, body = page_run_parts(run, self.P, out=out_buf)
                        sink.write(head)
                        if body is not None:
                            sink.write(body.reshape(-1))
                        quota -= run.count
                        if progress:
                            progress(sink.pos)
                    sink.write(encode_record(RamEos(), self.P))
                continue
            if isinstance(rec, SectionFooter) and skipping:
                skipping = False
                continue
            if isinstance(rec, Configuration):
                rec = _configuration(rec, self.caps)
            elif (isinstance(rec, CommandRecord) and rec.cmd == Command.POSTCOPY_ADVISE
                  and len(rec.data) == 16):
                rec = CommandRecord(rec.cmd, self._advise_data(bytes(rec.data)))
            elif isinstance(rec, VMDescription):
                rec = VMDescription(_vmdesc(bytes(rec.json_bytes), self.caps, self.caps_changed))
            sink.write(encode_record(rec, self.P))
        sink.finish()
        return sink.pos

    def _write_setup(self, sink: Sink, summary: RamSectionSummary) -> None:
        infos = self._block_infos()
        total = sum(i.used_length for i in infos)
        if self.layout == "sequential":
            sink.write(encode_record(RamMemSize(total=total, blocks=infos), self.P))
            if summary.multifd_flushes:
                sink.write(encode_record(RamMultifdFlush(), self.P))
            sink.write(encode_record(RamEos(), self.P))
            return
        sink.write(encode_record(RamMemSize(total=total, blocks=[]), self.P))
        for info in infos:
            blk = self.st.ram[info.name]
            entry_len = len(encode_record(RamBlockEntry(info), self.P))
            header_offset = sink.pos + entry_len      # entry without its header yet
            hdr, next_pos = mapped_ram.layout(header_offset, info.used_length, self.P)
            info.mapped_ram = hdr
            sink.write(encode_record(RamBlockEntry(info), self.P))
            if self._planned is not None:
                self._planned[info.name] = (hdr.pages_offset, next_pos)
            elif self.direct is not None and self.direct.get(info.name) != hdr.pages_offset:
                raise AssertionError(f"block {info.name!r} planned at "
                                     f"{self.direct.get(info.name)}, written at "
                                     f"{hdr.pages_offset}")
            present = self._present(blk) if self._planned is None else None
            sink.write(mapped_ram.bools_to_bitmap(present) if present is not None
                       else bytes(mapped_ram.bitmap_size(info.used_length, self.P)))
            if present is not None and self.direct is None:
                self._copy_pages(sink, blk, present, hdr.pages_offset)
            sink.skip_to(next_pos)
        if self._planned is not None:
            raise _Planned()
        sink.write(encode_record(RamEos(), self.P))

    def _present(self, blk) -> np.ndarray:
        """Pages that hold a non-zero byte (the mapped-ram bitmap)."""
        if blk.verified_nonzero:
            return blk.written.copy()
        present = np.zeros(blk.npages, dtype=bool)
        buf = np.empty((_RUN_PAGES, self.P), dtype=np.uint8)
        for start in range(0, blk.npages, _RUN_PAGES):
            count = min(_RUN_PAGES, blk.npages - start)
            written = blk.written[start:start + count]
            if written.any():
                chunk = buf[:count]
                blk.read_into(start * self.P, memoryview(chunk.reshape(-1)))
                present[start:start + count] = written & _nonzero_rows(chunk)
        return present

    def _copy_pages(self, sink: "Sink", blk, present: np.ndarray, pages_offset: int) -> None:
        """Present pages into the page area: copied file to file in the kernel
        when the output is a file, else read and written in chunks."""
        fd = sink.fileno()
        if fd is not None:
            sink.flush()
            blk.copy_to(fd, pages_offset, present)
            return
        buf = np.empty(_RUN_PAGES * self.P, dtype=np.uint8)
        for lo, hi, _ in _runs(np.flatnonzero(present)):
            sink.skip_to(pages_offset + lo * self.P)
            for s in range(lo, hi, _RUN_PAGES):
                e = min(hi, s + _RUN_PAGES)
                chunk = buf[:(e - s) * self.P]
                blk.read_into(s * self.P, memoryview(chunk))
                sink.write(chunk)

    # -- sequential -> mapped-ram without a scratch image
    def plan_areas(self) -> Dict[str, Tuple[int, int]]:
        """{block: (page area offset, end)} of the mapped-ram output, from the
        records before the ram setup (which must all be in the template)."""
        self._planned = {}
        try:
            self.write(_NullFile(), sparse=True)
        except _Planned:
            pass
        planned, self._planned = self._planned, None
        return planned


class DirectMappedRam:
    """Decode a sequential stream straight into a mapped-ram output file.

    The output's page areas serve as the memory image: when the block list
    arrives, the layout is planned from the records decoded so far (they all
    precede the ram setup), and each block becomes a window of the output.
    Pages then cross the disk once.  Use ``placement`` as the image's
    placement hook, then ``writer()`` once the stream is decoded.
    """

    def __init__(self, f, **writer_options):
        self.f = f
        self.options = writer_options
        self.areas: Optional[Dict[str, Tuple[int, int]]] = None

    def placement(self, infos, st: Stream, dec) -> Dict[str, Tuple[int, int]]:
        P = dec.page_size
        if self.areas is not None or "mapped-ram" in dec.capabilities or P is None:
            return {}
        draft = Stream()
        draft.template = list(st.template)
        draft.capabilities = list(dec.capabilities)
        draft.postcopy_advise = dec.postcopy_advise
        draft.page_size = P
        draft.ram = OrderedDict()
        for info in infos:
            b = RamBlock(info.name, info.used_length, P, None,
                         host_page_size=info.host_page_size, addr=info.addr)
            b.sent[:] = True
            draft.ram[info.name] = b
        try:
            planner = CanonicalWriter(draft, layout="mapped-ram", **self.options)
        except UsageError:
            return {}                     # not expressible as mapped-ram: the writer will say
        self.areas = planner.plan_areas()
        fd = self.f.fileno()
        end = max((e for _, e in self.areas.values()), default=0)
        os.ftruncate(fd, end)             # never-written pages read back as zero
        return {name: (fd, off) for name, (off, _) in self.areas.items()}

    def writer(self, stream: Stream) -> CanonicalWriter:
        direct = None if self.areas is None else {n: o for n, (o, _) in self.areas.items()}
        return CanonicalWriter(stream, layout="mapped-ram", direct=direct, **self.options)


def write_atomic(path: str, writer_fn, *, mode: int = 0o644, sync: bool = False) -> int:
    """Write through ``writer_fn(file)`` to a temporary name, then rename; with
    ``sync`` the data reaches the disk (fsync) before the rename."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    tmp = os.path.join(d, f".{os.path.basename(path)}.qemuram-tmp-{os.getpid()}")
    try:
        with open(tmp, "w+b") as f:
            n = writer_fn(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        return n
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
