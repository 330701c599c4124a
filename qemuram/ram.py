"""The "ram" section, version 4: record decoding and encoding.

References: QEMU migration/ram.c (ram_save_setup, save_page_header,
save_zero_page, save_normal_page, save_xbzrle_page, ram_load_precopy,
parse_ramblocks).  Records start with ``be64 offset|flags``; every flag is
below 0x400 so any target page of 1 KiB or more leaves room for them.

Runs of CONTINUE ZERO or CONTINUE PAGE records have a fixed size, so they are
scanned as strided numpy arrays instead of one Python step per record: that
is what makes a multi-GB stream of millions of records fast.
"""
from __future__ import annotations

import struct
from collections import OrderedDict
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from . import mapped_ram
from .errors import (DuplicateBlock, PageOutOfRange, PageSizeError,
                     StreamError, UnknownBlock, UnknownFlags, XBZRLEError, BadZeroPage)
from .records import (CompressedPage, MappedRamArea, PageRun, RamBlockEntry, RamBlockInfo,
                      RamEos, RamMemSize, RamMultifdFlush, XbzrlePage, XbzrleRun)
from .wire import ENCODING_FLAG_XBZRLE, RAM_FLAGS_MASK, RamFlag, SectionType

if TYPE_CHECKING:  # pragma: no cover
    from .framing import Decoder

_FLAGS = np.uint64(RAM_FLAGS_MASK)
_ADDR = np.uint64(~RAM_FLAGS_MASK & 0xFFFFFFFFFFFFFFFF)
_ADDR_INT = ~RAM_FLAGS_MASK & 0xFFFFFFFFFFFFFFFF
MAX_COMPRESSED = 1 << 20
MAX_RUN_BYTES = 16 << 20          # input bytes one PageRun may span
XBZRLE_RUN_MAX = 4096             # records per XbzrleRun (bounds the pages held at once)
_XBZRLE_HEAD = struct.Struct(">QBH")  # header, encoding flag, length
_XBZRLE_CONT = int(RamFlag.XBZRLE | RamFlag.CONTINUE)
# Plain ints for per-record tests: "&" on an IntFlag makes a flag object.
_CONTINUE = int(RamFlag.CONTINUE)


