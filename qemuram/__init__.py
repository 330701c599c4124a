"""qemuram: QEMU migration / savevm streams, byte for byte, with guest RAM decoded."""
from .errors import (QemuramError, UsageError, StreamError, TruncatedStream, BadMagic,
                     UnsupportedVersion, UnknownSection, UnknownCommand, UnknownFlags,
                     UnknownBlock, DuplicateBlock, PageOutOfRange, BadZeroPage,
                     XBZRLEError, FooterMismatch, TrailingGarbage, VMDescError,
                     PageSizeError, MappedRamError, ContainerError)

from .stream import Stream, open
from .image import RamBlock, MemoryImage
from .framing import Decoder, NEED_DATA, encode_record
from .io import iter_records

__version__ = "0.1.0"

__all__ = ["open", "Stream", "RamBlock", "MemoryImage", "Decoder", "NEED_DATA", "encode_record",
           "iter_records", "QemuramError", "UsageError", "StreamError", "TruncatedStream",
           "BadMagic", "UnsupportedVersion", "UnknownSection", "UnknownCommand", "UnknownFlags",
           "UnknownBlock", "DuplicateBlock", "PageOutOfRange", "BadZeroPage", "XBZRLEError",
           "FooterMismatch", "TrailingGarbage", "VMDescError", "PageSizeError", "MappedRamError",
           "ContainerError"]
