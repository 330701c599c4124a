"""Containers that hold a QEMU migration stream.

Two kinds are understood, besides a plain stream (which starts with ``QEVM``):

* a libvirt save image (``virsh save``, ``virsh managedsave``): a 92-byte
  header of 32-bit fields (little-endian as written on x86), then ``data_len``
  bytes holding the domain XML and the save cookie (each NUL-terminated, then
  zero padding), then the QEMU stream, possibly run through an external
  compressor, from byte ``92 + data_len`` to the end of the file;
* a qcow2 image with internal snapshots (``savevm``, the ``snapshot-save`` job):
  each snapshot's VM state is a complete stream kept in the image's virtual
  address space just past the end of the disk, reached through that snapshot's
  own L1 table.

``open_any`` picks the right one (and also undoes a gzip or xz wrapper around a
plain stream, as used for fixtures shipped as ``.mig.gz``).

Every file object handed out here is read-only. Errors are the
``qemuram.errors`` ones: ``BadMagic`` for data that is none of these,
``TruncatedStream`` when the file ends inside a structure and ``ContainerError``
for everything else a container can get wrong; each names the byte offset in the
container file where the problem was found.
"""
from __future__ import annotations

import bz2
import datetime as _dt
import gzip
import io
import lzma
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Dict, List, Optional, Tuple, Union

from .errors import BadMagic, ContainerError, TruncatedStream, UsageError

__all__ = [
    "Container", "LibvirtSave", "Qcow2VMState", "Qcow2Snapshot", "detect", "open_any",
    "LIBVIRT_SAVE_FORMATS", "QEVM_MAGIC",
]

QEVM_MAGIC = b"QEVM"
GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"

# ----------------------------------------------------------------- helpers


def _file_size(f: BinaryIO) -> int:
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        pos = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(pos)
        return end


def _pread(f: BinaryIO, offset: int, n: int) -> bytes:
    """Read up to n bytes at offset (shorter only at end of file)."""
    f.seek(offset)
    out = bytearray()
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _read_exact(f: BinaryIO, offset: int, n: int, what: str) -> bytes:
    data = _pread(f, offset, n)
    if len(data) != n:
        raise TruncatedStream(f"file ends inside {what}", offset=offset + len(data),
                              expected=f"{n} bytes from offset {offset}",
                              found=f"{len(data)}")
    return data


class _PositionedReader(io.RawIOBase):
    """Read-only, seekable raw reader over ``length`` bytes; subclasses
    implement ``readinto`` from ``self._pos``."""

    length = 0
    _pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            new = offset
        elif whence == io.SEEK_CUR:
            new = self._pos + offset
        elif whence == io.SEEK_END:
            new = self.length + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if new < 0:
            raise ValueError(f"negative seek position {new}")
        self._pos = new
        return new


class _Window(_PositionedReader):
    """A read-only, seekable view of ``length`` bytes of ``f`` from ``base``.

    Each read seeks ``f`` first, so several windows (and the container itself)
    can share one underlying file. ``base_offset`` tells where byte 0 of the
    window is in the container file.
    """

    def __init__(self, f: BinaryIO, base: int, length: int, owns: bool = False):
        super().__init__()
        self._f = f
        self.base_offset = base
        self.length = length
        self._pos = 0
        self._owns = owns

    def readinto(self, b) -> int:
        self._checkClosed()
        n = min(len(b), self.length - self._pos)
        if n <= 0:
            return 0
        data = _pread(self._f, self.base_offset + self._pos, n)
        got = len(data)
        memoryview(b)[:got] = data
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed and self._owns:
            self._f.close()
        super().close()


class _Decompressed(io.RawIOBase):
    """Wraps a stdlib decompressing reader: closes what it was built on, and
    turns decompressor failures into qemuram errors naming the container
    offset where the compressed data starts."""

    def __init__(self, inner, name: str, base_offset: int, end_offset: int,
                 closables: Tuple = ()):
        super().__init__()
        self._inner = inner
        self._name = name
        self.base_offset = base_offset
        self._end = end_offset
        self._closables = closables

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        # Emulated by the stdlib readers (backwards means starting over).
        return True

    def tell(self) -> int:
        return self._inner.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._guard(self._inner.seek, offset, whence)

    def readinto(self, b) -> int:
        return self._guard(self._inner.readinto, b)

    def _guard(self, fn, *args):
        self._checkClosed()
        try:
            return fn(*args)
        except EOFError as e:
            raise TruncatedStream(f"{self._name} data ends before its end marker ({e})",
                                  offset=self._end) from None
        except (OSError, zlib.error, lzma.LZMAError) as e:
            raise ContainerError(f"{self._name} data does not decompress: {e}",
                                 offset=self.base_offset) from None

    def close(self) -> None:
        if not self.closed:
            try:
                self._inner.close()
            finally:
                for c in self._closables:
                    c.close()
        super().close()


