"""mapped-ram layout: per-block header, page bitmap, 1 MiB-aligned page area.

References: QEMU migration/ram.c (mapped_ram_setup_ramblock,
parse_ramblock_mapped_ram, ram_save_file_bmap).  The bitmap is an array of
host ``unsigned long`` words: little-endian 64-bit on x86-64 hosts, which is
what this module reads and writes.
"""
from __future__ import annotations

import struct

import numpy as np

from .errors import MappedRamError, UnsupportedVersion
from .records import MappedRamHeader
from .wire import MAPPED_RAM_ALIGNMENT, MAPPED_RAM_HEADER_SIZE, MAPPED_RAM_HEADER_VERSION

HEADER_SIZE = MAPPED_RAM_HEADER_SIZE
_HEADER = struct.Struct(">IQQQ")


def parse_header(raw: bytes, *, offset: int = 0) -> MappedRamHeader:
    version, page_size, bitmap_offset, pages_offset = _HEADER.unpack(bytes(raw))
    if version == 0 or version > MAPPED_RAM_HEADER_VERSION:
        raise UnsupportedVersion("mapped-ram header version", offset=offset, section="ram",
                                 expected=f"1..{MAPPED_RAM_HEADER_VERSION}", found=version)
    return MappedRamHeader(version, page_size, bitmap_offset, pages_offset)


def encode_header(h: MappedRamHeader) -> bytes:
    return _HEADER.pack(h.version, h.page_size, h.bitmap_offset, h.pages_offset)


def bitmap_size(used_length: int, page_size: int) -> int:
    """Bytes of the bitmap: one bit per page, rounded up to 64-bit words."""
    pages = used_length // page_size
    return (pages + 63) // 64 * 8


def check_header(h: MappedRamHeader, *, used_length: int, page_size: int, header_end: int,
                 offset: int, block: str) -> None:
    if h.page_size != page_size:
        raise MappedRamError(f"mapped-ram page size of block {block!r} differs from the "
                             "target page size", offset=offset + 4, section="ram",
                             expected=page_size, found=h.page_size)
    if h.bitmap_offset < header_end:
        raise MappedRamError(f"bitmap of block {block!r} overlaps its header",
                             offset=offset + 12, section="ram",
                             expected=f">= {header_end}", found=h.bitmap_offset)
    if h.pages_offset % page_size:
        raise MappedRamError(f"page area of block {block!r} is not page aligned",
                             offset=offset + 20, section="ram", found=h.pages_offset)
    if h.pages_offset < h.bitmap_offset + bitmap_size(used_length, page_size):
        raise MappedRamError(f"page area of block {block!r} overlaps its bitmap",
                             offset=offset + 20, section="ram",
                             expected=f">= {h.bitmap_offset + bitmap_size(used_length, page_size)}",
                             found=h.pages_offset)


def layout(header_offset: int, used_length: int, page_size: int):
    """QEMU's placement for a block whose header starts at ``header_offset``:
    (header, offset where the block list continues)."""
    bitmap_offset = header_offset + HEADER_SIZE
    pages_offset = bitmap_offset + bitmap_size(used_length, page_size)
    pages_offset = (pages_offset + MAPPED_RAM_ALIGNMENT - 1) // MAPPED_RAM_ALIGNMENT * MAPPED_RAM_ALIGNMENT
    h = MappedRamHeader(MAPPED_RAM_HEADER_VERSION, page_size, bitmap_offset, pages_offset)
    return h, pages_offset + used_length


def bitmap_to_bools(raw, npages: int) -> np.ndarray:
    """Bitmap bytes (little-endian 64-bit words) -> bool per page."""
    bits = np.unpackbits(np.frombuffer(bytes(raw), dtype=np.uint8), bitorder="little")
    return bits[:npages].astype(bool)


def bools_to_bitmap(present: np.ndarray) -> bytes:
    npages = present.shape[0]
    nbytes = (npages + 63) // 64 * 8
    packed = np.packbits(present.astype(np.uint8), bitorder="little")
    out = np.zeros(nbytes, dtype=np.uint8)
    out[:packed.shape[0]] = packed
    return out.tobytes()
