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
                      RamMemSize, XbzrlePage)
from .wire import RamFlag


class RamBlock:
    """One RAMBlock of the image: name, size, page sizes, guest address, content."""

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
        with open(path, "wb") as f:
            f.truncate(size)
        self._mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,)) if size else \
            np.zeros(0, dtype=np.uint8)
        npages = size // target_page_size
        self.written = np.zeros(npages, dtype=bool)     # page holds non-hole data
        self.sent = np.zeros(npages, dtype=bool)        # page named by some record
        self.counts: Dict[str, int] = {"zero": 0, "page": 0, "xbzrle": 0, "compressed": 0,
                                       "mapped": 0}
        # mapped-ram state
        self.mapped_ram = None                          # mapped-ram header, if any
        self.bitmap = bytearray()
        self.present: Optional[np.ndarray] = None

    @property
    def page_size(self) -> int:
        """The block's page size: its host page size when known, else the target's."""
        return self.host_page_size or self.target_page_size

    def pages(self) -> np.ndarray:
        """(npages, page size) view of the content."""
        P = self.target_page_size
        return self._mm[: self.size // P * P].reshape(-1, P)

    def array(self) -> np.ndarray:
        """Read-only numpy view of the whole block."""
        v = self._mm.view()
        v.flags.writeable = False
        return v

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"read of {length} bytes at 0x{offset:x} is outside block "
                             f"{self.name!r} (size 0x{self.size:x})")
        return self._mm[offset:offset + length].tobytes()

    def write(self, offset: int, data) -> None:
        """Overwrite guest memory (e.g. before re-encoding with new content)."""
        data = np.frombuffer(bytes(data), dtype=np.uint8)
        if offset < 0 or offset + data.size > self.size:
            raise UsageError(f"write of {data.size} bytes at 0x{offset:x} is outside block "
                             f"{self.name!r} (size 0x{self.size:x})")
        self._mm[offset:offset + data.size] = data
        P = self.target_page_size
        first, last = offset // P, (offset + max(data.size, 1) - 1) // P
        self.written[first:last + 1] = True

    def flush(self) -> None:
        if isinstance(self._mm, np.memmap):
            self._mm.flush()

    def close(self) -> None:
        self._mm = np.zeros(0, dtype=np.uint8)

    def __repr__(self) -> str:
        return f"RamBlock({self.name!r}, size=0x{self.size:x}, page_size={self.page_size})"


class MemoryImage:
    """Builds the final guest memory from ram records, in a directory of sparse files."""

    def __init__(self, directory: Optional[str] = None, *, keep: bool = False,
                 file_names: Optional[Dict[str, str]] = None):
        self._own = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="qemuram-")
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
        blk = RamBlock(info.name, info.used_length, page_size, self._path(info.name),
                       host_page_size=info.host_page_size, addr=info.addr)
        blk.mapped_ram = info.mapped_ram
        self.blocks[info.name] = blk
        return blk

    def apply(self, rec, page_size: Optional[int]) -> None:
        """Apply one decoded record (non-ram records are ignored)."""
        if isinstance(rec, PageRun):
            blk = self.blocks[rec.block]
            P = blk.target_page_size
            idx = (np.asarray(rec.page_offsets) // np.uint64(P)).astype(np.intp)
            pages = blk.pages()
            blk.sent[idx] = True
            if rec.kind == RamFlag.ZERO:
                blk.counts["zero"] += rec.count
                hit = idx[blk.written[idx]]
                if hit.size:
                    pages[hit] = 0
                    blk.written[hit] = False
            else:
                blk.counts["page"] += rec.count
                pages[idx] = rec.data
                blk.written[idx] = True
        elif isinstance(rec, XbzrlePage):
            blk = self.blocks[rec.block]
            P = blk.target_page_size
            i = rec.page_offset // P
            page = blk.pages()[i]
            data_at = rec.offset + 8 + (1 + len(rec.block) if rec.named else 0) + 3
            xbzrle.decode(rec.encoded, page, offset=data_at)
            blk.written[i] = True
            blk.sent[i] = True
            blk.counts["xbzrle"] += 1
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
            blk.pages()[i] = np.frombuffer(raw, dtype=np.uint8)
            blk.written[i] = True
            blk.sent[i] = True
            blk.counts["compressed"] += 1
        elif isinstance(rec, RamMemSize):
            for info in rec.blocks:
                self.add_block(info, page_size)
        elif isinstance(rec, RamBlockEntry):
            self.add_block(rec.block, page_size)
        elif isinstance(rec, MappedRamArea):
            self._mapped_area(rec)

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
            sel = blk.present[first:first + n]
            if sel.any():
                src = data[: n * P].reshape(n, P)[sel]
                nz = src.any(axis=1)             # keep holes for zero pages
                idx = np.flatnonzero(sel)[nz] + first
                blk.pages()[idx] = src[nz]
                blk.written[idx] = True

    def flush(self) -> None:
        for b in self.blocks.values():
            b.flush()

    def close(self) -> None:
        for b in self.blocks.values():
            b.close()
        if self._own and not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)


def block_file_name(name: str) -> str:
    """A file name for a block idstr (idstrs contain '/' and '@')."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("_")
    return (safe or "block") + ".raw"
