"""qemuram: QEMU migration / savevm streams, byte for byte, with guest RAM decoded."""
from .errors import (QemuramError, UsageError, StreamError, TruncatedStream, BadMagic,
                     UnsupportedVersion, UnknownSection, UnknownCommand, UnknownFlags,
                     UnknownBlock, DuplicateBlock, PageOutOfRange, BadZeroPage,
                     XBZRLEError, FooterMismatch, TrailingGarbage, VMDescError,
                     PageSizeError, MappedRamError, ContainerError)

__version__ = "0.1.0"
