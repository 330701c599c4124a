"""The qemuram exception family.

Two branches, as in h11: ``StreamError`` when the bytes are bad (each carries the
byte offset and what was expected), ``UsageError`` when the caller asked for
something the library cannot do with this input.
"""
from __future__ import annotations

from typing import Any, Optional


class QemuramError(Exception):
    """Base of everything qemuram raises on purpose."""


class UsageError(QemuramError, ValueError):
    """The caller misused the API or asked for something impossible."""


class StreamError(QemuramError):
    """The input is not a valid QEMU migration stream.

    ``offset`` is the absolute byte offset in the input where the problem was
    found; ``section`` the idstr of the enclosing section if any; ``expected``
    and ``found`` say what should have been there.
    """

    def __init__(self, message: str, *, offset: Optional[int] = None,
                 section: Optional[str] = None, expected: Any = None,
                 found: Any = None, record: Optional[str] = None):
        self.message = message
        self.offset = offset
        self.section = section
        self.expected = expected
        self.found = found
        self.record = record
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.offset is not None:
            parts.append(f"at byte {self.offset} (0x{self.offset:x})")
        if self.section is not None:
            parts.append(f"in section {self.section!r}")
        if self.record is not None:
            parts.append(f"record {self.record}")
        where = (" ".join(parts) + ": ") if parts else ""
        text = where + self.message
        if self.expected is not None:
            text += f"; expected {self.expected}"
        if self.found is not None:
            text += f", found {self.found}"
        return text

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, "message": self.message,
                "offset": self.offset, "section": self.section,
                "expected": None if self.expected is None else str(self.expected),
                "found": None if self.found is None else str(self.found)}


class TruncatedStream(StreamError):
    """The input ended inside a record."""


class BadMagic(StreamError):
    """Not a QEMU migration stream (or a container qemuram does not know)."""


class UnsupportedVersion(StreamError):
    """A format or section version this codec does not implement."""


class UnknownSection(StreamError):
    """A section type byte, or a section id never started."""


class UnknownCommand(StreamError):
    """A COMMAND number QEMU does not define, or a bad command length."""


class UnknownFlags(StreamError):
    """A ram record header with flag bits that make no valid record."""


class UnknownBlock(StreamError):
    """A ram record names a RAMBlock not listed in the setup, or none at all."""


class DuplicateBlock(StreamError):
    """The same RAMBlock is listed twice in the MEM_SIZE setup."""


class PageOutOfRange(StreamError):
    """A page offset outside its block, or not page aligned."""


class BadZeroPage(StreamError):
    """A ZERO record whose fill byte is not 0."""


class XBZRLEError(StreamError):
    """An XBZRLE record that is too long or does not decode."""


class FooterMismatch(StreamError):
    """A section footer missing or naming another section."""


class TrailingGarbage(StreamError):
    """Bytes after the end of the stream (and its vmdesc)."""


class VMDescError(StreamError):
    """The JSON vmdesc trailer is malformed or disagrees with the stream."""


class PageSizeError(StreamError):
    """The target or host page size cannot be known, or is not what a record needs."""


class MappedRamError(StreamError):
    """A mapped-ram header, bitmap or page area that is inconsistent."""


class ContainerError(StreamError):
    """A container (libvirt save image, qcow2) that cannot give a stream."""
