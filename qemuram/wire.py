"""Wire constants of the QEMU migration stream (savevm format 3, "ram" v4).

References: QEMU migration/savevm.c, migration/ram.c, migration/vmstate.c,
migration/xbzrle.c, include/migration/register.h.  Only numbers live here;
logic lives in framing.py, ram.py, mapped_ram.py and vmstate.py.
"""
from __future__ import annotations

import enum

FILE_MAGIC = 0x5145564D          # "QEVM"
FILE_VERSION = 3
FILE_VERSION_COMPAT = 2          # very old streams; not produced since 2013


class SectionType(enum.IntEnum):
    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class Command(enum.IntEnum):
    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


# Fixed payload length of each command; None = variable (checked elsewhere).
COMMAND_LENGTH = {
    Command.OPEN_RETURN_PATH: 0,
    Command.PING: 4,
    Command.POSTCOPY_ADVISE: None,   # 0 (old) or 16
    Command.POSTCOPY_LISTEN: 0,
    Command.POSTCOPY_RUN: 0,
    Command.POSTCOPY_RAM_DISCARD: None,
    Command.PACKAGED: 4,
    Command.ENABLE_COLO: 0,
    Command.POSTCOPY_RESUME: 0,
    Command.RECV_BITMAP: None,
    Command.SWITCHOVER_START: 0,
}

PACKAGED_MAX = 1 << 24           # MAX_VM_CMD_PACKAGED_SIZE in savevm.h (16 MiB)


class RamFlag(enum.IntFlag):
    FULL = 0x01                  # obsolete since 2009, never valid
    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    XBZRLE = 0x40
    HOOK = 0x80                  # RDMA only
    COMPRESS_PAGE = 0x100        # removed in QEMU 9.1; decoded for old files
    MULTIFD_FLUSH = 0x200


RAM_FLAGS_MASK = 0x3FF           # every flag fits below a 1 KiB page
RAM_SECTION_VERSION = 4
PAGE_RECORD_FLAGS = RamFlag.ZERO | RamFlag.PAGE | RamFlag.XBZRLE | RamFlag.COMPRESS_PAGE

ENCODING_FLAG_XBZRLE = 0x01      # the byte after an XBZRLE header

MAPPED_RAM_HEADER_VERSION = 1
MAPPED_RAM_HEADER_SIZE = 28      # be32 version, be64 page_size, bitmap_offset, pages_offset
MAPPED_RAM_ALIGNMENT = 0x100000  # pages_offset alignment QEMU uses

MIN_PAGE_SIZE = 1 << 10
MAX_PAGE_SIZE = 1 << 16
MAX_IDSTR = 255
MAX_VMDESC = 1 << 28             # refuse larger JSON trailers