class RamDecoder:
    """State of the "ram" codec inside one stream (blocks, current block)."""

    def __init__(self, outer: "Decoder", block_page_sizes: Dict[str, int]):
        self.d = outer
        self.blocks: "OrderedDict[str, RamBlockInfo]" = OrderedDict()
        self.block_page_sizes = dict(block_page_sizes)
        self.current: Optional[RamBlockInfo] = None
        self.section_kind: Optional[SectionType] = None
        self.mem_size_seen = False
        self._list_remaining = 0          # mapped-ram: block entries still to come
        self._area: Optional[Tuple[str, int]] = None  # (block, absolute end) being streamed
        self.area_chunk = 8 << 20
        self.xbzrle_runs = False          # yield XbzrleRun batches (see Decoder)

    # --------------------------------------------------------------- framing hooks
    @property
    def mapped(self) -> bool:
        return "mapped-ram" in self.d.capabilities

    @property
    def ignore_shared(self) -> bool:
        return "x-ignore-shared" in self.d.capabilities

    def begin_section(self, sid: int, kind: SectionType) -> None:
        self.section_kind = kind

    # --------------------------------------------------------------- decoding
    def step(self):
        d = self.d
        if self._area is not None:
            return self._area_chunk()
        if self._list_remaining:
            return self._mapped_entry()
        p = d._pos
        d.need(8, "ram record header")
        h = d.be64(p)
        flags = h & RAM_FLAGS_MASK
        addr = h & ~RAM_FLAGS_MASK
        kind = flags & ~_CONTINUE
        if flags == RamFlag.MEM_SIZE:
            return self._mem_size(p, addr)
        if flags == RamFlag.EOS and addr == 0:
            d._pos = p + 8
            d.ram_payload_done()
            return RamEos(offset=d.abs(p))
        if flags == RamFlag.MULTIFD_FLUSH and addr == 0:
            if self.mapped:
                raise UnknownFlags("MULTIFD_FLUSH in a mapped-ram stream", offset=d.abs(p),
                                   section="ram", found=f"0x{flags:x}")
            d._pos = p + 8
            return RamMultifdFlush(offset=d.abs(p))
        if kind == RamFlag.HOOK:
            raise UnknownFlags("RDMA HOOK record: only valid on an RDMA connection, never in a "
                               "stream file", offset=d.abs(p), section="ram", found=f"0x{flags:x}")
        if kind in (RamFlag.ZERO, RamFlag.PAGE, RamFlag.XBZRLE, RamFlag.COMPRESS_PAGE):
            if self.mapped:
                raise UnknownFlags("page record in a mapped-ram stream (pages live in the "
                                   "mapped area)", offset=d.abs(p), section="ram",
                                   found=f"0x{flags:x}")
            return self._page_record(p, h, flags, kind)
        raise UnknownFlags("unknown ram record flags", offset=d.abs(p), section="ram",
                           expected="ZERO, PAGE, XBZRLE, EOS, MEM_SIZE or MULTIFD_FLUSH "
                                    "(with CONTINUE on page records)",
                           found=f"0x{flags:03x} in header 0x{h:016x}")

    # --- setup: MEM_SIZE and the block list
    def _mem_size(self, p: int, total: int):
        d = self.d
        if self.section_kind != SectionType.START or self.mem_size_seen:
            raise UnknownFlags("MEM_SIZE outside the setup section", offset=d.abs(p),
                               section="ram")
        if self.mapped:
            self.mem_size_seen = True
            self._list_remaining = total
            d._pos = p + 8
            if total == 0:
                self._list_remaining = 0
            return RamMemSize(total=total, blocks=[], offset=d.abs(p))
        d.require_page_size()
        blocks, end = self._block_list(p + 8, total)
        self.mem_size_seen = True
        for b in blocks:
            self.blocks[b.name] = b
        d._pos = end
        return RamMemSize(total=total, blocks=blocks, offset=d.abs(p))

    def _entry_head(self, q: int) -> Tuple[str, int, int]:
        d = self.d
        d.need(1, "ramblock idstr length", q)
        n = d.u8(q)
        if n == 0:
            raise UnknownBlock("empty ramblock idstr in block list", offset=d.abs(q),
                               section="ram")
        d.need(1 + n + 8, "ramblock idstr and used length", q)
        raw = d._buf[q + 1:q + 1 + n]
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            raise UnknownBlock("ramblock idstr is not ASCII", offset=d.abs(q + 1),
                               section="ram", found=bytes(raw)[:40]) from None
        used = d.be64(q + 1 + n)
        return name, used, q + 1 + n + 8

    def _check_used(self, name: str, used: int, remaining: int, at: int) -> None:
        d = self.d
        if used > remaining or used == 0:
            raise StreamError("ramblock length does not fit the MEM_SIZE total",
                              offset=d.abs(at), section="ram",
                              expected=f"1..{remaining}", found=used)
        if name in self.blocks:
            raise DuplicateBlock("ramblock listed twice", offset=d.abs(at), section="ram",
                                 found=name)

    def _page_size_candidates(self, name: str) -> Optional[set]:
        """Values a postcopy page-size field may take for this block, or None."""
        adv = self.d.postcopy_advise
        if adv is None:
            return None
        if name in self.block_page_sizes:
            return {self.block_page_sizes[name]}
        summary, tps = adv
        sizes = {1 << b for b in range(64) if summary >> b & 1}
        normal = min((s for s in sizes if s >= tps), default=None)
        return {s for s in sizes if s != normal and s >= tps}

    def _block_list(self, q: int, total: int):
        """Parse the whole block list; the only ambiguity (postcopy page-size
        fields, which no flag announces) is resolved by trying both readings and
        keeping the one(s) whose list adds up and is followed by a valid record."""
        d = self.d
        solutions: List[Tuple[List[RamBlockInfo], int]] = []
        errors: List[StreamError] = []

        def walk(q, remaining, acc, seen):
            if len(solutions) > 1:
                return
            if remaining == 0:
                d.need(8, "record after the block list", q)
                h = d.be64(q)
                if h & RAM_FLAGS_MASK in (RamFlag.EOS, RamFlag.MULTIFD_FLUSH) and not h & ~0x3FF:
                    solutions.append((list(acc), q))
                return
            name, used, r = self._entry_head(q)
            if name in seen:
                raise DuplicateBlock("ramblock listed twice", offset=d.abs(q),
                                     section="ram", found=name)
            if used > remaining or used == 0:
                raise StreamError("ramblock length does not fit the MEM_SIZE total",
                                  offset=d.abs(r - 8), section="ram",
                                  expected=f"1..{remaining}", found=used)
            options: List[Tuple[Optional[int], int]] = [(None, r)]
            cands = self._page_size_candidates(name)
            if cands:
                d.need(8, "postcopy page size or next field", r)
                v = d.be64(r)
                if v in cands:
                    options.insert(0, (v, r + 8))
                if name in self.block_page_sizes:
                    # The caller said what this block's page size is.
                    options = [o for o in options if o[0] is not None] or options
            for ps, r2 in options:
                addr = None
                if self.ignore_shared:
                    d.need(8, "x-ignore-shared block address", r2)
                    addr = d.be64(r2)
                    r2 += 8
                acc.append(RamBlockInfo(name=name, used_length=used, host_page_size=ps,
                                        addr=addr))
                seen.add(name)
                try:
                    walk(r2, remaining - used, acc, seen)
                except StreamError as err:
                    # One reading failing is expected while another may hold.
                    if len(options) == 1:
                        raise
                    errors.append(err)
                finally:
                    seen.discard(name)
                    acc.pop()

        walk(q, total, [], set())
        if not solutions and errors:
            raise max(errors, key=lambda e: e.offset or 0)
        if not solutions:
            raise StreamError("block list does not add up to the MEM_SIZE total or is not "
                              "followed by EOS", offset=d.abs(q), section="ram",
                              expected=f"entries totalling {total} bytes")
        if len(solutions) > 1:
            names = [b.name for b in solutions[0][0]]
            raise PageSizeError(
                "the postcopy page-size fields of the block list can be read two ways; state "
                "the blocks' host page sizes (block_page_sizes, CLI --block-page-size NAME=SIZE)",
                offset=d.abs(q), section="ram", found=", ".join(names))
        return solutions[0]

    def _mapped_entry(self):
        d = self.d
        q = d._pos
        P = d.require_page_size()
        name, used, r = self._entry_head(q)
        self._check_used(name, used, self._list_remaining, r - 8)
        ps = None
        cands = self._page_size_candidates(name)
        if cands:
            d.need(8 + mapped_ram.HEADER_SIZE, "postcopy page size", r)
            v = d.be64(r)
            # A mapped-ram header starts with be32 version 1, so its first
            # be64 is never a power-of-two page size.
            if v in cands:
                ps, r = v, r + 8
        addr = None
        if self.ignore_shared:
            d.need(8, "x-ignore-shared block address", r)
            addr, r = d.be64(r), r + 8
        d.need(mapped_ram.HEADER_SIZE, "mapped-ram header", r)
        hdr = mapped_ram.parse_header(d._buf[r:r + mapped_ram.HEADER_SIZE], offset=d.abs(r))
        end = r + mapped_ram.HEADER_SIZE
        mapped_ram.check_header(hdr, used_length=used, page_size=P, header_end=d.abs(end),
                                offset=d.abs(r), block=name)
        info = RamBlockInfo(name=name, used_length=used, host_page_size=ps, addr=addr,
                            mapped_ram=hdr)
        self.blocks[name] = info
        self._list_remaining -= used
        d._pos = end
        self._area = (name, hdr.pages_offset + used)
        return RamBlockEntry(block=info, offset=d.abs(q))

    def _area_chunk(self):
        """Next chunk of a mapped-ram area.  Chunks never straddle the bitmap,
        padding and page regions, and in the page region they hold whole pages,
        so consumers can index pages directly."""
        d = self.d
        name, end = self._area
        info = self.blocks[name]
        h = info.mapped_ram
        P = h.page_size
        p = d._pos
        cur = d.abs(p)
        if cur >= end:
            self._area = None
            return self.step()
        if d.lazy_pages and cur >= h.pages_offset and (d.input_size is None
                                                       or end <= d.input_size):
            # The caller can seek: hand over where the pages are, not the pages
            # (unless the input is known to end inside them: then read on, so the
            # truncation is reported where it is, before any page is used).
            length = end - cur
            avail = min(len(d._buf) - p, length)
            d._pos = p + avail
            d._skip = length - avail
            self._area = None
            return MappedRamArea(block=name, data=None, offset=cur, length=length)
        bitmap_end = h.bitmap_offset + mapped_ram.bitmap_size(info.used_length, P)
        bound = next(b for b in (h.bitmap_offset, bitmap_end, h.pages_offset, end) if b > cur)
        want = min(bound - cur, self.area_chunk)
        avail = min(len(d._buf) - p, want)
        if cur >= h.pages_offset and avail < want:
            avail -= avail % P
        if avail <= 0:
            d.need(min(want, P), f"mapped-ram area of block {name!r}")
            avail = min(len(d._buf) - p, want)
        data = np.frombuffer(d._buf, dtype=np.uint8, count=avail, offset=p)
        d._pos = p + avail
        if cur + avail >= end:
            self._area = None
        return MappedRamArea(block=name, data=data, offset=cur)

    # --- page records
    def _block_at(self, p: int, h: int, flags: int) -> Tuple[RamBlockInfo, int]:
        """The record's block and where its payload starts."""
        d = self.d
        q = p + 8
        if flags & _CONTINUE:
            if self.current is None:
                raise UnknownBlock("CONTINUE page record before any block was named",
                                   offset=d.abs(p), section="ram")
            return self.current, q
        d.need(1, "ramblock idstr length", q)
        n = d.u8(q)
        d.need(1 + n, "ramblock idstr", q)
        raw = d._buf[q + 1:q + 1 + n]
        name = raw.decode("ascii", "replace")
        block = self.blocks.get(name)
        if block is None:
            raise UnknownBlock("page record names a block not in the MEM_SIZE list",
                               offset=d.abs(q + 1), section="ram",
                               expected=", ".join(self.blocks) or "a block list first",
                               found=name)
        return block, q + 1 + n

    def _check_page(self, block: RamBlockInfo, addr: int, P: int, p: int) -> None:
        if addr % P:
            raise PageOutOfRange("page offset not aligned to the target page size",
                                 offset=self.d.abs(p), section="ram",
                                 expected=f"a multiple of {P}", found=f"0x{addr:x}")
        if addr + P > block.used_length:
            raise PageOutOfRange(f"page offset outside block {block.name!r}",
                                 offset=self.d.abs(p), section="ram",
                                 expected=f"< 0x{block.used_length:x}", found=f"0x{addr:x}")

    def _page_record(self, p: int, h: int, flags: int, kind: int):
        d = self.d
        P = d.require_page_size()
        addr = h & ~RAM_FLAGS_MASK
        if flags & _CONTINUE and kind in (RamFlag.ZERO, RamFlag.PAGE) and self.current:
            run = self._scan_run(p, kind, P)
            if run is not None:
                return run
        elif (self.xbzrle_runs and flags == _XBZRLE_CONT and self.current is not None):
            run = self._scan_xbzrle(p, P)
            if run is not None:
                return run
        block, q = self._block_at(p, h, flags)
        self._check_page(block, addr, P, p)
        named = not flags & _CONTINUE
        if kind == RamFlag.ZERO:
            d.need(1, "zero page fill byte", q)
            if d.u8(q):
                raise BadZeroPage("ZERO record with a non-zero fill byte", offset=d.abs(q),
                                  section="ram", expected=0, found=d.u8(q))
            ev = PageRun(kind=RamFlag.ZERO, block=block.name,
                         page_offsets=np.array([addr], dtype=np.uint64), named=named,
                         offset=d.abs(p))
            end = q + 1
        elif kind == RamFlag.PAGE:
            d.need(P, "page data", q)
            data = np.frombuffer(d._buf, dtype=np.uint8, count=P, offset=q).reshape(1, P)
            ev = PageRun(kind=RamFlag.PAGE, block=block.name,
                         page_offsets=np.array([addr], dtype=np.uint64), named=named,
                         data=data, offset=d.abs(p))
            end = q + P
        elif kind == RamFlag.XBZRLE:
            d.need(3, "XBZRLE encoding flag and length", q)
            enc = d.u8(q)
            if enc != ENCODING_FLAG_XBZRLE:
                raise XBZRLEError("bad XBZRLE encoding flag", offset=d.abs(q), section="ram",
                                  expected=f"0x{ENCODING_FLAG_XBZRLE:02x}", found=f"0x{enc:02x}")
            n = d.be16(q + 1)
            if n > P:
                raise XBZRLEError("XBZRLE data longer than a page", offset=d.abs(q + 1),
                                  section="ram", expected=f"<= {P}", found=n)
            d.need(3 + n, "XBZRLE data", q)
            ev = XbzrlePage(block=block.name, page_offset=addr, named=named,
                            encoded=d._buf[q + 3:q + 3 + n], offset=d.abs(p))
            end = q + 3 + n
        else:  # COMPRESS_PAGE (QEMU < 9.1)
            d.need(4, "compressed page length", q)
            n = d.be32(q)
            if n == 0 or n > MAX_COMPRESSED:
                raise StreamError("compressed page length out of range", offset=d.abs(q),
                                  section="ram", expected=f"1..{MAX_COMPRESSED}", found=n)
            d.need(4 + n, "compressed page data", q)
            ev = CompressedPage(block=block.name, page_offset=addr, named=named,
                                compressed=d._buf[q + 4:q + 4 + n], offset=d.abs(p))
            end = q + 4 + n
        self.current = block
        d._pos = end
        return ev

    def _scan_xbzrle(self, p: int, P: int) -> Optional[XbzrleRun]:
        """Consecutive CONTINUE XBZRLE records from ``p`` that are fully
        buffered and well framed; None if the first is not (the per-record
        path then reports the precise error or waits for data).  The deltas
        themselves are checked when applied.

        Records are walked one by one, but after each the following ones are
        guessed to have the same length and checked all at once with numpy:
        QEMU's deltas often do (one changed word per cache line, say)."""
        d = self.d
        buf = d._buf
        n = len(buf)
        limit = self.current.used_length - P
        misaligned = P - 1
        unpack = _XBZRLE_HEAD.unpack_from
        addrs: List = []
        starts: List = []
        lengths: List = []
        count = 0
        guess_at, backoff = 0, 4
        pos = p
        while pos + 11 <= n and count < XBZRLE_RUN_MAX:
            h, enc, length = unpack(buf, pos)
            addr = h & _ADDR_INT
            if (h & RAM_FLAGS_MASK != _XBZRLE_CONT or addr & misaligned or addr > limit
                    or enc != ENCODING_FLAG_XBZRLE or length > P or pos + 11 + length > n):
                break
            addrs.append(np.array([addr], dtype=np.uint64))
            starts.append(np.array([pos + 11 - p], dtype=np.int64))
            lengths.append(length)
            pos += 11 + length
            count += 1
            if count < guess_at:
                continue
            stride = 11 + length
            m = min(XBZRLE_RUN_MAX - count, (n - pos) // stride)
            if m < 4:
                continue
            hdr = np.ndarray((m,), dtype=">u8", buffer=buf, offset=pos,
                             strides=(stride,)).astype(np.uint64)
            tail = np.ndarray((m, 3), dtype=np.uint8, buffer=buf, offset=pos + 8,
                              strides=(stride, 1))
            a = hdr & _ADDR
            ok = ((hdr & _FLAGS) == _XBZRLE_CONT) & ((a & np.uint64(misaligned)) == 0)
            ok &= a <= np.uint64(limit)
            ok &= (tail[:, 0] == ENCODING_FLAG_XBZRLE) & (tail[:, 1] == length >> 8)
            ok &= tail[:, 2] == length & 0xFF
            take = m if ok.all() else int(np.argmin(ok))
            if take < 4:
                guess_at, backoff = count + backoff, min(backoff * 2, 256)
            else:
                backoff = 4
            if take:
                addrs.append(a[:take])
                starts.append(pos + 11 - p + stride * np.arange(take, dtype=np.int64))
                lengths.append(np.full(take, length, dtype=np.int64))
                pos += take * stride
                count += take
        if not count:
            return None
        d._pos = pos
        return XbzrleRun(block=self.current.name, page_offsets=np.concatenate(addrs),
                         data=np.frombuffer(buf, dtype=np.uint8, count=pos - p, offset=p),
                         starts=np.concatenate(starts),
                         lengths=np.concatenate([np.atleast_1d(x) for x in lengths]),
                         offset=d.abs(p))

    def _scan_run(self, p: int, kind: int, P: int) -> Optional[PageRun]:
        """Longest run of CONTINUE records of ``kind`` starting at ``p`` that is
        fully buffered and valid; None if the first record is not (the
        per-record path then reports the precise error or waits for data)."""
        d = self.d
        buf = d._buf
        stride = 9 if kind == RamFlag.ZERO else 8 + P
        # bounded, so a run over a mapped input touches a bounded span of it
        avail = min((len(buf) - p) // stride, MAX_RUN_BYTES // stride)
        if avail == 0:
            return None
        used = self.current.used_length
        if used < P:
            return None
        # The low bits of a header (flags, and address bits below a page: P - 1
        # <= 0xffff) must equal the run's flags exactly; the whole header must
        # stay below the block's last page (+ those low bits).  Two cheap
        # passes: a 16-bit compare, then one max() over the headers.
        low = np.uint16(P - 1)
        want = np.uint16(kind | RamFlag.CONTINUE)
        top = np.uint64((used - P) // P * P + P - 1)
        done, step = 0, 16
        while done < avail:
            m = min(avail, done + step)
            at = p + done * stride
            ok = (np.ndarray((m - done,), dtype=">u2", buffer=buf, offset=at + 6,
                             strides=(stride,)) & low) == want
            if kind == RamFlag.ZERO:
                ok &= np.ndarray((m - done,), dtype=np.uint8, buffer=buf, offset=at + 8,
                                 strides=(stride,)) == 0
            hdr = np.ndarray((m - done,), dtype=">u8", buffer=buf, offset=at, strides=(stride,))
            if ok.all() and hdr.max() <= top:
                done = m
                step *= 8
                continue
            ok &= hdr.astype(np.uint64) <= top
            done += int(np.flatnonzero(~ok)[0])
            break
        if done == 0:
            return None
        hdr = np.ndarray((done,), dtype=">u8", buffer=buf, offset=p, strides=(stride,))
        offsets = hdr.astype(np.uint64) & _ADDR
        data = None
        if kind == RamFlag.PAGE:
            data = np.ndarray((done, P), dtype=np.uint8, buffer=buf, offset=p + 8,
                              strides=(stride, 1))
        d._pos = p + done * stride
        return PageRun(kind=RamFlag(kind), block=self.current.name, page_offsets=offsets,
                       named=False, data=data, offset=d.abs(p))


# ------------------------------------------------------------------- encoding

def _name_bytes(name: str) -> bytes:
    raw = name.encode("ascii")
    return bytes([len(raw)]) + raw


def encode_block_info(b: RamBlockInfo) -> bytes:
    out = bytearray(_name_bytes(b.name))
    out += b.used_length.to_bytes(8, "big")
    if b.host_page_size is not None:
        out += b.host_page_size.to_bytes(8, "big")
    if b.addr is not None:
        out += b.addr.to_bytes(8, "big")
    if b.mapped_ram is not None:
        out += mapped_ram.encode_header(b.mapped_ram)
    return bytes(out)


def page_run_parts(run: PageRun, page_size: int, out: Optional[np.ndarray] = None):
    """(head, body) of a run's encoding: ``head`` the bytes of a named first
    record (or b""), ``body`` a (records, record size) uint8 array of the
    CONTINUE records (or None).  Writers send both without joining them; a
    writer that passes ``out`` (rows of 8 + page size bytes, reused between
    runs) saves a fresh buffer per run."""
    n = run.count
    if n == 0:
        return b"", None
    offs = np.asarray(run.page_offsets, dtype=np.uint64)
    flag = np.uint64(int(run.kind) | RamFlag.CONTINUE)
    head = b""
    start = 0
    if run.named:
        first = int(offs[0]) | int(run.kind)
        head = first.to_bytes(8, "big") + _name_bytes(run.block)
        if run.kind == RamFlag.ZERO:
            head += b"\x00"
        else:
            head += np.ascontiguousarray(run.data[0]).tobytes()
        start = 1
    m = n - start
    if m == 0:
        return head, None
    hdr = (offs[start:] | flag).astype(">u8").view(np.uint8).reshape(m, 8)
    if run.kind == RamFlag.ZERO:
        out = np.zeros((m, 9), dtype=np.uint8)
        out[:, :8] = hdr
    else:
        if out is not None and out.shape[0] >= m and out.shape[1] == 8 + page_size:
            out = out[:m]
        else:
            out = np.empty((m, 8 + page_size), dtype=np.uint8)
        out[:, :8] = hdr
        out[:, 8:] = run.data[start:]
    return head, out


def encode_page_run(run: PageRun, page_size: int) -> bytes:
    """Bytes of a run of page records (numpy assembles all records at once)."""
    head, body = page_run_parts(run, page_size)
    return head if body is None else head + body.tobytes()


def page_run_matches(run: PageRun, buf, start: int, page_size: int) -> Optional[int]:
    """Length of ``run``'s encoding if it equals ``buf[start:]``, else None.

    The lossless check without building the bytes: record headers (and the
    block name of a named first record) are encoded as ``encode_page_run``
    would and compared with the input's header fields in place; page
    payloads are compared by identity, since a decoded run's data is a view of
    exactly those input bytes (anything else is compared byte by byte).
    """
    n = run.count
    stride = 9 if run.kind == RamFlag.ZERO else 8 + page_size
    pos = start
    k = 0
    if run.named:
        first = encode_page_run(PageRun(run.kind, run.block, run.page_offsets[:1], True,
                                        None if run.data is None else run.data[:1]), page_size)
        if bytes(buf[pos:pos + len(first)]) != first:
            return None
        pos += len(first)
        k = 1
    m = n - k
    if m == 0:
        return pos - start
    if len(buf) - pos < m * stride:
        return None
    want = (np.asarray(run.page_offsets[k:], dtype=np.uint64)
            | np.uint64(int(run.kind) | RamFlag.CONTINUE))
    got = np.ndarray((m,), dtype=">u8", buffer=buf, offset=pos, strides=(stride,))
    if not np.array_equal(got.astype(np.uint64), want):
        return None
    if run.kind == RamFlag.ZERO:
        fill = np.ndarray((m,), dtype=np.uint8, buffer=buf, offset=pos + 8, strides=(stride,))
        if fill.any():
            return None
    else:
        data = run.data[k:]
        src = np.ndarray((m, page_size), dtype=np.uint8, buffer=buf, offset=pos + 8,
                         strides=(stride, 1))
        same_memory = (data.__array_interface__["data"][0] == src.__array_interface__["data"][0]
                       and data.strides == src.strides)
        if not same_memory and not np.array_equal(data, src):
            return None
    return pos + m * stride - start


def encode_ram_record(rec, page_size: Optional[int]) -> bytes:
    if isinstance(rec, PageRun):
        return encode_page_run(rec, page_size)
    if isinstance(rec, RamEos):
        return int(RamFlag.EOS).to_bytes(8, "big")
    if isinstance(rec, RamMultifdFlush):
        return int(RamFlag.MULTIFD_FLUSH).to_bytes(8, "big")
    if isinstance(rec, RamMemSize):
        out = bytearray((rec.total | RamFlag.MEM_SIZE).to_bytes(8, "big"))
        for b in rec.blocks:
            out += encode_block_info(b)
        return bytes(out)
    if isinstance(rec, RamBlockEntry):
        return encode_block_info(rec.block)
    if isinstance(rec, MappedRamArea):
        if rec.data is None:
            raise TypeError("a lazy mapped-ram chunk has no bytes to encode; read them from "
                            "the source file at its offset")
        return np.asarray(rec.data, dtype=np.uint8).tobytes()
    if isinstance(rec, XbzrlePage):
        flags = RamFlag.XBZRLE | (0 if rec.named else RamFlag.CONTINUE)
        out = (rec.page_offset | flags).to_bytes(8, "big")
        if rec.named:
            out += _name_bytes(rec.block)
        enc = bytes(rec.encoded)
        return out + bytes([ENCODING_FLAG_XBZRLE]) + len(enc).to_bytes(2, "big") + enc
    if isinstance(rec, XbzrleRun):
        return encode_xbzrle_run(rec)
    if isinstance(rec, CompressedPage):
        flags = RamFlag.COMPRESS_PAGE | (0 if rec.named else RamFlag.CONTINUE)
        out = (rec.page_offset | flags).to_bytes(8, "big")
        if rec.named:
            out += _name_bytes(rec.block)
        comp = bytes(rec.compressed)
        return out + len(comp).to_bytes(4, "big") + comp
    raise TypeError(f"not a ram record: {type(rec).__name__}")


def encode_xbzrle_run(run: XbzrleRun) -> bytes:
    """Bytes of a run of CONTINUE XBZRLE records (numpy assembles them all)."""
    k = run.count
    if k == 0:
        return b""
    lengths = np.asarray(run.lengths, dtype=np.int64)
    starts = np.asarray(run.starts, dtype=np.int64)
    size = 11 + lengths
    at = np.cumsum(size) - size
    total = int(size.sum())
    data = np.asarray(run.data, dtype=np.uint8).reshape(-1)
    if data.size >= total and np.array_equal(starts, at + 11):
        # a decoded run: the deltas already sit where the output wants them
        out = data[:total].copy()
    else:
        out = np.empty(total, dtype=np.uint8)
        n = int(lengths.sum())
        if n:
            step = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            out[np.repeat(at + 11, lengths) + step] = data[np.repeat(starts, lengths) + step]
    hdr = (np.asarray(run.page_offsets, dtype=np.uint64) | np.uint64(_XBZRLE_CONT))
    out[at[:, None] + np.arange(8)] = hdr.astype(">u8").view(np.uint8).reshape(k, 8)
    out[at + 8] = ENCODING_FLAG_XBZRLE
    out[at + 9] = lengths >> 8
    out[at + 10] = lengths & 0xFF
    return out.tobytes()
