"""Write guest-physical memory as an ELF core file or a flat raw image.

Both writers stream the memory in bounded chunks, leave all-zero pages as
holes in a sparse file (so an idle 64 GiB guest costs little disk), write under
a temporary name in the destination directory and rename it into place only
once complete.

ELF conventions follow what QEMU 10.0's ``dump-guest-memory`` (without
paging) produces, so tools that read QEMU dumps find what they look for: a 64-bit little-endian ``ET_CORE`` file, an optional
``PT_NOTE`` program header first, then one ``PT_LOAD`` per mapped range in
address order with ``p_paddr`` = guest-physical address, ``p_vaddr`` set to the
same value (QEMU does so when the dump is not paging-translated) and
``p_filesz == p_memsz``.  Unlike QEMU we start each segment's data on a page
boundary and set ``p_align`` to the page size.  volatility3's ``Elf64Layer``
needs nothing but those ``PT_LOAD`` headers (it ignores notes and sections);
tools that want CPU state (crash, gdb) need ``NT_PRSTATUS`` notes, which a
caller can pass as ``notes``.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import UsageError

__all__ = ["ElfNote", "WriteStats", "write_elf_core", "write_raw_physical",
           "EM_X86_64", "EM_386", "PT_LOAD", "PT_NOTE", "ET_CORE"]

ET_CORE = 4
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PF_X, PF_W, PF_R = 1, 2, 4

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")   # 64 bytes
_PHDR = struct.Struct("<IIQQQQQQ")           # 56 bytes
_PN_XNUM = 0xFFFF

DEFAULT_CHUNK = 16 * 1024 * 1024
DEFAULT_PAGE = 4096

#: ``read(offset_in_segment, length) -> bytes-like``
Reader = Callable[[int, int], Any]


@dataclass(frozen=True)
class ElfNote:
    """One ELF note (``name`` without the trailing NUL)."""

    name: Union[str, bytes]
    type: int
    desc: bytes

    def encode(self) -> bytes:
        name = self.name.encode() if isinstance(self.name, str) else bytes(self.name)
        name += b"\0"
        desc = bytes(self.desc)
        pad = lambda n: b"\0" * (-n % 4)   # noqa: E731
        return (struct.pack("<III", len(name), len(desc), self.type)
                + name + pad(len(name)) + desc + pad(len(desc)))


@dataclass(frozen=True)
class WriteStats:
    """What a writer produced: logical file size, bytes actually written
    (non-zero pages plus headers), number of memory segments."""

    path: str
    file_size: int
    data_bytes: int
    segments: int


def _segments(source: Any) -> List[Tuple[int, int, Reader]]:
    """Normalise the input: a PhysicalMemory-like object (``.ranges`` and
    ``.read(gpa, length)``) or an iterable of ``(gpa, length, read)``."""
    segs: List[Tuple[int, int, Reader]] = []
    if hasattr(source, "ranges") and hasattr(source, "reader"):
        for r in source.ranges:
            segs.append((r.gpa, r.length, source.reader(r)))
    elif hasattr(source, "ranges") and hasattr(source, "read"):
        for r in source.ranges:
            segs.append((r.gpa, r.length,
                         (lambda off, n, g=r.gpa: source.read(g + off, n))))
    else:
        for item in source:
            try:
                gpa, length, read = item
            except (TypeError, ValueError):
                raise UsageError("expected (gpa, length, read) triples or a "
                                 f"PhysicalMemory, got {item!r}") from None
            if not callable(read):
                raise UsageError(f"reader for segment at 0x{gpa:x} is not callable")
            segs.append((int(gpa), int(length), read))
    for gpa, length, _ in segs:
        if gpa < 0 or length <= 0:
            raise UsageError(f"invalid segment: gpa=0x{gpa:x} length={length}")
    segs.sort(key=lambda s: s[0])
    for (g1, l1, _), (g2, _, _) in zip(segs, segs[1:]):
        if g2 < g1 + l1:
            raise UsageError(f"segments overlap at 0x{g2:x}")
    return segs


def _check_geometry(chunk_size: int, page_size: int) -> None:
    if page_size <= 0 or page_size & (page_size - 1):
        raise UsageError(f"page_size must be a power of two, got {page_size}")
    if chunk_size < page_size or chunk_size % page_size:
        raise UsageError(f"chunk_size must be a multiple of page_size ({page_size}), "
                         f"got {chunk_size}")


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError("short write")
        view = view[n:]
        offset += n


def _write_sparse(fd: int, data: Any, offset: int, page: int) -> int:
    """Write the non-zero pages of ``data`` at ``offset``; return bytes written.

    Pages are taken relative to the start of ``data``; all-zero ones are
    skipped so the file keeps a hole there.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    n = buf.size
    full = n // page
    written = 0
    if full:
        body = buf[: full * page]
        if page % 8 == 0:
            nonzero = body.view(np.uint64).reshape(full, page // 8).any(axis=1)
        else:
            nonzero = body.reshape(full, page).any(axis=1)
        if nonzero.any():
            edges = np.flatnonzero(np.diff(np.concatenate(
                ([0], nonzero.view(np.int8), [0]))))
            view = memoryview(data).cast("B")
            for a, b in zip(edges[0::2], edges[1::2]):
                lo, hi = int(a) * page, int(b) * page
                _pwrite_all(fd, view[lo:hi], offset + lo)
                written += hi - lo
    if full * page < n:
        tail = buf[full * page:]
        if tail.any():
            _pwrite_all(fd, memoryview(data).cast("B")[full * page:], offset + full * page)
            written += n - full * page
    return written


def _stream_segment(fd: int, file_offset: int, length: int, read: Reader,
                    chunk_size: int, page: int) -> int:
    written = 0
    pos = 0
    while pos < length:
        n = min(chunk_size, length - pos)
        data = read(pos, n)
        got = memoryview(data).nbytes
        if got != n:
            raise UsageError(f"reader returned {got} bytes for a read of {n} "
                             f"at segment offset 0x{pos:x}")
        written += _write_sparse(fd, data, file_offset + pos, page)
        pos += n
    return written


class _AtomicOutput:
    """A new file under a temporary name, renamed over ``path`` on success."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        base = os.path.basename(self.path)
        self.tmp = os.path.join(directory, f".{base}.{os.getpid()}.partial")
        self.fd = -1

    def __enter__(self) -> "_AtomicOutput":
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            os.close(self.fd)
        finally:
            if exc_type is None:
                os.replace(self.tmp, self.path)
            else:
                try:
                    os.unlink(self.tmp)
                except FileNotFoundError:
                    pass


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def write_elf_core(path: Union[str, os.PathLike], ranges_with_reader: Any, *,
                   e_machine: int = EM_X86_64,
                   notes: Sequence[ElfNote] = (),
                   chunk_size: int = DEFAULT_CHUNK,
                   page_size: int = DEFAULT_PAGE,
                   fsync: bool = False) -> WriteStats:
    """Write an ELF64 little-endian core file of guest-physical memory.

    ``ranges_with_reader`` is a :class:`qemuram.physmap.PhysicalMemory` (one
    ``PT_LOAD`` per range) or an iterable of ``(gpa, length, read)`` where
    ``read(offset, n)`` returns ``n`` bytes from ``offset`` within that
    segment.  ``notes`` go into a ``PT_NOTE`` segment placed first (omitted
    when empty).  Data is read ``chunk_size`` bytes at a time; all-zero pages
    are not written.
    """
    _check_geometry(chunk_size, page_size)
    segs = _segments(ranges_with_reader)
    if not segs:
        raise UsageError("nothing to write: no memory ranges")
    note_blob = b"".join(n.encode() for n in notes)
    phnum = len(segs) + (1 if note_blob else 0)
    if phnum >= _PN_XNUM:
        raise UsageError(f"too many segments for an ELF header ({phnum})")

    phoff = _EHDR.size
    pos = phoff + phnum * _PHDR.size
    note_off = pos
    pos += len(note_blob)
    phdrs: List[bytes] = []
    if note_blob:
        phdrs.append(_PHDR.pack(PT_NOTE, 0, note_off, 0, 0, len(note_blob),
                                len(note_blob), 0))
    placed: List[Tuple[int, int, Reader]] = []
    for gpa, length, read in segs:
        # keep file offset and address congruent modulo the page size
        off = _align_up(pos, page_size) + (gpa % page_size)
        phdrs.append(_PHDR.pack(PT_LOAD, PF_R | PF_W | PF_X, off, gpa, gpa,
                                length, length, page_size))
        placed.append((off, length, read))
        pos = off + length
    total = pos

    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)   # 64-bit, LE, v1, SysV
    ehdr = _EHDR.pack(ident, ET_CORE, e_machine, 1, 0, phoff, 0, 0,
                      _EHDR.size, _PHDR.size, phnum, 0, 0, 0)
    header = ehdr + b"".join(phdrs) + note_blob
    with _AtomicOutput(path) as out:
        _pwrite_all(out.fd, header, 0)
        data = len(header)
        for off, length, read in placed:
            data += _stream_segment(out.fd, off, length, read, chunk_size, page_size)
        os.ftruncate(out.fd, total)
        if fsync:
            os.fsync(out.fd)
    return WriteStats(os.fspath(path), total, data, len(segs))


def write_raw_physical(path: Union[str, os.PathLike], physical_memory: Any, *,
                       size: Optional[int] = None,
                       chunk_size: int = DEFAULT_CHUNK,
                       page_size: int = DEFAULT_PAGE,
                       fsync: bool = False) -> WriteStats:
    """Write a flat image where file offset == guest-physical address.

    Holes of the layout and all-zero pages stay sparse.  The file is as long as
    the highest mapped address, or ``size`` if given (it may not cut a range).
    Accepts the same inputs as :func:`write_elf_core`.
    """
    _check_geometry(chunk_size, page_size)
    segs = _segments(physical_memory)
    end = max((g + n for g, n, _ in segs), default=0)
    if size is not None:
        if size < end:
            raise UsageError(f"size 0x{size:x} would cut memory mapped up to 0x{end:x}")
        end = size
    with _AtomicOutput(path) as out:
        data = 0
        for gpa, length, read in segs:
            data += _stream_segment(out.fd, gpa, length, read, chunk_size, page_size)
        os.ftruncate(out.fd, end)
        if fsync:
            os.fsync(out.fd)
    return WriteStats(os.fspath(path), end, data, len(segs))
