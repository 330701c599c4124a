"""Guest memory image: one sparse, memory-mapped file per RAMBlock.

Records are applied in stream order ("last write wins").  Pages that were
never written stay holes in the file, so a mostly-zero multi-GB guest costs
little disk and no RAM; a ZERO record only touches pages that hold data.
"""
from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import zlib
from collections import OrderedDict
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from . import mapped_ram, xbzrle
from .errors import StreamError, UsageError
from .records import (CompressedPage, MappedRamArea, PageRun, RamBlockEntry, RamBlockInfo,
                      RamMemSize, XbzrlePage, XbzrleRun)
from .wire import RamFlag


_GATHER = 4096                   # pages gathered per contiguous write
_XBZRLE_PAGES = 1024             # pages patched at once (bounds the memory it takes)
_XBZRLE_BATCH = 2048             # pages patched at once through the cache (4096 makes
                                 # temporaries big enough that malloc hands them back
                                 # to the kernel each time: page faults cost more)
_XBZRLE_CACHE = 64 << 20         # bytes of XBZRLE-updated pages kept in memory, all blocks
_cache_budget = [_XBZRLE_CACHE]  # what is left of it in this process
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

    def __init__(self, name: str, size: int, target_page_size: int, path: Optional[str],
                 host_page_size: Optional[int] = None, gpa: Optional[int] = None,
                 addr: Optional[int] = None, *, window: Optional[Tuple[int, int]] = None,
                 scratch: Optional[Callable[[], str]] = None):
        """Content lives in ``path`` (a sparse file of its own), or, with
        ``window=(fd, offset)``, in someone else's file from that offset (the
        page area of a mapped-ram output being written).  ``scratch`` names a
        file to move to when a block attached to a source must change."""
        self.name = name
        self.size = size
        self.target_page_size = target_page_size
        self.host_page_size = host_page_size
        self.gpa = gpa
        self.addr = addr
        self.path = path
        self._fd = None
        self._base = 0
        self._own_fd = False
        self._source: Optional[Tuple[int, int]] = None   # (fd, offset): read-only, lazy
        self._scratch = scratch
        self._closed = False
        if window is not None:
            self._fd, self._base = window
        elif path is not None:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._own_fd = True
            os.ftruncate(self._fd, size)
        self._map: Optional[np.ndarray] = None
        npages = size // target_page_size
        self.written = np.zeros(npages, dtype=bool)     # page holds non-hole data
        # True while every written page is known to hold a non-zero byte (page
        # records are checked as they are applied); writers then need not read
        # pages to tell zero pages apart.
        self.verified_nonzero = True
        self.sent = np.zeros(npages, dtype=bool)        # page named by some record
        self.counts: Dict[str, int] = {"zero": 0, "page": 0, "xbzrle": 0, "compressed": 0,
                                       "mapped": 0}
        self.mapped_ram = None                          # mapped-ram header, if any
        self.bitmap = bytearray()
        self.present: Optional[np.ndarray] = None
        self._cache: Optional[_PageCache] = None

    @property
    def page_size(self) -> int:
        """The block's page size: its host page size when known, else the target's."""
        return self.host_page_size or self.target_page_size

    @property
    def npages(self) -> int:
        return self.written.shape[0]

    # -- a block whose pages stay in the input file (mapped-ram, read lazily)
    def attach(self, fd: int, offset: int) -> None:
        """Serve the content from ``fd`` at ``offset`` (a mapped-ram page area):
        pages marked in ``written`` are read from there, the rest are zero.
        Nothing is copied until the block is changed or mapped."""
        self.flush()
        if self.written.any():
            raise UsageError(f"block {self.name!r} already has content")
        if self._own_fd:
            os.close(self._fd)
            self._own_fd = False
            if self.path is not None:
                os.unlink(self.path)
                self.path = None
        self._fd = None
        self._source = (fd, offset)

    @property
    def attached(self) -> bool:
        return self._source is not None

    def _detach(self) -> None:
        """Give the block a file of its own before a change (copying an attached
        block's pages into it)."""
        if self._fd is not None:
            return
        self._check_open()
        if self._scratch is None:
            raise UsageError(f"block {self.name!r} is read from its input file and has no "
                             "scratch directory to be changed in")
        src = self._source
        path = self._scratch()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, self.size)
        self.path, self._fd, self._base, self._own_fd = path, fd, 0, True
        self._source = None
        self._map = None
        if src is not None:
            copy_pages(src, (fd, 0), self.written, self.target_page_size)

    def copy_to(self, fd: int, offset: int, pages: Optional[np.ndarray] = None) -> None:
        """Copy the pages marked in ``pages`` (default: ``written``) to ``fd`` at
        ``offset`` + their block offset, file to file in the kernel where it can."""
        self.flush()
        mask = self.written if pages is None else pages
        if self._fd is None and self._source is None:
            if mask.any():
                raise UsageError(f"block {self.name!r} has no stored pages to copy")
            return
        src = self._source or (self._fd, self._base)
        copy_pages(src, (fd, offset), mask, self.target_page_size)

    # -- reading
    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"read of {length} bytes at 0x{offset:x} is outside block "
                             f"{self.name!r} (size 0x{self.size:x})")
        self.flush()
        if self._source is not None:
            return self._read_attached(offset, length)
        self._check_open()
        if self._fd is None:                  # nothing stored yet: all zero
            return bytes(length)
        return _pread_exact(self._fd, length, self._base + offset)

    def _read_attached(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self._read_into(offset, memoryview(out))
        return out

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with content from ``offset`` (a reusable buffer: no
        fresh memory per read)."""
        self.flush()
        self._read_into(offset, view)

    def _read_into(self, offset: int, view: memoryview) -> None:
        view = memoryview(view).cast("B")
        length = len(view)
        if offset < 0 or offset + length > self.size:
            raise UsageError(f"read of {length} bytes at 0x{offset:x} is outside block "
                             f"{self.name!r} (size 0x{self.size:x})")
        if self._source is None:
            self._check_open()
            if self._fd is None:              # nothing stored yet: all zero
                np.frombuffer(view, dtype=np.uint8)[:] = 0
            else:
                _preadinto(self._fd, view, self._base + offset)
            return
        # Attached: pages not marked present read as zero, whatever the file holds there.
        if not length:
            return
        P = self.target_page_size
        fd, base = self._source
        first = offset // P
        written = self.written[first:(offset + length - 1) // P + 1]
        if not written.all():
            np.frombuffer(view, dtype=np.uint8)[:] = 0
        idx = np.flatnonzero(written) + first
        for a, b, _ in _runs(idx):
            lo, hi = max(a * P, offset), min(b * P, offset + length)
            _preadinto(fd, view[lo - offset:hi - offset], base + lo)

    def read_pages(self, first: int, count: int) -> np.ndarray:
        """(count, page size) copy of pages ``first`` .. ``first+count-1``."""
        P = self.target_page_size
        return np.frombuffer(self.read(first * P, count * P), dtype=np.uint8).reshape(count, P)

    def array(self) -> np.ndarray:
        """Read-only numpy view of the whole block (memory-mapped, lazily paged)."""
        self.flush()
        if self._map is None:
            self._detach()           # stale bytes under clear bitmap bits must read as zero
            if self.size == 0:
                self._map = np.zeros(0, dtype=np.uint8)
            else:
                mm = mmap.mmap(self._fd, self.size, prot=mmap.PROT_READ, offset=self._base)
                self._map = np.frombuffer(mm, dtype=np.uint8)
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
        self._detach()
        self.flush()
        self._pwrite(data, offset)
        self.verified_nonzero = False
        P = self.target_page_size
        first, last = offset // P, (offset + max(len(data), 1) - 1) // P
        self.written[first:last + 1] = True

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        offset += self._base
        while len(view):
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def write_pages(self, idx: np.ndarray, data: np.ndarray) -> None:
        """Write page rows ``data[k]`` at page indices ``idx[k]`` (sorted or not).

        Rows may be strided views of the input buffer; consecutive pages are
        gathered into one contiguous buffer per write.
        """
        self._detach()
        if self._cache is not None:
            self._cache.drop(idx)
        self._store(idx, data)

    def _store(self, idx: np.ndarray, data: np.ndarray) -> None:
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
                part = rows[j:j + _GATHER]
                chunk = _gather_buffer(part.shape[0], P)
                np.copyto(chunk, part)
                self._pwrite(chunk.reshape(-1), (first + j) * P)
        self.written[idx] = True

    def put_pages(self, idx: np.ndarray, data: np.ndarray) -> None:
        """Store decoded pages: all-zero ones become (or stay) holes, so
        ``written`` keeps meaning "holds a non-zero byte" (writers rely on it
        instead of reading pages back)."""
        nz = _nonzero_rows(data)
        if nz.all():
            self.write_pages(idx, data)
            return
        if idx.size > 1 and not np.all(np.diff(idx) > 0):
            # a page named twice: only its last version counts
            _, first_rev = np.unique(idx[::-1], return_index=True)
            keep = np.sort(idx.size - 1 - first_rev)
            idx, data, nz = idx[keep], data[keep], nz[keep]
        self.zero_pages(idx[~nz])
        if nz.any():
            self.write_pages(idx[nz], data[nz])

    def zero_pages(self, idx: np.ndarray) -> None:
        """Make pages zero; pages that were never written are holes already."""
        if self._cache is not None and self._cache.used:
            # a cached page's file copy is what needs clearing, whatever it reads as now
            cached = self._cache.slot[idx] >= 0
            if cached.any():
                self.written[idx[cached]] = False
                stale = self._cache.drop(idx)
                hit = np.concatenate((idx[self.written[idx]], stale))
            else:
                hit = idx[self.written[idx]]
        else:
            hit = idx[self.written[idx]]
        if not hit.size:
            return
        if self._source is not None:         # nothing to overwrite: clear the marks
            self.written[hit] = False
            return
        self._zero_file(hit)
        self.written[hit] = False

    def _zero_file(self, hit: np.ndarray) -> None:
        P = self.target_page_size
        for first, end, _ in _runs(np.unique(hit)):
            off, left = first * P, (end - first) * P
            while left:
                n = min(left, len(_ZEROS))
                self._pwrite(memoryview(_ZEROS)[:n], off)
                off, left = off + n, left - n

    # -- pages updated by XBZRLE, kept in memory between updates
    def _cached_rows(self, idx: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """(cache array, row of each page) with distinct pages ``idx`` loaded
        into the cache, or None when the block cannot cache them (then the
        caller reads and writes the file itself)."""
        if self._fd is None or self._source is not None or self._map is not None:
            return None
        c = self._cache
        if c is None:
            # one budget for the whole process, whatever the number of blocks
            cap = min(self.npages, _cache_budget[0] // self.target_page_size)
            if cap < 1 or idx.size > cap:
                return None
            _cache_budget[0] -= cap * self.target_page_size
            c = self._cache = _PageCache(self.npages, cap, self.target_page_size)
        if idx.size > c.rows.shape[0]:
            return None
        slot = c.slot[idx]
        miss = idx[slot < 0]
        if miss.size > c.rows.shape[0] - c.used:
            self.flush()
            miss = idx
        if miss.size:
            miss = np.sort(miss)
            at = c.used
            new = np.arange(at, at + miss.size, dtype=np.intp)
            c.slot[miss] = new
            c.page[new] = miss
            c.on_disk[new] = self.written[miss]
            c.used += miss.size
            P = self.target_page_size
            for first, end, k in _runs(miss):
                self._read_into(first * P, c.rows[at + k:at + k + end - first])
        return c.rows, c.slot[idx]

    def flush(self) -> None:
        """Write cached XBZRLE pages back to the file (before anything reads
        or writes the file directly)."""
        c = self._cache
        if c is None or not c.used:
            return
        live = np.flatnonzero(c.page[:c.used] >= 0)
        pages = c.page[live]
        order = np.argsort(pages)
        pages, live = pages[order], live[order]
        nz = self.written[pages]
        stale = pages[~nz & c.on_disk[live]]
        if stale.size:
            self._zero_file(stale)
        pages, live = pages[nz], live[nz]
        if pages.size:
            # Pages cached together sit in consecutive rows: long stretches go
            # straight from the cache to the file, the rest is gathered first.
            step = (np.diff(pages) != 1) | (np.diff(live) != 1)
            cuts = np.concatenate(([0], np.flatnonzero(step) + 1, [pages.size]))
            long = np.flatnonzero(np.diff(cuts) >= 16)
            if long.size:
                keep = np.ones(pages.size, dtype=bool)
                for a, b in zip(cuts[long].tolist(), cuts[long + 1].tolist()):
                    r = int(live[a])
                    self._pwrite(c.rows[r:r + b - a].reshape(-1),
                                 int(pages[a]) * self.target_page_size)
                    keep[a:b] = False
                pages, live = pages[keep], live[keep]
        for j in range(0, pages.size, _GATHER):
            part = live[j:j + _GATHER]
            chunk = _gather_buffer(part.size, self.target_page_size)
            np.take(c.rows, part, axis=0, out=chunk)
            self._store(pages[j:j + _GATHER], chunk)
        c.clear()

    def close(self) -> None:
        if self._fd is not None:
            self.flush()
        if self._cache is not None:
            _cache_budget[0] += self._cache.rows.nbytes
        self._cache = None
        self._map = None
        if self._fd is not None and self._own_fd:
            os.close(self._fd)
        self._fd = None
        self._source = None
        self._scratch = None
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"block {self.name!r} belongs to a closed stream")

    def __repr__(self) -> str:
        return f"RamBlock({self.name!r}, size=0x{self.size:x}, page_size={self.page_size})"


class _PageCache:
    """Pages updated by XBZRLE, by page index: rows of one preallocated array
    (untouched rows cost no memory).  Rows are handed out in order and only
    reused after a flush."""

    def __init__(self, npages: int, capacity: int, page_size: int):
        self.rows = np.empty((capacity, page_size), dtype=np.uint8)
        self.slot = np.full(npages, -1, dtype=np.int32)      # page -> row, -1: not cached
        self.page = np.full(capacity, -1, dtype=np.intp)     # row -> page, -1: free
        self.on_disk = np.zeros(capacity, dtype=bool)        # file holds data for the page
        self.used = 0

    def drop(self, idx: np.ndarray) -> np.ndarray:
        """Forget pages about to be overwritten; returns those whose file copy
        holds data (the new content must clear it)."""
        if not self.used:
            return idx[:0]
        rows = self.slot[idx]
        rows = rows[rows >= 0]
        if not rows.size:
            return idx[:0]
        pages = self.page[rows]
        stale = pages[self.on_disk[rows]]
        self.slot[pages] = -1
        self.page[rows] = -1
        return stale

    def clear(self) -> None:
        self.slot[self.page[:self.used][self.page[:self.used] >= 0]] = -1
        self.page[:self.used] = -1
        self.used = 0


class MemoryImage:
    """Builds the final guest memory from ram records, in a directory of sparse files."""

    def __init__(self, directory: Optional[str] = None, *, keep: bool = False,
                 file_names: Optional[Dict[str, str]] = None, content: bool = True,
                 attach: bool = False,
                 placement: Optional[Callable[..., Dict[str, Tuple[int, int]]]] = None):
        """``content=False`` keeps block geometry and record counts only (for
        verification): page data is checked but not stored.  ``attach=True``
        lets mapped-ram blocks be read from the input file in place (see
        ``set_source``) instead of copied.  ``placement(infos, stream, decoder)``
        may put blocks into windows of another file: {name: (fd, offset)}."""
        self.content = content
        self._own = directory is None and content
        self._directory = directory
        self.keep = keep
        self.file_names = file_names
        self.attach = attach and not keep
        self.placement = placement
        self.source: Optional[Tuple[int, int]] = None   # (fd, file offset of stream byte 0)
        self.context: tuple = ()        # (Stream, Decoder) being decoded, for placement
        self.blocks: "OrderedDict[str, RamBlock]" = OrderedDict()
        self.page_size: Optional[int] = None

    @property
    def directory(self) -> Optional[str]:
        """Created on first use: an image of attached or placed blocks needs none."""
        if self._directory is None and self._own:
            self._directory = tempfile.mkdtemp(prefix="qemuram-")
        return self._directory

    def set_source(self, fd: int, offset: int) -> None:
        """The input is a plain range of a real file: lazy mapped-ram areas are
        read from it (``fd`` is duplicated; closed with the image)."""
        self.source = (os.dup(fd), offset)

    def _path(self, name: str) -> str:
        if self.file_names and name in self.file_names:
            return os.path.join(self.directory, self.file_names[name])
        return os.path.join(self.directory, block_file_name(name))

    def _scratch_path(self, name: str) -> Callable[[], str]:
        return lambda: self._path(name)

    def add_block(self, info: RamBlockInfo, page_size: int,
                  window: Optional[Tuple[int, int]] = None) -> RamBlock:
        if info.name in self.blocks:
            raise UsageError(f"block {info.name!r} added twice")
        self.page_size = page_size
        path = None
        if self.content and window is None and not (self.attach and info.mapped_ram
                                                    and self.source is not None):
            path = self._path(info.name)
        blk = RamBlock(info.name, info.used_length, page_size, path,
                       host_page_size=info.host_page_size, addr=info.addr, window=window,
                       scratch=self._scratch_path(info.name) if self._own else None)
        blk.mapped_ram = info.mapped_ram
        self.blocks[info.name] = blk
        return blk

    def _add_blocks(self, infos: list, page_size: int) -> None:
        windows = {}
        if self.placement is not None and self.content and infos:
            windows = self.placement(infos, *self.context)
        for info in infos:
            self.add_block(info, page_size, windows.get(info.name))

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
                blk.put_pages(idx, rec.data)
        elif isinstance(rec, XbzrlePage):
            blk = self.blocks[rec.block]
            P = blk.target_page_size
            i = rec.page_offset // P
            data_at = rec.offset + 8 + (1 + len(rec.block) if rec.named else 0) + 3
            got = blk._cached_rows(np.array([i]))
            if got is None:
                page = bytearray(blk.read(i * P, P))
                xbzrle.decode(rec.encoded, page, offset=data_at)
                blk.put_pages(np.array([i]), np.frombuffer(page, dtype=np.uint8).reshape(1, P))
            else:
                rows, r = got
                page = rows[r[0]].copy()          # a bad delta leaves the cached page alone
                xbzrle.decode(rec.encoded, page, offset=data_at)
                rows[r[0]] = page
                blk.written[i] = bool(page.any())
            blk.sent[i] = True
            blk.counts["xbzrle"] += 1
        elif isinstance(rec, XbzrleRun):
            blk = self.blocks[rec.block]
            idx = (rec.page_offsets // np.uint64(blk.target_page_size)).astype(np.intp)
            for lo, hi in _distinct_spans(idx):
                for at in range(lo, hi, _XBZRLE_BATCH):
                    _apply_xbzrle(blk, rec, idx, at, min(hi, at + _XBZRLE_BATCH))
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
            blk.put_pages(np.array([i]), np.frombuffer(raw, dtype=np.uint8).reshape(1, P))
            blk.sent[i] = True
            blk.counts["compressed"] += 1
        elif isinstance(rec, RamMemSize):
            self._add_blocks(rec.blocks, page_size)
        elif isinstance(rec, RamBlockEntry):
            self._add_blocks([rec.block], page_size)
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
        blk.verified_nonzero = False       # a set bitmap bit may cover a zero page
        if rec.data is None:
            self._lazy_area(blk, rec)
            return
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

    def _lazy_area(self, blk: RamBlock, rec: MappedRamArea) -> None:
        """A page area left in the input file: attach the block to it, or copy
        its present pages over in the kernel."""
        h, P = blk.mapped_ram, blk.target_page_size
        if self.source is None:
            raise UsageError("a lazy mapped-ram area needs the input file (set_source)")
        if rec.offset != h.pages_offset or rec.length != blk.size:
            raise UsageError(f"lazy area of block {blk.name!r} at {rec.offset} does not cover "
                             "its page region")
        if blk.present is None:
            raise UsageError(f"lazy area of block {blk.name!r} before its bitmap")
        fd, base = self.source
        if blk.path is None and blk._fd is None:
            blk.attach(fd, base + rec.offset)
        else:
            copy_pages((fd, base + rec.offset), (blk._fd, blk._base), blk.present, P)
        blk.written[:] = blk.present

    def flush(self) -> None:
        """Write pages held in memory to the block files (decoding is over:
        readers may go to the files directly)."""
        for b in self.blocks.values():
            b.flush()

    def close(self) -> None:
        for b in self.blocks.values():
            b.close()
        if self.source is not None:
            os.close(self.source[0])
            self.source = None
        if self._own and not self.keep and self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)


_gather: Optional[np.ndarray] = None


def _gather_buffer(rows: int, page_size: int) -> np.ndarray:
    """A (rows, page_size) buffer reused between writes: gathering into fresh
    memory would fault in every page of it each time."""
    global _gather
    need = rows * page_size
    if _gather is None or _gather.size < need:
        _gather = np.empty(max(need, _GATHER * 4096), dtype=np.uint8)
    return _gather[:need].reshape(rows, page_size)


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    parts, done = [], 0
    while done < length:
        chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            raise OSError(f"short read at offset {offset + done} of file descriptor {fd}")
        parts.append(chunk)
        done += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)   # b"" for length 0


def _preadinto(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(f"short read at offset {offset} of file descriptor {fd}")
        view, offset = view[n:], offset + n


def copy_pages(src: Tuple[int, int], dst: Tuple[int, int], present: np.ndarray,
               page_size: int) -> None:
    """Copy the pages marked in ``present`` from (fd, offset) to (fd, offset):
    runs of present pages go through ``copy_file_range`` (no trip through user
    space), or pread/pwrite where the kernel refuses."""
    (sfd, sbase), (dfd, dbase) = src, dst
    use_cfr = hasattr(os, "copy_file_range")
    for a, b, _ in _runs(np.flatnonzero(present)):
        off, left = a * page_size, (b - a) * page_size
        while left:
            n = 0
            if use_cfr:
                try:
                    n = os.copy_file_range(sfd, dfd, min(left, 1 << 30), sbase + off, dbase + off)
                except OSError:
                    use_cfr = False
            if n <= 0:
                chunk = os.pread(sfd, min(left, 16 << 20), sbase + off)
                if not chunk:
                    raise OSError(f"short read at offset {sbase + off} of file descriptor {sfd}")
                view = memoryview(chunk)
                at = dbase + off
                while len(view):
                    w = os.pwrite(dfd, view, at)
                    view, at = view[w:], at + w
                n = len(chunk)
            off, left = off + n, left - n


def _distinct_spans(idx: np.ndarray):
    """Split a run's page indices into consecutive spans without a repeated
    page, so each span's deltas can be applied at once (a page sent twice
    needs its first delta applied before the second)."""
    n = idx.size
    if n < 2 or np.all(np.diff(np.sort(idx)) != 0):   # cheaper than np.unique here
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
    """Apply the span's deltas in one go to the block's page cache (pages
    updated again later then skip the file both ways), or, when the block
    cannot cache them, to pages read from the file and written back."""
    sub = idx[lo:hi]
    got = blk._cached_rows(sub)
    if got is not None:
        cache, rows = got
        xbzrle.decode_many(rec.data, rec.starts[lo:hi], rec.lengths[lo:hi], cache, rows=rows,
                           offset=rec.offset)
        blk.written[sub] = _nonzero_rows(cache, rows)
        return
    for at in range(lo, hi, _XBZRLE_PAGES):
        _apply_uncached(blk, rec, idx, at, min(hi, at + _XBZRLE_PAGES))


def _apply_uncached(blk: RamBlock, rec: XbzrleRun, idx: np.ndarray, lo: int, hi: int) -> None:
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
    blk.put_pages(pages_idx, pages)


def _nonzero_rows(data: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """Which page rows (all of ``data``, or ``data[rows]`` without copying them
    out) hold a non-zero byte; cheap for the usual non-zero page (its first or
    last 8 bytes decide), a full scan only for the rest."""
    if rows is None:
        head = data[:, :8].any(axis=1) | data[:, -8:].any(axis=1)
    else:
        head = data[rows, :8].any(axis=1) | data[rows, -8:].any(axis=1)
    if head.all():
        return head
    rest = np.flatnonzero(~head)
    head[rest] = (data[rest] if rows is None else data[rows[rest]]).any(axis=1)
    return head


def block_file_name(name: str) -> str:
    """A file name for a block idstr (idstrs contain '/' and '@')."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("_")
    return (safe or "block") + ".raw"
