"""Thin adapters around the sans-I/O Decoder: files, pipes, sockets.

A seekable source gets its vmdesc read ahead from the tail (so device
sections are measured as they arrive); a pipe buffers the small device-state
tail instead.  Reads go through one preallocated buffer with ``readinto``.
"""
from __future__ import annotations

import io
import mmap
import os
import stat
from typing import BinaryIO, Iterator, Optional, Tuple

from .framing import NEED_DATA, Decoder, find_vmdesc, parse_vmdesc_at
from .wire import MAX_VMDESC

CHUNK = 8 << 20


def is_seekable(f) -> bool:
    """True when seeking is cheap (a real file, not a decompressing reader)."""
    if getattr(f, "_emulated_seek", False) or type(f).__name__ == "_Decompressed":
        return False
    try:
        return f.seekable() and f.seek(0, io.SEEK_CUR) is not None
    except (AttributeError, OSError, ValueError):
        return False


def read_vmdesc_ahead(f: BinaryIO, start: int = 0) -> Optional[dict]:
    """The JSON trailer of a seekable stream, or None when there is none.

    The marker must be the last 0x06 byte of the file (JSON text holds none),
    so the window only grows while no 0x06 has been seen at all.
    """
    pos = f.tell()
    try:
        end = f.seek(0, io.SEEK_END)
        window = 1 << 16
        while True:
            lo = max(start, end - window)
            f.seek(lo)
            tail = f.read(end - lo)
            i = tail.rfind(b"\x06")
            if i >= 0 or lo == start or window > MAX_VMDESC:
                break
            window *= 4
        if i < 0:
            return None
        j = find_vmdesc(tail[i:], exact=True)
        if j is None:
            return None
        return parse_vmdesc_at(tail, i, lo)
    finally:
        f.seek(pos)


def source_extent(f) -> Optional[Tuple[int, int]]:
    """(OS file descriptor, file offset of the stream's current byte) when the
    stream is a plain byte range of a real file (a plain stream, or a libvirt
    save image's stream window), else None.  Lazy readers pread from it."""
    from .containers import _Window
    if isinstance(f, _Window):
        base, inner = f.base_offset + f.tell(), f._f
        if not isinstance(inner, (io.BufferedReader, io.FileIO)):
            return None
        return inner.fileno(), base
    if isinstance(f, (io.BufferedReader, io.FileIO)) and not getattr(f, "_emulated_seek", False):
        try:
            return f.fileno(), f.tell()
        except (OSError, ValueError):
            return None
    return None


def iter_records(f: BinaryIO, *, decoder: Optional[Decoder] = None, chunk: int = CHUNK,
                 lazy_pages: bool = False, **options) -> Iterator:
    """Decode a binary file object (file, pipe, socket makefile) record by record.

    Records carry numpy views of the read buffer: copy what you keep before
    asking for the next record.  With ``lazy_pages`` and a seekable input,
    mapped-ram page areas are seeked over and come as ``MappedRamArea`` with
    ``data=None`` (offset and length only): read what you need from the file.
    """
    if decoder is None:
        if "vmdesc" not in options and is_seekable(f):
            options["vmdesc"] = read_vmdesc_ahead(f, f.tell())
            if options["vmdesc"] is None:
                options.pop("vmdesc")
        decoder = Decoder(**options)
    readinto = getattr(f, "readinto", None) if is_seekable(f) else None
    read = getattr(f, "read1", None) or f.read
    end = None
    if lazy_pages and readinto is not None:
        decoder.lazy_pages = True
    mapped = _map_whole_file(f, decoder) if readinto is not None else None
    if mapped is not None:
        yield from _iter_mapped(decoder, mapped)
        return
    if decoder.lazy_pages and readinto is not None:
        here = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(here)
        decoder.input_size = decoder.offset + decoder.buffered + (end - here)
    while True:
        ev = decoder.next_event()
        if ev is None:
            return
        if ev is NEED_DATA:
            skip = decoder.pending_skip
            if skip and end is not None:
                here = f.tell()
                if here + skip <= end:        # else read on: the decoder reports the truncation
                    f.seek(here + skip)
                    decoder.skipped(skip)
                    continue
            if readinto is not None:
                if not decoder.fill(readinto, chunk):
                    decoder.feed_eof()
                continue
            data = read(chunk)
            if not data:
                decoder.feed_eof()
            else:
                decoder.feed(data)
            continue
        yield ev


MAP_MIN = 32 << 20          # smaller files are simply read
_RELEASE = 16 << 20         # mapped input given back to the kernel in steps of this


def _map_whole_file(f, decoder: Decoder):
    """An mmap of a plain regular file holding the stream from byte 0, when
    worth it: the decoder then reads the page cache in place (no copy into
    a buffer)."""
    if not isinstance(f, (io.BufferedReader, io.FileIO)) or decoder.offset or decoder.buffered:
        return None
    try:
        fd = f.fileno()
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < MAP_MIN or f.tell() != 0:
            return None
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    if hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_SEQUENTIAL)
    return mm


def _iter_mapped(decoder: Decoder, mm) -> Iterator:
    """Records of a mapped file.  Consumed ranges are dropped from this
    process's page tables as it goes (the page cache keeps them), so resident
    memory stays bounded; records still being used fault back in."""
    decoder.map_input(mm)
    released = 0
    release = getattr(mm, "madvise", None)
    while True:
        ev = decoder.next_event()
        if ev is None:
            break
        if ev is NEED_DATA:              # cannot happen with the whole input: be safe
            raise AssertionError("mapped decoder asked for more data")
        yield ev
        done = decoder.offset - _RELEASE
        if release is not None and done - released >= _RELEASE:
            upto = done - done % mmap.PAGESIZE
            release(mmap.MADV_DONTNEED, released, upto - released)
            released = upto


def open_input(src, *, snapshot=None):
    """(binary file with the QEMU stream, container description) for a path,
    '-' (stdin) or an open binary file.  Seekable inputs may be libvirt save
    images, qcow2 images with internal snapshots, or gzip/xz-wrapped streams;
    pipes may be plain or gzip-wrapped streams."""
    if src == "-" or src is None:
        import sys
        src = sys.stdin.buffer
    if not isinstance(src, (str, bytes, os.PathLike)) and not is_seekable(src):
        peek = getattr(src, "peek", None)
        head = peek(16)[:16] if peek else b""
        if head[:2] == b"\x1f\x8b":
            import gzip
            g = gzip.GzipFile(fileobj=src, mode="rb")
            g._emulated_seek = True
            return g, {"kind": "plain", "compression": "gzip"}
        return src, {"kind": "plain", "compression": None}
    from .containers import open_any
    return open_any(src, snapshot=snapshot)
