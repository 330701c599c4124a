"""Guest memory image: one sparse, memory-mapped file per RAMBlock.

Records are applied in stream order ("last write wins").  Pages that were
never written stay holes in the file, so a mostly-zero multi-GB guest costs
little disk and no RAM; a ZERO record only touches pages that hold data.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np

from . import mapped_ram, xbzrle
from .errors import StreamError, UsageError
from .records import (CompressedPage, MappedRamArea, PageRun, RamBlockEntry, RamBlockInfo,
                      RamMemSize, XbzrlePage, XbzrleRun)
from .wire import RamFlag


_GATHER = 4096                   # pages gathered per contiguous write
_XBZRLE_PAGES = 1024             # pages patched at once (bounds the memory it takes)
_ZEROS = bytes(1 << 20)


def _runs(idx: np.ndarray):
    """(first, last+1) pairs of consecutive values in a sorted index array."""
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [idx.size]))
    return list(zip(idx[starts].tolist(), (idx[ends - 1] + 1).tolist(), starts.tolist()))


class RamBlock:
    """One RAMBlock of the image: name, size, page sizes, guest address, content.

    Content lives in a sparse file written with positional writes (page data
    goes straight from the input buffer to the page cache, so resident memory
    stays bounded whatever the guest size); ``array()`` maps it for readers.
    """

    def __init__(self, name: str, size: int, target_page_size: int, path: str,
                 host_page_size: Optional[int] = None, gpa: Optional[int] = None,
                 addr: Optional[int] = None):
        self.name = name
        self.size = size
        self.target_page_size = target_page_size
        self.host_page_size = host_page_size
        self.gpa = gpa
        self.addr = addr
        self.path = path
        self._fd = None
        if path is not None:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self._fd, size)
        self._map: Optional[np.ndarray] = None
        npages = size // target_page_size
        self.written = np.zeros(npages, dtype=bool)     # page holds non-hole data
        self.sent = np.zeros(npages, dtype=bool)        # page named by some record
        self.counts: Dict[str, int] = {"zero": 0, "page": 0, "xbzrle": 0, "compressed": 0,
                                       "mapped": 0}
        self.mapped_ram = None                          # mapped-ram header, if any
        self.bitmap = bytearray()
        self.present: Optional[np.ndarray] = None

    @property
    def page_size(self) -> int:
        """The block's page size: its host page size when known, else the target's."""
        return self.host_page_size or self.target_page_size

    @property
    def npages(self) -> int:
        return self.written.shape[0]

    # -- reading
    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"read of {length} bytes at 0x{offset:x} is outside block "
                             f"{self.name!r} (size 0x{self.size:x})")
        parts, done = [], 0
        while done < length:
            chunk = os.pread(self._fd, length - done, offset + done)
            if not chunk:
                raise OSError(f"short read from {self.path}")
            parts.append(chunk)
            done += len(chunk)
        return b"".join(parts)

    def read_into(self, offset: int, out) -> None:
        """Fill the writable buffer ``out`` from ``offset`` (no bounds check)."""
        view = memoryview(out).cast("B")
        while len(view):
            n = os.preadv(self._fd, [view], offset)
            if not n:
                raise OSError(f"short read from {self.path}")
            view, offset = view[n:], offset + n

    def read_pages(self, first: int, count: int) -> np.ndarray:
        """(count, page size) copy of pages ``first`` .. ``first+count-1``."""
        P = self.target_page_size
        return np.frombuffer(self.read(first * P, count * P), dtype=np.uint8).reshape(count, P)

    def array(self) -> np.ndarray:
        """Read-only numpy view of the whole block (memory-mapped, lazily paged)."""
        if self._map is None:
            if self.size == 0:
                self._map = np.zeros(0, dtype=np.uint8)
            else:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.size,))
        return self._map

    def pages(self) -> np.ndarray:
        """(npages, page size) read-only view of the content."""
        P = self.target_page_size
        return self.array()[: self.npages * P].reshape(-1, P)

    # -- writing
    def write(self, offset: int, data) -> None:
        """Overwrite guest memory (e.g. before re-encoding with new content)."""
        data = memoryview(bytes(data))
        if offset < 0 or offset + len(data) > self.size:
            raise UsageError(f"write of {len(data)} bytes at 0x{offset:x} is outside block "
                             f"{self.name!r} (size 0x{self.size:x})")
        self._pwrite(data, offset)
        P = self.target_page_size
        first, last = offset // P, (offset + max(len(data), 1) - 1) // P
        self.written[first:last + 1] = True

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def write_pages(self, idx: np.ndarray, data: np.ndarray) -> None:
        """Write page rows ``data[k]`` at page indices ``idx[k]`` (sorted or not).

        Rows may be strided views of the input buffer; consecutive pages are
        gathered into one contiguous buffer per write.
        """
        P = self.target_page_size
        order = None
        if idx.size > 1 and np.any(np.diff(idx) <= 0):
            order = np.argsort(idx, kind="stable")
            idx, data = idx[order], data[order]
            # last write wins for repeated pages within one run
            keep = np.concatenate((idx[1:] != idx[:-1], [True]))
            idx, data = idx[keep], data[keep]
        for first, end, k in _runs(idx):
            n = end - first
            rows = data[k:k + n]
            if rows.strides[0] == P and rows.flags.c_contiguous:
                self._pwrite(rows.reshape(-1), first * P)
                continue
            # Strided rows (page records with their headers in between): one
            # gathering copy per 16 MiB then a single pwrite beats pwritev.
            for j in range(0, n, _GATHER):
                chunk = np.ascontiguousarray(rows[j:j + _GATHER])
                self._pwrite(chunk.reshape(-1), (first + j) * P)
        self.written[idx] = True

    def zero_pages(self, idx: np.ndarray) -> None:
        """Make pages zero; pages that were never written are holes already."""
        P = self.target_page_size
        hit = idx[self.written[idx]]
        if not hit.size:
            return
        for first, end, _ in _runs(np.unique(hit)):
            off, left = first * P, (end - first) * P
            while left:
                n = min(left, len(_ZEROS))
                self._pwrite(memoryview(_ZEROS)[:n], off)
                off, left = off + n, left - n
        self.written[hit] = False

    def close(self) -> None:
        self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __repr__(self) -> str:
        return f"RamBlock({self.name!r}, size=0x{self.size:x}, page_size={self.page_size})"


class MemoryImage:
    """Builds the final guest memory from ram records, in a directory of sparse files."""

    def __init__(self, directory: Optional[str] = None, *, keep: bool = False,
                 file_names: Optional[Dict[str, str]] = None, content: bool = True):
        """``content=False`` keeps block geometry and record counts only (for
        verification): page data is checked but not stored."""
        self.content = content
        self._own = directory is None and content
        self.directory = directory or (tempfile.mkdtemp(prefix="qemuram-") if content else None)
        self.keep = keep
        self.file_names = file_names
        self.blocks: "OrderedDict[str, RamBlock]" = OrderedDict()
        self.page_size: Optional[int] = None

    def _path(self, name: str) -> str:
        if self.file_names and name in self.file_names:
            return os.path.join(self.directory, self.file_names[name])
        return os.path.join(self.directory, block_file_name(name))

    def add_block(self, info: RamBlockInfo, page_size: int) -> RamBlock:
        if info.name in self.blocks:
            raise UsageError(f"block {info.name!r} added twice")
        self.page_size = page_size
        blk = RamBlock(info.name, info.used_length, page_size,
                       self._path(info.name) if self.content else None,
                       host_page_size=info.host_page_size, addr=info.addr)
        blk.mapped_ram = info.mapped_ram
        self.blocks[info.name] = blk
        return blk

    def apply(self, rec, page_size: Optional[int]) -> None:
        """Apply one decoded record (non-ram records are ignored)."""
        if not self.content:
            return self._check_only(rec, page_size)
        if isinstance(rec, PageRun):
            blk = self.blocks[rec.block]
            P = blk.target_page_size
            idx = (np.asarray(rec.page_offsets) // np.uint64(P)).astype(np.intp)
            blk.sent[idx] = True
            if rec.kind == RamFlag.ZERO:
                blk.counts["zero"] += rec.count
                blk.zero_pages(idx)
            else:
                blk.counts["page"] += rec.count
                data = rec.data
                nz = _nonzero_rows(data)
                if nz.all():
                    blk.write_pages(idx, data)
                else:
                    # all-zero pages sent in full (zero-page-detection=none)
                    # stay holes: zero them only where data was written before
                    blk.zero_pages(idx[~nz])
                    if nz.any():
                        blk.write_pages(idx[nz], data[nz])
        elif isinstance(rec, XbzrlePage):
            blk = self.blocks[rec.block]
            P = blk.target_page_size
            i = rec.page_offset // P
            page = bytearray(blk.read(i * P, P))
            data_at = rec.offset + 8 + (1 + len(rec.block) if rec.named else 0) + 3
            xbzrle.decode(rec.encoded, page, offset=data_at)
            blk.write(i * P, page)
            blk.sent[i] = True
            blk.counts["xbzrle"] += 1
        elif isinstance(rec, XbzrleRun):
            blk = self.blocks[rec.block]
            idx = (rec.page_offsets // np.uint64(blk.target_page_size)).astype(np.intp)
            for lo, hi in _distinct_spans(idx):
                for at in range(lo, hi, _XBZRLE_PAGES):
                    _apply_xbzrle(blk, rec, idx, at, min(hi, at + _XBZRLE_PAGES))
            blk.sent[idx] = True
            blk.counts["xbzrle"] += rec.count
        elif isinstance(rec, CompressedPage):
            blk = self.blocks[rec.block]
            P = blk.target_page_size
            try:
                raw = zlib.decompress(bytes(rec.compressed))
            except zlib.error as err:
                raise StreamError(f"compressed page does not inflate ({err})",
                                  offset=rec.offset, section="ram") from err
            if len(raw) != P:
                raise StreamError("compressed page inflates to the wrong size",
                                  offset=rec.offset, section="ram", expected=P, found=len(raw))
            i = rec.page_offset // P
            blk.write(i * P, raw)
            blk.sent[i] = True
            blk.counts["compressed"] += 1
        elif isinstance(rec, RamMemSize):
            for info in rec.blocks:
                self.add_block(info, page_size)
        elif isinstance(rec, RamBlockEntry):
            self.add_block(rec.block, page_size)
        elif isinstance(rec, MappedRamArea):
            self._mapped_area(rec)

    def _check_only(self, rec, page_size: Optional[int]) -> None:
        """Validate and count a record without storing page data."""
        if isinstance(rec, (RamMemSize, RamBlockEntry)):
            for info in (rec.blocks if isinstance(rec, RamMemSize) else [rec.block]):
                self.add_block(info, page_size)
            return
        if isinstance(rec, PageRun):
            blk = self.blocks[rec.block]
            blk.counts["zero" if rec.kind == RamFlag.ZERO else "page"] += rec.count
            idx = (np.asarray(rec.page_offsets) // np.uint64(blk.target_page_size)).astype(np.intp)
            blk.sent[idx] = True
        elif isinstance(rec, XbzrlePage):
            blk = self.blocks[rec.block]
            data_at = rec.offset + 8 + (1 + len(rec.block) if rec.named else 0) + 3
            xbzrle.decode(rec.encoded, bytearray(blk.target_page_size), offset=data_at)
            blk.sent[rec.page_offset // blk.target_page_size] = True
            blk.counts["xbzrle"] += 1
        elif isinstance(rec, XbzrleRun):
            blk = self.blocks[rec.block]
            xbzrle.decode_many(rec.data, rec.starts, rec.lengths,
                               page_size=blk.target_page_size, offset=rec.offset)
            blk.sent[(rec.page_offsets // np.uint64(blk.target_page_size)).astype(np.intp)] = True
            blk.counts["xbzrle"] += rec.count
        elif isinstance(rec, CompressedPage):
            blk = self.blocks[rec.block]
            try:
                raw = zlib.decompress(bytes(rec.compressed))
            except zlib.error as err:
                raise StreamError(f"compressed page does not inflate ({err})",
                                  offset=rec.offset, section="ram") from err
            if len(raw) != blk.target_page_size:
                raise StreamError("compressed page inflates to the wrong size", offset=rec.offset,
                                  section="ram", expected=blk.target_page_size, found=len(raw))
            blk.sent[rec.page_offset // blk.target_page_size] = True
            blk.counts["compressed"] += 1
        elif isinstance(rec, MappedRamArea):
            blk = self.blocks[rec.block]
            h, P = blk.mapped_ram, blk.target_page_size
            bsize = mapped_ram.bitmap_size(blk.size, P)
            if rec.offset < h.bitmap_offset + bsize:
                blk.bitmap += np.asarray(rec.data, dtype=np.uint8).tobytes()
                if len(blk.bitmap) >= bsize:
                    blk.present = mapped_ram.bitmap_to_bools(blk.bitmap[:bsize], blk.size // P)
                    blk.counts["mapped"] = int(blk.present.sum())
                    blk.sent[:] = True

    def _mapped_area(self, rec: MappedRamArea) -> None:
        blk = self.blocks[rec.block]
        P = blk.target_page_size
        h = blk.mapped_ram
        data = np.asarray(rec.data, dtype=np.uint8)
        start, end = rec.offset, rec.offset + data.shape[0]
        bsize = mapped_ram.bitmap_size(blk.size, P)
        if start < h.bitmap_offset + bsize and end > h.bitmap_offset:
            blk.bitmap += data.tobytes()
            if len(blk.bitmap) >= bsize:
                blk.present = mapped_ram.bitmap_to_bools(blk.bitmap[:bsize], blk.size // P)
                blk.counts["mapped"] = int(blk.present.sum())
                blk.sent[:] = True
        elif start >= h.pages_offset:
            first = (start - h.pages_offset) // P
            n = data.shape[0] // P
            sel = np.flatnonzero(blk.present[first:first + n])
            if sel.size:
                blk.write_pages(sel + first, data[: n * P].reshape(n, P)[sel]
                                if sel.size < n else data[: n * P].reshape(n, P))

    def close(self) -> None:
        for b in self.blocks.values():
            b.close()
        if self._own and not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)


def _distinct_spans(idx: np.ndarray):
    """Split a run's page indices into consecutive spans without a repeated
    page, so each span's deltas can be applied at once (a page sent twice
    needs its first delta applied before the second)."""
    n = idx.size
    if np.unique(idx).size == n:
        return [(0, n)]
    spans, seen, lo = [], set(), 0
    for k, i in enumerate(idx.tolist()):
        if i in seen:
            spans.append((lo, k))
            seen.clear()
            lo = k
        seen.add(i)
    spans.append((lo, n))
    return spans


def _apply_xbzrle(blk: RamBlock, rec: XbzrleRun, idx: np.ndarray, lo: int, hi: int) -> None:
    """Read the span's pages (sorted, one read per consecutive group), apply
    the deltas in one go, write the pages back."""
    P = blk.target_page_size
    sub = idx[lo:hi]
    order = np.argsort(sub, kind="stable")
    pages_idx = sub[order]
    rows = np.empty(sub.size, dtype=np.intp)
    rows[order] = np.arange(sub.size)
    pages = np.empty((sub.size, P), dtype=np.uint8)
    for first, end, k in _runs(pages_idx):
        blk.read_into(first * P, pages[k:k + end - first])
    xbzrle.decode_many(rec.data, rec.starts[lo:hi], rec.lengths[lo:hi], pages, rows=rows,
                       offset=rec.offset)
    blk.write_pages(pages_idx, pages)


def _nonzero_rows(data: np.ndarray) -> np.ndarray:
    """Which page rows hold a non-zero byte; cheap for the usual non-zero page
    (its first or last 8 bytes decide), a full scan only for the rest."""
    head = data[:, :8].any(axis=1) | data[:, -8:].any(axis=1)
    if head.all():
        return head
    rest = np.flatnonzero(~head)
    head[rest] = data[rest].any(axis=1)
    return head


def block_file_name(name: str) -> str:
    """A file name for a block idstr (idstrs contain '/' and '@')."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("_")
    return (safe or "block") + ".raw"