def _decompressor(name: str, raw: BinaryIO):
    """A streaming decompressing reader for ``name`` over ``raw``, or None
    when the stdlib has none (a ContainerError is raised by the caller)."""
    if name == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if name == "bzip2":
        return bz2.BZ2File(raw, mode="rb")
    if name == "xz":
        return lzma.LZMAFile(raw, mode="rb")
    if name == "zstd":
        try:
            import zstandard  # optional; not a dependency of qemuram
        except ImportError:
            return None
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(_ZstdAdapter(reader))
    return None


class _ZstdAdapter(io.RawIOBase):
    """Gives a zstandard stream reader the RawIOBase shape, with forward seek."""

    def __init__(self, reader):
        super().__init__()
        self._r = reader
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._r.read(len(b))
        memoryview(b)[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._r.close()
        super().close()


# --------------------------------------------------------------- base class


class Container:
    """Something that holds one or more QEMU streams."""

    kind: str = "container"

    def open_stream(self, *args, **kwargs) -> BinaryIO:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        if getattr(self, "_owns", False):
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------- libvirt save image

LIBVIRT_MAGIC = b"LibvirtQemudSave"
LIBVIRT_PARTIAL_MAGIC = b"LibvirtQemudPart"
LIBVIRT_HEADER_SIZE = 92          # 16 magic + 5 u32 + 14 unused u32
LIBVIRT_SAVE_VERSION = 2          # newest header version libvirt writes

#: libvirt's on-disk save format numbers (its enum is append-only; 6 "sparse"
#: means a mapped-ram stream written in place, no compressor).
LIBVIRT_SAVE_FORMATS: Dict[int, str] = {
    0: "raw",
    1: "gzip",
    2: "bzip2",
    3: "xz",
    4: "lzop",
    5: "zstd",
    6: "sparse",
}

# Field offsets in the header, for error messages.
_LV_OFF_VERSION, _LV_OFF_DATA_LEN, _LV_OFF_RUNNING, _LV_OFF_FORMAT, _LV_OFF_COOKIE = (
    16, 20, 24, 28, 32)


class LibvirtSave(Container):
    """A libvirt QEMU save image.

    Attributes: ``version``, ``data_len``, ``was_running`` (bool),
    ``compression_id`` and ``compression`` (its name), ``cookie_offset``,
    ``xml`` (domain XML), ``cookie`` (str or None), ``stream_offset``
    (``92 + data_len``: where the stream, or its compressed form, starts),
    ``stream_length`` (bytes from there to the end of the file),
    ``byte_order`` ("<" or ">").

    For the ``sparse`` format the stream is a mapped-ram one written in place:
    the offsets inside it are offsets in this file, not in the stream
    (``open_stream().base_offset`` is the difference).
    """

    kind = "libvirt-save"

    def __init__(self, f: BinaryIO, *, owns: bool = False):
        self._f = f
        self._owns = owns
        self.file_size = _file_size(f)
        hdr = _pread(f, 0, LIBVIRT_HEADER_SIZE)
        magic = hdr[:16]
        if magic == LIBVIRT_PARTIAL_MAGIC:
            raise ContainerError(
                "libvirt save image is incomplete: magic LibvirtQemudPart means the save "
                "never finished (libvirt rewrites it to LibvirtQemudSave at the end)",
                offset=0, expected=LIBVIRT_MAGIC.decode(), found=magic.decode("latin-1"))
        if magic != LIBVIRT_MAGIC[:len(magic)] or len(magic) < 16:
            if len(magic) < 16 and magic == LIBVIRT_MAGIC[:len(magic)]:
                raise TruncatedStream("file ends inside the libvirt save magic",
                                      offset=len(magic), expected="16-byte magic")
            raise BadMagic("not a libvirt save image", offset=0,
                           expected=LIBVIRT_MAGIC.decode(), found=repr(magic))
        if len(hdr) < LIBVIRT_HEADER_SIZE:
            raise TruncatedStream("file ends inside the libvirt save header",
                                  offset=len(hdr),
                                  expected=f"{LIBVIRT_HEADER_SIZE}-byte header")
        order = "<"
        fields = struct.unpack_from("<5I", hdr, 16)
        if fields[0] > LIBVIRT_SAVE_VERSION:
            # Written on a host of the other byte order: libvirt accepts that too.
            swapped = struct.unpack_from(">5I", hdr, 16)
            if 0 < swapped[0] <= LIBVIRT_SAVE_VERSION:
                order, fields = ">", swapped
        self.byte_order = order
        self.version, self.data_len, running, self.compression_id, self.cookie_offset = fields
        self.unused = struct.unpack_from(order + "14I", hdr, 36)
        if not 1 <= self.version <= LIBVIRT_SAVE_VERSION:
            raise ContainerError("unsupported libvirt save image version",
                                 offset=_LV_OFF_VERSION,
                                 expected=f"1..{LIBVIRT_SAVE_VERSION}", found=self.version)
        if self.compression_id not in LIBVIRT_SAVE_FORMATS:
            raise ContainerError(
                f"unknown libvirt save image compression id {self.compression_id}",
                offset=_LV_OFF_FORMAT,
                expected="one of " + ", ".join(f"{k} ({v})" for k, v in
                                               LIBVIRT_SAVE_FORMATS.items()),
                found=self.compression_id)
        # libvirt only runs a decompressor for version-2 images.
        self.compression = (LIBVIRT_SAVE_FORMATS[self.compression_id]
                            if self.version == 2 else "raw")
        self.was_running = bool(running)
        self.was_running_raw = running
        if self.data_len == 0:
            raise ContainerError("libvirt save header has data_len 0 (no domain XML)",
                                 offset=_LV_OFF_DATA_LEN, found=0)
        if self.cookie_offset > self.data_len:
            raise ContainerError("libvirt save cookie offset lies past the XML area",
                                 offset=_LV_OFF_COOKIE,
                                 expected=f"<= data_len {self.data_len}",
                                 found=self.cookie_offset)
        self.stream_offset = LIBVIRT_HEADER_SIZE + self.data_len
        if self.stream_offset > self.file_size:
            raise TruncatedStream(
                "file ends inside the libvirt XML area (data_len runs past the end)",
                offset=self.file_size,
                expected=f"data_len {self.data_len} bytes from offset {LIBVIRT_HEADER_SIZE}",
                found=f"file of {self.file_size} bytes")
        self.stream_length = self.file_size - self.stream_offset
        data = _read_exact(f, LIBVIRT_HEADER_SIZE, self.data_len, "the libvirt XML area")
        xml_len = self.cookie_offset or self.data_len
        self.xml = self._cstring(data[:xml_len], LIBVIRT_HEADER_SIZE, "domain XML")
        self.cookie: Optional[str] = None
        if self.cookie_offset:
            self.cookie = self._cstring(data[self.cookie_offset:],
                                        LIBVIRT_HEADER_SIZE + self.cookie_offset, "save cookie")

    @staticmethod
    def _cstring(buf: bytes, where: int, what: str) -> str:
        end = buf.find(b"\0")
        raw = buf if end < 0 else buf[:end]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ContainerError(f"{what} is not UTF-8", offset=where + e.start) from None

    @property
    def domain_name(self) -> Optional[str]:
        import xml.etree.ElementTree as ET
        try:
            return ET.fromstring(self.xml).findtext("name")
        except ET.ParseError:
            return None

    def open_stream(self) -> BinaryIO:
        """A binary file object reading the QEMU stream held in the image."""
        window = _Window(self._f, self.stream_offset, self.stream_length)
        if self.compression in ("raw", "sparse"):
            return window
        dec = _decompressor(self.compression, window)
        if dec is None:
            hint = (" (install the 'zstandard' package to read it)"
                    if self.compression == "zstd" else "")
            raise ContainerError(
                f"libvirt save image is compressed with {self.compression} "
                f"(id {self.compression_id}), which qemuram cannot decompress{hint}; "
                f"decompress bytes from offset {self.stream_offset} with "
                f"'{self.compression} -dc'", offset=_LV_OFF_FORMAT)
        return _Decompressed(dec, self.compression, self.stream_offset, self.file_size,
                             (window,))

    def describe(self) -> dict:
        return {"kind": self.kind, "xml": self.xml, "cookie": self.cookie,
                "domain_name": self.domain_name, "was_running": self.was_running,
                "compression": self.compression, "compression_id": self.compression_id,
                "version": self.version, "data_len": self.data_len,
                "cookie_offset": self.cookie_offset, "stream_offset": self.stream_offset,
                "byte_order": self.byte_order}


# ------------------------------------------------------------------ qcow2

QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_V2_HEADER = 72
_QCOW2_V3_HEADER = 104

# Incompatible feature bits.
_INCOMPAT_DIRTY = 1 << 0
_INCOMPAT_CORRUPT = 1 << 1
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_COMPRESSION = 1 << 3
_INCOMPAT_EXTL2 = 1 << 4
_INCOMPAT_KNOWN = 0x1F
_INCOMPAT_NAMES = {0: "dirty", 1: "corrupt", 2: "external data file",
                   3: "compression type", 4: "extended L2 entries (subclusters)"}

# Table entry bits.
_OFFSET_MASK = 0x00FFFFFFFFFFFE00      # bits 9..55: host offset (L1 and L2 entries)
_L2_COMPRESSED = 1 << 62
_L2_ZERO = 1 << 0
_L1_RESERVED = 0x7F000000000001FF
_L2_STD_RESERVED = 0x3F000000000001FE

_MAX_SNAPSHOTS = 65536
_MAX_SNAPSHOT_EXTRA = 1024
_MAX_L1_BYTES = 32 << 20

_QCOW2_COMPRESSION = {0: "zlib", 1: "zstd"}


@dataclass
class Qcow2Snapshot:
    """One entry of a qcow2 snapshot table."""

    index: int
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int          # the effective size (the 64-bit one when present)
    vm_state_size32: int
    vm_state_size_large: Optional[int]
    disk_size: Optional[int]
    icount: Optional[int]
    extra_data_size: int
    entry_offset: int           # where the entry starts in the image file
    extra: bytes = field(repr=False, default=b"")

    @property
    def date(self) -> _dt.datetime:
        return _dt.datetime.fromtimestamp(self.date_sec + self.date_nsec / 1e9,
                                          tz=_dt.timezone.utc)

    @property
    def has_vm_state(self) -> bool:
        return self.vm_state_size > 0

    def as_dict(self) -> dict:
        return {"index": self.index, "id": self.id, "name": self.name,
                "vm_state_size": self.vm_state_size, "date_sec": self.date_sec,
                "date_nsec": self.date_nsec, "vm_clock_nsec": self.vm_clock_nsec,
                "disk_size": self.disk_size, "icount": self.icount,
                "l1_table_offset": self.l1_table_offset, "l1_size": self.l1_size}


class Qcow2VMState(Container):
    """A qcow2 image, read for the VM state of its internal snapshots.

    Attributes: ``version`` (2 or 3), ``cluster_bits``, ``cluster_size``,
    ``size`` (virtual disk size), ``l1_size`` / ``l1_table_offset`` (active L1),
    ``incompatible_features``, ``compatible_features``, ``autoclear_features``,
    ``compression_type`` ("zlib" or "zstd"), ``backing_file``, ``snapshots``
    (list of :class:`Qcow2Snapshot`, in table order).
    """

    kind = "qcow2"

    def __init__(self, f: BinaryIO, *, owns: bool = False):
        self._f = f
        self._owns = owns
        self.file_size = _file_size(f)
        hdr = _pread(f, 0, _QCOW2_V2_HEADER)
        if hdr[:4] != QCOW2_MAGIC[:len(hdr[:4])] or len(hdr) < 4:
            if len(hdr) < 4 and hdr == QCOW2_MAGIC[:len(hdr)]:
                raise TruncatedStream("file ends inside the qcow2 magic", offset=len(hdr))
            raise BadMagic("not a qcow2 image", offset=0, expected=repr(QCOW2_MAGIC),
                           found=repr(hdr[:4]))
        if len(hdr) < _QCOW2_V2_HEADER:
            raise TruncatedStream("file ends inside the qcow2 header", offset=len(hdr),
                                  expected=f"at least {_QCOW2_V2_HEADER} bytes")
        (_, self.version, self.backing_file_offset, self.backing_file_size,
         self.cluster_bits, self.size, self.crypt_method, self.l1_size,
         self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters,
         self.nb_snapshots, self.snapshots_offset) = struct.unpack(">4sIQIIQIIQQIIQ", hdr)
        if self.version not in (2, 3):
            raise ContainerError("unsupported qcow2 version", offset=4,
                                 expected="2 or 3", found=self.version)
        if not 9 <= self.cluster_bits <= 21:
            raise ContainerError("qcow2 cluster_bits out of range", offset=20,
                                 expected="9..21", found=self.cluster_bits)
        self.cluster_size = 1 << self.cluster_bits
        self.incompatible_features = 0
        self.compatible_features = 0
        self.autoclear_features = 0
        self.refcount_order = 4
        self.header_length = _QCOW2_V2_HEADER
        self.compression_type = "zlib"
        if self.version >= 3:
            ext = _read_exact(f, _QCOW2_V2_HEADER, _QCOW2_V3_HEADER - _QCOW2_V2_HEADER,
                              "the qcow2 v3 header")
            (self.incompatible_features, self.compatible_features, self.autoclear_features,
             self.refcount_order, self.header_length) = struct.unpack(">QQQII", ext)
            if (self.header_length < _QCOW2_V3_HEADER or self.header_length % 8
                    or self.header_length > self.cluster_size):
                raise ContainerError("bad qcow2 v3 header_length", offset=100,
                                     expected=f">= {_QCOW2_V3_HEADER}, multiple of 8, "
                                              f"<= cluster size", found=self.header_length)
            if self.header_length > _QCOW2_V3_HEADER:
                ct = _read_exact(f, _QCOW2_V3_HEADER, 1, "the qcow2 compression_type")[0]
                if self.incompatible_features & _INCOMPAT_COMPRESSION:
                    self.compression_type = _QCOW2_COMPRESSION.get(ct, f"unknown ({ct})")
        self._check_features()
        if self.crypt_method:
            raise ContainerError("qcow2 image is encrypted; its VM state cannot be read "
                                 "without the key", offset=32, found=self.crypt_method)
        self.l2_bits = self.cluster_bits - 3
        self.backing_file: Optional[str] = None
        if self.backing_file_offset:
            if self.backing_file_offset + self.backing_file_size > self.file_size:
                raise ContainerError("qcow2 backing file name lies past the end of the file",
                                     offset=8, found=self.backing_file_offset)
            self.backing_file = _pread(f, self.backing_file_offset,
                                       self.backing_file_size).decode("utf-8", "replace")
        self.snapshots: List[Qcow2Snapshot] = self._read_snapshot_table()

    # -- header checks

    def _check_features(self) -> None:
        inc = self.incompatible_features
        if inc & _INCOMPAT_EXTL2:
            raise ContainerError("qcow2 image uses extended L2 entries (subclusters, "
                                 "incompatible feature bit 4), which qemuram does not read",
                                 offset=72, found=f"incompatible_features 0x{inc:x}")
        if inc & _INCOMPAT_DATA_FILE:
            raise ContainerError("qcow2 image keeps its data in an external data file "
                                 "(incompatible feature bit 2); internal snapshots and VM "
                                 "state cannot live there", offset=72,
                                 found=f"incompatible_features 0x{inc:x}")
        unknown = inc & ~_INCOMPAT_KNOWN
        if unknown:
            bits = [b for b in range(64) if unknown >> b & 1]
            raise ContainerError(f"qcow2 image has unknown incompatible feature bits {bits}",
                                 offset=72, found=f"incompatible_features 0x{inc:x}")
        if self.compression_type not in ("zlib", "zstd"):
            raise ContainerError(f"qcow2 compression type {self.compression_type}",
                                 offset=_QCOW2_V3_HEADER)

    @property
    def feature_names(self) -> List[str]:
        return [n for b, n in _INCOMPAT_NAMES.items() if self.incompatible_features >> b & 1]

    # -- snapshot table

    def _read_snapshot_table(self) -> List[Qcow2Snapshot]:
        n = self.nb_snapshots
        if n == 0:
            return []
        if n > _MAX_SNAPSHOTS:
            raise ContainerError("qcow2 snapshot count too large", offset=60,
                                 expected=f"<= {_MAX_SNAPSHOTS}", found=n)
        off = self.snapshots_offset
        if off % self.cluster_size:
            raise ContainerError("qcow2 snapshot table is not cluster aligned", offset=64,
                                 found=f"snapshots_offset {off}")
        if off >= self.file_size:
            raise ContainerError(
                f"qcow2 snapshot table offset {off} is past the end of the file "
                f"({self.file_size} bytes)", offset=64, found=off)
        snaps = []
        for i in range(n):
            start = off
            fixed = _read_exact(self._f, off, 40, f"qcow2 snapshot entry {i}")
            (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock,
             vm32, extra_size) = struct.unpack(">QIHHIIQII", fixed)
            if extra_size > _MAX_SNAPSHOT_EXTRA:
                raise ContainerError(f"qcow2 snapshot entry {i}: extra data too large",
                                     offset=start + 36, expected=f"<= {_MAX_SNAPSHOT_EXTRA}",
                                     found=extra_size)
            off += 40
            extra = _read_exact(self._f, off, extra_size, f"qcow2 snapshot entry {i} extra data")
            off += extra_size
            ident = _read_exact(self._f, off, id_len, f"qcow2 snapshot entry {i} id")
            off += id_len
            name = _read_exact(self._f, off, name_len, f"qcow2 snapshot entry {i} name")
            off += name_len
            off = (off + 7) & ~7
            large = disk = icount = None
            if extra_size >= 8:
                large = struct.unpack_from(">Q", extra, 0)[0]
            if extra_size >= 16:
                disk = struct.unpack_from(">Q", extra, 8)[0]
            if extra_size >= 24:
                ic = struct.unpack_from(">Q", extra, 16)[0]
                icount = None if ic == 0xFFFFFFFFFFFFFFFF else ic
            snaps.append(Qcow2Snapshot(
                index=i, id=ident.decode("utf-8", "replace"),
                name=name.decode("utf-8", "replace"), l1_table_offset=l1_off,
                l1_size=l1_size, date_sec=date_sec, date_nsec=date_nsec,
                vm_clock_nsec=vm_clock, vm_state_size=large if large is not None else vm32,
                vm_state_size32=vm32, vm_state_size_large=large, disk_size=disk,
                icount=icount, extra_data_size=extra_size, entry_offset=start, extra=extra))
        return snaps

    # -- selection

    def _names(self) -> str:
        if not self.snapshots:
            return "(none)"
        return ", ".join(f"{s.id}:{s.name!r}" + ("" if s.has_vm_state else " (no VM state)")
                         for s in self.snapshots)

    def find_snapshot(self, name_or_id: Union[None, str, int, Qcow2Snapshot] = None
                      ) -> Qcow2Snapshot:
        """The snapshot named, or with that id; by default the last one that has
        VM state (the only one, usually)."""
        if isinstance(name_or_id, Qcow2Snapshot):
            return name_or_id
        if not self.snapshots:
            raise ContainerError("qcow2 image has no snapshots", offset=60)
        if name_or_id is None:
            with_state = [s for s in self.snapshots if s.has_vm_state]
            if not with_state:
                raise ContainerError("no qcow2 snapshot has VM state (disk-only snapshots: "
                                     f"{self._names()})", offset=self.snapshots_offset)
            return with_state[-1]
        key = str(name_or_id)
        by_id = [s for s in self.snapshots if s.id == key]
        by_name = [s for s in self.snapshots if s.name == key]
        if isinstance(name_or_id, int):
            hits = by_id
        else:
            hits = by_id + [s for s in by_name if s not in by_id]
        if not hits:
            raise ContainerError(f"no qcow2 snapshot with id or name {key!r}; snapshots are "
                                 f"{self._names()}", offset=self.snapshots_offset)
        if len(hits) > 1:
            raise ContainerError(f"{key!r} is ambiguous: it names snapshots "
                                 + ", ".join(f"{s.id}:{s.name!r}" for s in hits)
                                 + "; pass the id, or a Qcow2Snapshot",
                                 offset=self.snapshots_offset)
        return hits[0]

    def vm_state_offset(self, snap: Optional[Qcow2Snapshot] = None) -> int:
        """Virtual offset where the VM state starts: the first L1 slot past
        the disk (the snapshot's disk size when recorded)."""
        disk = self.size
        if snap is not None and snap.disk_size is not None:
            disk = snap.disk_size
        shift = self.cluster_bits + self.l2_bits
        index = (disk + (1 << shift) - 1) >> shift
        return index << shift

    def open_stream(self, name_or_id: Union[None, str, int, Qcow2Snapshot] = None
                    ) -> "Qcow2StreamReader":
        snap = self.find_snapshot(name_or_id)
        if not snap.has_vm_state:
            raise ContainerError(f"qcow2 snapshot {snap.id}:{snap.name!r} has no VM state "
                                 f"(a disk-only snapshot); snapshots are {self._names()}",
                                 offset=snap.entry_offset + 32)
        return Qcow2StreamReader(self, snap)

    def describe(self, snap: Optional[Qcow2Snapshot] = None) -> dict:
        d = {"kind": self.kind, "version": self.version, "cluster_size": self.cluster_size,
             "disk_size": self.size, "backing_file": self.backing_file,
             "snapshots": [s.as_dict() for s in self.snapshots]}
        if snap is not None:
            d.update({"snapshot": snap.name, "snapshot_id": snap.id,
                      "vm_state_size": snap.vm_state_size,
                      "vm_state_offset": self.vm_state_offset(snap),
                      "date": snap.date.isoformat()})
        return d

    # -- cluster mapping, used by the reader

    def _load_l1(self, snap: Qcow2Snapshot) -> Tuple[int, ...]:
        field_at = snap.entry_offset  # l1_table_offset is the entry's first field
        nbytes = snap.l1_size * 8
        if nbytes > _MAX_L1_BYTES:
            raise ContainerError(f"snapshot {snap.name!r}: L1 table too large",
                                 offset=field_at + 8, found=snap.l1_size)
        if snap.l1_size == 0:
            return ()
        off = snap.l1_table_offset
        if off % self.cluster_size:
            raise ContainerError(f"snapshot {snap.name!r}: L1 table offset {off} is not "
                                 "cluster aligned", offset=field_at, found=off)
        if off + nbytes > self.file_size:
            raise ContainerError(
                f"snapshot {snap.name!r}: L1 table at {off} ({snap.l1_size} entries) runs "
                f"past the end of the file ({self.file_size} bytes)",
                offset=field_at, found=off)
        return struct.unpack(f">{snap.l1_size}Q", _pread(self._f, off, nbytes))


class Qcow2StreamReader(_PositionedReader):
    """Seekable read-only view of one snapshot's VM state."""

    _L2_CACHE = 16

    def __init__(self, image: Qcow2VMState, snap: Qcow2Snapshot):
        super().__init__()
        self.image = image
        self.snapshot = snap
        self.length = snap.vm_state_size
        self.vm_state_offset = image.vm_state_offset(snap)
        self._l1 = image._load_l1(snap)
        self._l1_base = snap.l1_table_offset
        self._l2_cache: Dict[int, Tuple[int, ...]] = {}
        self._pos = 0
        cb = image.cluster_bits
        self._csize_shift = 62 - (cb - 8)
        self._csize_mask = (1 << (cb - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1
        self._zcache: Tuple[int, bytes] = (-1, b"")

    def readinto(self, b) -> int:
        self._checkClosed()
        mv = memoryview(b).cast("B")
        n = min(len(mv), self.length - self._pos)
        if n <= 0:
            return 0
        done = 0
        csize = self.image.cluster_size
        while done < n:
            vaddr = self.vm_state_offset + self._pos + done
            within = vaddr & (csize - 1)
            take = min(csize - within, n - done)
            mv[done:done + take] = self._cluster_bytes(vaddr - within, within, take)
            done += take
        self._pos += n
        return n

    # -- mapping

    def _where(self, vaddr: int) -> str:
        return (f"VM state byte {vaddr - self.vm_state_offset} of snapshot "
                f"{self.snapshot.name!r} (virtual offset {vaddr})")

    def _l2_table(self, l1_index: int, vaddr: int) -> Optional[Tuple[int, ...]]:
        if l1_index >= len(self._l1):
            return None
        entry = self._l1[l1_index]
        entry_at = self._l1_base + 8 * l1_index
        l2_off = entry & _OFFSET_MASK
        if l2_off == 0:
            return None
        img = self.image
        if entry & _L1_RESERVED or l2_off % img.cluster_size:
            raise ContainerError(f"bad L1 entry 0x{entry:016x} for {self._where(vaddr)}",
                                 offset=entry_at)
        if l2_off + img.cluster_size > img.file_size:
            raise ContainerError(
                f"L2 table offset {l2_off} for {self._where(vaddr)} is past the end of the "
                f"file ({img.file_size} bytes)", offset=entry_at, found=l2_off)
        table = self._l2_cache.get(l2_off)
        if table is None:
            raw = _pread(img._f, l2_off, img.cluster_size)
            table = struct.unpack(f">{img.cluster_size // 8}Q", raw)
            if len(self._l2_cache) >= self._L2_CACHE:
                self._l2_cache.pop(next(iter(self._l2_cache)))
            self._l2_cache[l2_off] = table
        return table, l2_off

    def _cluster_bytes(self, vcluster: int, within: int, take: int) -> bytes:
        img = self.image
        l1_index = vcluster >> (img.cluster_bits + img.l2_bits)
        got = self._l2_table(l1_index, vcluster + within)
        if got is None:
            return bytes(take)                      # no L2 table: unallocated
        table, l2_off = got
        l2_index = (vcluster >> img.cluster_bits) & ((1 << img.l2_bits) - 1)
        entry = table[l2_index]
        entry_at = l2_off + 8 * l2_index
        vaddr = vcluster + within
        if entry & _L2_COMPRESSED:
            data = self._compressed_cluster(entry, entry_at, vaddr)
            return data[within:within + take]
        if img.version >= 3 and entry & _L2_ZERO:
            return bytes(take)                      # zero cluster (v3)
        host = entry & _OFFSET_MASK
        if host == 0:
            return bytes(take)                      # unallocated
        if entry & _L2_STD_RESERVED or host % img.cluster_size:
            raise ContainerError(f"bad L2 entry 0x{entry:016x} for {self._where(vaddr)}",
                                 offset=entry_at)
        start = host + within
        if start >= img.file_size:
            raise ContainerError(
                f"data cluster at {host} for {self._where(vaddr)} is past the end of the "
                f"file ({img.file_size} bytes)", offset=entry_at, found=host)
        data = _pread(img._f, start, take)
        if len(data) < take:                        # short last cluster reads as zeros
            data += bytes(take - len(data))
        return data

    def _compressed_cluster(self, entry: int, entry_at: int, vaddr: int) -> bytes:
        img = self.image
        coff = entry & self._coffset_mask
        if self._zcache[0] == coff:
            return self._zcache[1]
        nsect = ((entry >> self._csize_shift) & self._csize_mask) + 1
        clen = nsect * 512 - (coff & 511)
        if coff >= img.file_size:
            raise ContainerError(
                f"compressed cluster at {coff} for {self._where(vaddr)} is past the end of "
                f"the file ({img.file_size} bytes)", offset=entry_at, found=coff)
        comp = _pread(img._f, coff, clen)
        try:
            if img.compression_type == "zlib":
                d = zlib.decompressobj(-15)
                out = d.decompress(comp, img.cluster_size)
            else:
                try:
                    import zstandard
                except ImportError:
                    raise ContainerError(
                        f"compressed cluster for {self._where(vaddr)} uses zstd; install the "
                        "'zstandard' package to read it", offset=entry_at) from None
                out = zstandard.ZstdDecompressor().decompressobj().decompress(comp)
                out = out[:img.cluster_size]
        except ContainerError:
            raise
        except Exception as e:  # zlib.error, zstandard.ZstdError
            raise ContainerError(f"compressed cluster at {coff} for {self._where(vaddr)} "
                                 f"does not decompress: {e}", offset=coff) from None
        if len(out) < img.cluster_size:
            raise ContainerError(f"compressed cluster at {coff} for {self._where(vaddr)} "
                                 f"gives {len(out)} bytes, not a whole cluster",
                                 offset=coff, expected=img.cluster_size, found=len(out))
        self._zcache = (coff, out)
        return out

    def close(self) -> None:
        if not self.closed:
            self._l2_cache.clear()
            if getattr(self, "_close_image", False):
                self.image.close()
        super().close()


# ------------------------------------------------------------- detection


def _head(f: BinaryIO, n: int = 16) -> bytes:
    f.seek(0)
    head = f.read(n)
    f.seek(0)
    return head


def detect(f: BinaryIO) -> Optional[Container]:
    """The container in seekable binary file ``f``, or None for a plain
    stream (``QEVM``) or data that is no known container."""
    head = _head(f)
    if head[:16] in (LIBVIRT_MAGIC, LIBVIRT_PARTIAL_MAGIC):
        return LibvirtSave(f)
    if head[:4] == QCOW2_MAGIC:
        return Qcow2VMState(f)
    return None


def _spool(src: BinaryIO) -> BinaryIO:
    tmp = tempfile.TemporaryFile()
    shutil.copyfileobj(src, tmp, 1 << 20)
    tmp.seek(0)
    return tmp


def open_any(path_or_file: Union[str, "os.PathLike[str]", BinaryIO],
             snapshot: Union[None, str, int, Qcow2Snapshot] = None
             ) -> Tuple[BinaryIO, dict]:
    """Open whatever holds a stream and return ``(stream_file, info)``.

    ``info["kind"]`` is "plain", "libvirt-save" or "qcow2"; the rest of it
    describes the container (``xml``, ``compression``, ``snapshot``...). A plain
    stream wrapped in gzip or xz (``.mig.gz``) is decompressed on the fly
    (``info["compression"]``); a container wrapped that way is decompressed to
    a temporary file first (``info["outer_compression"]``). When given a path,
    closing the returned file closes what was opened; a file object passed in
    is left open (and is the returned file for a plain stream).
    """
    owns = False
    if isinstance(path_or_file, (str, bytes, os.PathLike)):
        f: BinaryIO = open(path_or_file, "rb")
        owns = True
    else:
        f = path_or_file
    try:
        return _open_any(f, owns, snapshot)
    except BaseException:
        if owns:
            f.close()
        raise


def _open_any(f: BinaryIO, owns: bool, snapshot, outer: Optional[str] = None):
    head = _head(f)
    info_extra = {"outer_compression": outer} if outer else {}
    if head[:4] == QEVM_MAGIC:
        if snapshot is not None:
            raise UsageError("snapshot= applies to qcow2 images, this is a plain stream")
        return f, {"kind": "plain", "compression": None, **info_extra}
    if outer is None and (head[:2] == GZIP_MAGIC or head[:6] == XZ_MAGIC):
        name = "gzip" if head[:2] == GZIP_MAGIC else "xz"
        dec = _decompressor(name, f)
        end = _file_size(f)
        wrapped = _Decompressed(dec, name, 0, end, (f,) if owns else ())
        try:
            inner_head = wrapped.read(16)
            wrapped.seek(0)
        except BaseException:
            wrapped.close()
            raise
        if inner_head[:4] == QEVM_MAGIC:
            if snapshot is not None:
                wrapped.close()
                raise UsageError("snapshot= applies to qcow2 images, this is a plain stream")
            return wrapped, {"kind": "plain", "compression": name}
        if inner_head[:16] in (LIBVIRT_MAGIC, LIBVIRT_PARTIAL_MAGIC) or \
                inner_head[:4] == QCOW2_MAGIC:
            try:
                tmp = _spool(wrapped)
            finally:
                wrapped.close()
            try:
                return _open_any(tmp, True, snapshot, outer=name)
            except BaseException:
                tmp.close()
                raise
        wrapped.close()
        raise BadMagic(f"{name} data that holds neither a QEMU stream nor a known container",
                       offset=0, expected="QEVM, LibvirtQemudSave or QFI\\xfb inside",
                       found=repr(inner_head[:8]))
    container = detect(f)
    if container is None:
        raise BadMagic("not a QEMU stream, libvirt save image, qcow2 image, gzip or xz",
                       offset=0, expected="QEVM, LibvirtQemudSave, QFI\\xfb, 1f8b or fd377a585a",
                       found=repr(head[:16]))
    if isinstance(container, LibvirtSave):
        if snapshot is not None:
            raise UsageError("snapshot= applies to qcow2 images, this is a libvirt save image")
        stream = container.open_stream()
        info = container.describe()
        if owns:
            _chain_close(stream, f)
    else:
        snap = container.find_snapshot(snapshot)
        stream = container.open_stream(snap)
        info = container.describe(snap)
        if owns:
            _chain_close(stream, f)
    info.update(info_extra)
    return stream, info


def _chain_close(stream, f: BinaryIO) -> None:
    """Make closing ``stream`` close ``f`` too."""
    if isinstance(stream, _Window):
        stream._owns = True
    elif isinstance(stream, _Decompressed):
        stream._closables = tuple(stream._closables) + (f,)
    elif isinstance(stream, Qcow2StreamReader):
        stream.image._owns = True
        stream._close_image = True
