"""Sans-I/O decoder of the outer savevm stream (format 3).

Feed bytes with ``feed()``, call ``feed_eof()`` at the end of input, and pull
records with ``next_event()`` until it returns ``NEED_DATA`` (feed more) or
``None`` (done).  Nothing here touches a file: ``qemuram.io`` wraps it for
files, pipes and sockets.  Incomplete data rolls back to the last complete
record, as msgpack's Unpacker does.

The "ram" payload is decoded by ``qemuram.ram`` on the same buffer; device
sections are measured with the JSON vmdesc (``qemuram.vmstate``) or, without
one, by a footer scan that validates the record after the footer.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional

from . import ram as ramcodec
from . import vmstate
from .errors import (BadMagic, FooterMismatch, PageSizeError, StreamError,
                     TrailingGarbage, TruncatedStream, UnknownCommand,
                     UnknownSection, UnsupportedVersion, UsageError, VMDescError)
from .records import (CommandRecord, ConfigSubsection, Configuration, EndOfStream,
                      Header, OpaquePayload, PackageEnd, SectionFooter,
                      SectionHeader, VMDescription)
from .wire import (COMMAND_LENGTH, FILE_MAGIC, FILE_VERSION, MAX_IDSTR,
                   MAX_PAGE_SIZE, MAX_VMDESC, MIN_PAGE_SIZE, PACKAGED_MAX,
                   RAM_SECTION_VERSION, Command, SectionType)


class _NeedData(Exception):
    """Internal: the current record is not complete in the buffer yet."""


NEED_DATA = "NEED_DATA"

# Machine types whose target is x86: TARGET_PAGE_BITS is fixed at 12 there.
_X86_MACHINE_PREFIXES = ("pc", "q35", "isapc", "microvm", "xenfv", "xenpv", "x-remote")

_KNOWN_CONFIG_SUBSECTIONS = {
    "configuration/capabilities", "configuration/target-page-bits", "configuration/uuid",
}


def machine_page_size(machine: str) -> Optional[int]:
    """Target page size implied by a machine type, when the target fixes it."""
    if machine.startswith(_X86_MACHINE_PREFIXES):
        return 4096
    return None


def find_vmdesc(tail: bytes, base: int = 0, *, exact: bool = False) -> Optional[int]:
    """Index in ``tail`` of the vmdesc's 0x06 marker, or None.

    JSON text never contains a raw 0x06 byte, so the marker is the last 0x06
    before the JSON; it counts when its be32 length covers a JSON object.
    With ``exact`` the JSON must also reach the end of ``tail`` (QEMU writes
    nothing after it); without, bytes after it (trailing garbage) or a JSON
    cut short still locate the trailer, so the caller reports the precise
    error instead of losing the device-section descriptions.
    """
    end = len(tail)
    for _ in range(16):
        i = tail.rfind(b"\x06", 0, end)
        if i < 0:
            return None
        end = i
        if len(tail) - i < 6 or tail[i + 5:i + 6] != b"{":
            continue
        n = int.from_bytes(tail[i + 1:i + 5], "big")
        if n > MAX_VMDESC or (exact and n != len(tail) - i - 5):
            continue
        body = bytes(tail[i + 5:i + 5 + n])
        if len(body) < n:
            return None if exact else i      # cut short: let the framing say so
        try:
            obj = json.loads(body)
        except ValueError:
            return None if exact else i      # broken JSON: VMDescError from the framing
        if isinstance(obj, dict):
            return i
    return None


def parse_vmdesc_at(buf, i: int, base: int = 0) -> dict:
    """Parse the vmdesc whose 0x06 marker is at ``buf[i]``; errors name absolute offsets."""
    try:
        return vmstate.parse_vmdesc(buf, offset=i)
    except StreamError as err:
        if err.offset is not None:
            err.offset += base
            err.args = (err._format(),)
        raise


class Decoder:
    """Incremental decoder of one QEMU migration stream.

    Options:
      page_size        target page size when the stream does not say it
      vmdesc           the parsed JSON trailer, when the caller read it ahead
                       (seekable input); else the device tail is buffered
      block_page_sizes {block: host page size} for streams whose postcopy
                       page-size fields are ambiguous
      max_tail         cap on the buffered device-state tail
      xbzrle_runs      yield consecutive CONTINUE XBZRLE records as one
                       ``XbzrleRun`` instead of one ``XbzrlePage`` each
    """

    def __init__(self, *, page_size: Optional[int] = None, vmdesc: Optional[dict] = None,
                 block_page_sizes: Optional[Dict[str, int]] = None,
                 max_tail: int = 256 << 20, xbzrle_runs: bool = False):
        self._buf = b""
        self._pos = 0
        self._base = 0               # absolute offset of _buf[0]
        self._eof = False
        self._pending: List[bytes] = []
        self._spare: Optional[bytearray] = None
        self._pending_len = 0
        self._want = 0                 # bytes from _pos the current record needs
        self._skip = 0                 # bytes to pass over unread (lazy mapped-ram pages)
        self.lazy_pages = False        # set by adapters that can seek (see skipped())
        self.input_size: Optional[int] = None   # stream bytes in all, when the adapter knows
        self._state = "header"
        self._error: Optional[StreamError] = None
        self.max_tail = max_tail
        self.option_page_size = page_size
        self.page_size: Optional[int] = None
        self.page_size_source: Optional[str] = None
        self.vmdesc = vmdesc
        self.vmdesc_given = vmdesc is not None
        self.machine: Optional[str] = None
        self.capabilities: List[str] = []
        self.sections: Dict[int, tuple] = {}        # section_id -> (idstr, instance, version)
        self.footers: Optional[bool] = None
        self.notes: List[str] = []
        self.postcopy_advise = None                 # (summary, target page size)
        self.packaged_end: Optional[int] = None
        self.device_seen: Dict[str, int] = {}
        self.ram = ramcodec.RamDecoder(self, block_page_sizes or {})
        self.ram.xbzrle_runs = xbzrle_runs
        self._open_section: Optional[tuple] = None  # (section_id, idstr, kind) awaiting footer
        if vmdesc is not None and "page_size" in vmdesc:
            self._set_page_size(int(vmdesc["page_size"]), "vmdesc")
        if page_size is not None:
            self._set_page_size(page_size, "option")

    # ------------------------------------------------------------ input side
    def feed(self, data) -> None:
        """Add input.  Small feeds are queued and joined only once the record
        being waited for can be complete, so feeding a large record in tiny
        pieces stays linear."""
        if self._eof:
            raise UsageError("data fed after feed_eof()")
        if not data:
            return
        self._pending.append(bytes(data))
        self._pending_len += len(data)

    def _join_pending(self) -> None:
        if not self._pending:
            return
        rest = self._buf[self._pos:]
        self._base += self._pos
        self._buf = b"".join([rest, *self._pending]) if rest else b"".join(self._pending)
        self._pos = 0
        self._pending.clear()
        self._pending_len = 0

    def feed_eof(self) -> None:
        self._eof = True

    def map_input(self, buf) -> None:
        """Take ``buf`` (say an mmap of a whole file) as the complete input:
        nothing is copied, records are views of it."""
        if self._buf or self._pending or self._base or self._pos:
            raise UsageError("map_input() on a decoder that already has input")
        self._buf = buf
        self._eof = True
        self.input_size = len(buf)

    def fill(self, readinto, size: int) -> int:
        """Read new input with ``readinto`` straight into a buffer that already
        holds the unconsumed tail: the file adapter's fast path.  Buffers have
        a fixed size so two of them are reused in turn (no fresh memory to
        fault in per read); records from before the previous read must have
        been consumed, as the decoder's contract says.  Returns the number of
        bytes read; 0 means end of input."""
        if self._eof:
            raise UsageError("fill() after feed_eof()")
        self._join_pending()
        rest = len(self._buf) - self._pos
        total = max(size, rest + (1 << 20), self._want)
        spare = self._spare
        if spare is not None and len(spare) == total and spare is not self._buf:
            new = spare
        else:
            new = bytearray(total)
        new[:rest] = memoryview(self._buf)[self._pos:]
        view = memoryview(new)
        got = 0
        while got < total - rest:
            n = readinto(view[rest + got:]) or 0
            if n == 0:
                break
            got += n
        view.release()
        old = self._buf
        self._base += self._pos
        self._pos = 0
        if got == total - rest:
            self._buf = new
            self._spare = old if isinstance(old, bytearray) else None
        else:
            self._buf = bytes(new[:rest + got])
        return got

    @property
    def pending_skip(self) -> int:
        """Bytes the adapter may seek over (then call ``skipped``) once the
        buffer is used up; 0 when nothing is to be skipped."""
        if self._skip and self._pos >= len(self._buf) and not self._pending:
            return self._skip
        return 0

    def skipped(self, n: int) -> None:
        """The adapter moved its input ``n`` bytes on without reading them."""
        if n <= 0 or n > self.pending_skip:
            raise UsageError(f"skipped({n}) while {self.pending_skip} bytes may be skipped")
        self._base = self.offset + n
        self._buf = b""
        self._pos = 0
        self._skip -= n

    def _drop_skipped(self) -> bool:
        """Consume buffered bytes that are to be skipped; True when done."""
        self._join_pending()
        n = min(self._skip, len(self._buf) - self._pos)
        self._pos += n
        self._skip -= n
        return self._skip == 0

    @property
    def offset(self) -> int:
        """Absolute stream offset of the next undecoded byte."""
        return self._base + self._pos

    def raw(self, offset: int, length: int) -> bytes:
        """Input bytes of a record just decoded (still in the buffer)."""
        lo = offset - self._base
        if lo < 0 or lo + length > len(self._buf):
            raise ValueError("bytes no longer buffered")
        return self._buf[lo:lo + length]

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    @property
    def done(self) -> bool:
        return self._state == "done"

    # ------------------------------------------------------------ helpers
    def need(self, n: int, what: str, at: Optional[int] = None) -> None:
        """Make sure ``n`` bytes are buffered from ``at`` (buffer index)."""
        at = self._pos if at is None else at
        if len(self._buf) - at < n:
            if self._eof and not self._pending:
                raise TruncatedStream("stream ends early", offset=self._base + len(self._buf),
                                      expected=f"{what} ({n} bytes from offset {self._base + at})",
                                      found=f"{len(self._buf) - at} bytes",
                                      section=self._section_name())
            self._want = at - self._pos + n
            raise _NeedData()

    def u8(self, at: int) -> int:
        return self._buf[at]

    def be16(self, at: int) -> int:
        return int.from_bytes(self._buf[at:at + 2], "big")

    def be32(self, at: int) -> int:
        return int.from_bytes(self._buf[at:at + 4], "big")

    def be64(self, at: int) -> int:
        return int.from_bytes(self._buf[at:at + 8], "big")

    def abs(self, at: int) -> int:
        return self._base + at

    def _section_name(self) -> Optional[str]:
        return self._open_section[1] if self._open_section else None

    def _set_page_size(self, size: int, source: str) -> None:
        if size < MIN_PAGE_SIZE or size > MAX_PAGE_SIZE or size & (size - 1):
            raise PageSizeError(f"target page size {size} from {source} is not a power of two "
                                f"between {MIN_PAGE_SIZE} and {MAX_PAGE_SIZE}",
                                offset=self.offset)
        if self.page_size is not None and self.page_size != size:
            raise PageSizeError(f"target page size {size} from {source} disagrees with "
                                f"{self.page_size} from {self.page_size_source}",
                                offset=self.offset)
        if self.page_size is None:
            self.page_size, self.page_size_source = size, source

    def require_page_size(self) -> int:
        if self.page_size is None and self.machine:
            implied = machine_page_size(self.machine)
            if implied:
                self._set_page_size(implied, f"machine type {self.machine}")
        if self.page_size is None:
            raise PageSizeError(
                "the target page size is not known: the stream has no target-page-bits "
                "subsection or POSTCOPY_ADVISE, no vmdesc was read ahead, and the machine "
                f"type {self.machine!r} does not fix it; pass page_size (CLI: --page-size)",
                offset=self.offset)
        return self.page_size

    # ------------------------------------------------------------ output side
    def next_event(self):
        """Next record, ``NEED_DATA``, or None when the stream is complete."""
        if self._error is not None:
            raise self._error
        if self._skip and not self._drop_skipped():
            if self._eof:
                self._fail(TruncatedStream("stream ends early", offset=self.offset,
                                           expected=f"{self._skip} more bytes of "
                                           "mapped-ram pages", found="end of input",
                                           section=self._section_name()))
            return NEED_DATA
        if self._state == "done":
            self._join_pending()
            if self._pos < len(self._buf):
                self._fail(TrailingGarbage("bytes after the end of the stream",
                                           offset=self.offset,
                                           found=f"{len(self._buf) - self._pos} more bytes"))
            return None
        if self._pending:
            if not self._eof and len(self._buf) - self._pos + self._pending_len < self._want:
                return NEED_DATA
            self._join_pending()
        start = self._pos
        self._want = 0
        try:
            return self._step()
        except _NeedData:
            self._pos = start
            return NEED_DATA
        except StreamError as err:
            self._pos = start
            self._fail(err)
        except (IndexError, ValueError, UnicodeDecodeError) as err:  # defensive
            self._pos = start
            self._fail(StreamError(f"malformed data ({err})", offset=self.offset))

    def _fail(self, err: StreamError):
        self._error = err
        raise err

    def __iter__(self):
        while True:
            ev = self.next_event()
            if ev is None or ev is NEED_DATA:
                return
            yield ev

    # ------------------------------------------------------------ state machine
    def _step(self):
        st = self._state
        if st == "header":
            return self._header()
        if st == "top":
            return self._top()
        if st == "ram":
            return self.ram.step()
        if st == "opaque":
            return self._opaque()
        if st == "footer":
            return self._footer()
        if st == "after_eof":
            return self._after_eof()
        raise AssertionError(st)

    def _header(self):
        self.need(4, "stream magic")
        magic = self.be32(self._pos)
        if magic != FILE_MAGIC:
            head = self._buf[self._pos:self._pos + 16]
            hint = ""
            if head.startswith(b"LibvirtQemudSave") or head.startswith(b"LibvirtQemudPart"):
                hint = " (a libvirt save image: open it with qemuram.open, which unwraps it)"
            elif head.startswith(b"QFI\xfb"):
                hint = " (a qcow2 image: its VM state is read by qemuram.open)"
            elif head.startswith(b"\x1f\x8b"):
                hint = " (gzip data)"
            raise BadMagic("not a QEMU migration stream" + hint, offset=self.offset,
                           expected="magic 'QEVM' (0x5145564d)", found=bytes(head[:4]).hex())
        self.need(8, "stream version")
        version = self.be32(self._pos + 4)
        if version != FILE_VERSION:
            raise UnsupportedVersion("unsupported savevm format version", offset=self.offset + 4,
                                     expected=FILE_VERSION, found=version)
        ev = Header(version=version, offset=self.offset)
        self._pos += 8
        self._state = "top"
        return ev

    def _idstr(self, at: int, what: str):
        self.need(1, what + " length", at)
        n = self.u8(at)
        self.need(1 + n, what, at)
        raw = self._buf[at + 1:at + 1 + n]
        try:
            return raw.decode("ascii"), at + 1 + n
        except UnicodeDecodeError:
            raise StreamError(f"{what} is not ASCII", offset=self.abs(at + 1),
                              found=bytes(raw)[:32]) from None

    def _top(self):
        p = self._pos
        if self.packaged_end is not None:
            if self.abs(p) == self.packaged_end:
                self.packaged_end = None
                return PackageEnd(offset=self.abs(p))
            if self.abs(p) > self.packaged_end:
                raise StreamError("record crosses the end of its PACKAGED command",
                                  offset=self.packaged_end)
        self.need(1, "section type")
        t = self.u8(p)
        if t == SectionType.CONFIGURATION:
            return self._configuration()
        if t in (SectionType.START, SectionType.FULL):
            return self._section_start(SectionType(t))
        if t in (SectionType.PART, SectionType.END):
            self.need(5, "section id")
            sid = self.be32(p + 1)
            if sid not in self.sections:
                raise UnknownSection("PART/END for a section id never started",
                                     offset=self.abs(p + 1), found=sid)
            ev = SectionHeader(kind=SectionType(t), section_id=sid, idstr=self.sections[sid][0],
                               offset=self.abs(p))
            self._pos = p + 5
            self._enter_payload(sid, SectionType(t))
            return ev
        if t == SectionType.COMMAND:
            return self._command()
        if t == SectionType.EOF:
            ev = EndOfStream(offset=self.abs(p))
            self._pos = p + 1
            if self.packaged_end is None:
                self._state = "after_eof"
            return ev
        if t == SectionType.VMDESCRIPTION:
            raise UnknownSection("vmdesc trailer before the EOF byte", offset=self.abs(p))
        raise UnknownSection("unknown section type", offset=self.abs(p),
                             expected="0x00-0x04, 0x07 or 0x08", found=f"0x{t:02x}")

    def _configuration(self):
        p = self._pos
        self.need(5, "configuration length")
        n = self.be32(p + 1)
        if n > MAX_IDSTR:
            raise StreamError("machine type name too long", offset=self.abs(p + 1), found=n)
        self.need(5 + n, "machine type")
        try:
            machine = self._buf[p + 5:p + 5 + n].decode("ascii")
        except UnicodeDecodeError:
            raise StreamError("machine type is not ASCII", offset=self.abs(p + 5)) from None
        q = p + 5 + n
        subs = []
        while True:
            self.need(1, "configuration subsection or next record", q)
            if self.u8(q) != SectionType.SUBSECTION:
                break
            name, r = self._idstr(q + 1, "subsection name")
            self.need(4, "subsection version", r)
            version = self.be32(r)
            r += 4
            if name == "configuration/capabilities":
                self.need(4, "capability count", r)
                count = self.be32(r)
                e = r + 4
                for _ in range(count):
                    self.need(1, "capability name length", e)
                    e += 1 + self.u8(e)
                    self.need(0, "capability name", e)
            elif name == "configuration/target-page-bits":
                e = r + 4
            elif name == "configuration/uuid":
                e = r + 16
            else:
                desc = (self.vmdesc or {}).get("configuration")
                e = None
                if desc:
                    for s in desc.get("subsections", []):
                        if s.get("vmsd_name") == name:
                            e = vmstate.measure(self._buf, r, s, base_offset=self._base)
                if e is None:
                    raise UnknownSection("unknown configuration subsection", offset=self.abs(q),
                                         expected=", ".join(sorted(_KNOWN_CONFIG_SUBSECTIONS)),
                                         found=name)
            self.need(e - r, f"subsection {name}", r)
            subs.append(ConfigSubsection(name=name, version=version, body=self._buf[r:e]))
            q = e
        ev = Configuration(machine=machine, subsections=subs, offset=self.abs(p))
        self.machine = machine
        self.capabilities = ev.capabilities
        bits = ev.target_page_bits
        if bits is not None:
            if not 10 <= bits <= 16:
                raise PageSizeError("target-page-bits out of range", offset=self.abs(p),
                                    expected="10..16", found=bits)
            self._set_page_size(1 << bits, "target-page-bits subsection")
        self._pos = q
        return ev

    def _section_start(self, kind: SectionType):
        p = self._pos
        self.need(5, "section id")
        sid = self.be32(p + 1)
        idstr, q = self._idstr(p + 5, "section idstr")
        self.need(8, "instance and version ids", q)
        inst, ver = self.be32(q), self.be32(q + 4)
        q += 8
        if kind == SectionType.START and sid in self.sections:
            raise UnknownSection("section id started twice", offset=self.abs(p + 1), found=sid)
        if idstr == "ram" and ver != RAM_SECTION_VERSION:
            raise UnsupportedVersion('"ram" section version', offset=self.abs(q - 4),
                                     expected=RAM_SECTION_VERSION, found=ver)
        self.sections[sid] = (idstr, inst, ver)
        ev = SectionHeader(kind=kind, section_id=sid, idstr=idstr, instance_id=inst,
                           version_id=ver, offset=self.abs(p))
        self._pos = q
        self._enter_payload(sid, kind)
        return ev

    def _enter_payload(self, sid: int, kind: SectionType):
        idstr = self.sections[sid][0]
        self._open_section = (sid, idstr, kind)
        if idstr == "ram":
            self.ram.begin_section(sid, kind)
            self._state = "ram"
        else:
            self._state = "opaque"

    # --- opaque payloads (device state, non-ram live sections)
    def _opaque(self):
        sid, idstr, kind = self._open_section
        p = self._pos
        if kind == SectionType.FULL and self.vmdesc is None and not self.vmdesc_given:
            # The vmdesc (if any) is at the very end: buffer the tail.
            if not self._eof:
                if len(self._buf) - p > self.max_tail:
                    raise StreamError("device-state tail larger than max_tail while looking "
                                      "for the vmdesc", offset=self.abs(p), found=len(self._buf) - p)
                self._want = len(self._buf) - p + (1 << 20)
                raise _NeedData()
            i = find_vmdesc(self._buf[p:])
            self.vmdesc_given = True
            if i is not None:
                try:
                    self.vmdesc = parse_vmdesc_at(self._buf, p + i, self._base)
                except StreamError:
                    # Reported precisely when the framing reaches the trailer.
                    i = None
            if i is not None:
                if "page_size" in self.vmdesc:
                    self._set_page_size(int(self.vmdesc["page_size"]), "vmdesc")
            if i is None:
                self.notes.append("no usable vmdesc trailer: device sections measured by footer "
                                  "scan")
        end, how = None, None
        if kind == SectionType.FULL and self.vmdesc is not None:
            inst = self.sections[sid][1]
            dev = vmstate.find_device(self.vmdesc, idstr, inst)
            if dev is not None:
                if not self._eof:
                    # measure() needs the whole payload; device payloads are small.
                    try:
                        end = vmstate.measure(self._buf, p, dev, base_offset=self._base)
                    except TruncatedStream:
                                raise _NeedData() from None
                else:
                    end = vmstate.measure(self._buf, p, dev, base_offset=self._base)
                if end is not None:
                    if self.footers is not False and not self._footer_at(end, sid):
                        if self.footers is None and self._plausible_record(end):
                            self.footers = False
                        else:
                            self.notes.append(f"vmdesc walk of {idstr!r} disagreed with its "
                                              "footer; used the footer scan")
                            end = None
                    if end is not None:
                        how = "vmdesc"
        if end is None:
            if self.footers is False:
                raise StreamError("cannot find the end of a section payload: no vmdesc entry "
                                  "and no section footers", offset=self.abs(p), section=idstr)
            if not self._eof and len(self._buf) - p < (1 << 20):
                raise _NeedData()
            end = vmstate.footer_scan(self._buf, p, sid, self._plausible_record)
            if end is None:
                if not self._eof:
                        raise _NeedData()
                raise FooterMismatch("no footer found for section", offset=self.abs(p),
                                     section=idstr, expected=f"0x7e + be32 {sid}")
            how = "footer-scan"
            note = f"section {idstr!r} measured by footer scan"
            if note not in self.notes:
                self.notes.append(note)
        ev = OpaquePayload(section_id=sid, idstr=idstr, data=self._buf[p:end], measured_by=how,
                           offset=self.abs(p))
        self._pos = end
        self._state = "footer"
        return ev

    def _footer_at(self, at: int, sid: int) -> bool:
        return (len(self._buf) - at >= 5 and self._buf[at] == SectionType.FOOTER
                and self.be32(at + 1) == sid)

    def _plausible_record(self, at: int) -> bool:
        """Does a valid record (or the end of input / package) start at ``at``?"""
        if self.packaged_end is not None and self.abs(at) == self.packaged_end:
            return True
        if at >= len(self._buf):
            return self._eof and at == len(self._buf)
        t = self._buf[at]
        if t == SectionType.EOF:
            if at + 1 >= len(self._buf):
                return True
            return self._buf[at + 1] == SectionType.VMDESCRIPTION
        if t in (SectionType.PART, SectionType.END):
            return len(self._buf) - at >= 5 and self.be32(at + 1) in self.sections
        if t in (SectionType.START, SectionType.FULL):
            if len(self._buf) - at < 6:
                return False
            n = self._buf[at + 5]
            name = self._buf[at + 6:at + 6 + n]
            return (n > 0 and len(name) == n and len(self._buf) - at >= 14 + n
                    and all(32 <= c < 127 for c in name))
        if t == SectionType.COMMAND:
            if len(self._buf) - at < 5:
                return False
            return 1 <= self.be16(at + 1) <= max(Command)
        return False

    # --- footers
    def _footer(self):
        sid = self._open_section[0]
        p = self._pos
        if self.footers is False:
            self._close_section()
            return self._step()
        self.need(1, "section footer or next record")
        if self._buf[p] != SectionType.FOOTER:
            if self.footers is None and self._plausible_record(p):
                self.footers = False
                self._close_section()
                return self._step()
            raise FooterMismatch("section footer missing", offset=self.abs(p),
                                 section=self._section_name(), expected="0x7e",
                                 found=f"0x{self._buf[p]:02x}")
        self.need(5, "section footer")
        got = self.be32(p + 1)
        if got != sid:
            raise FooterMismatch("section footer names another section", offset=self.abs(p + 1),
                                 section=self._section_name(), expected=sid, found=got)
        self.footers = True
        ev = SectionFooter(section_id=sid, offset=self.abs(p))
        self._pos = p + 5
        self._close_section()
        return ev

    def _close_section(self):
        self._open_section = None
        self._state = "top"

    def ram_payload_done(self):
        """Called by the ram codec after EOS."""
        self._state = "footer"

    # --- commands
    def _command(self):
        p = self._pos
        self.need(5, "command header")
        cmd, n = self.be16(p + 1), self.be16(p + 3)
        try:
            cmd_e = Command(cmd)
        except ValueError:
            raise UnknownCommand("unknown command", offset=self.abs(p + 1),
                                 expected=f"1..{max(Command)}", found=cmd) from None
        if cmd_e == Command.INVALID:
            raise UnknownCommand("command 0 is invalid", offset=self.abs(p + 1))
        fixed = COMMAND_LENGTH.get(cmd_e)
        if fixed is not None and n != fixed:
            raise UnknownCommand(f"bad length for {cmd_e.name}", offset=self.abs(p + 3),
                                 expected=fixed, found=n)
        if cmd_e == Command.POSTCOPY_ADVISE and n not in (0, 16):
            raise UnknownCommand("bad length for POSTCOPY_ADVISE", offset=self.abs(p + 3),
                                 expected="0 or 16", found=n)
        self.need(5 + n, f"{cmd_e.name} payload")
        data = self._buf[p + 5:p + 5 + n]
        ev = CommandRecord(cmd=cmd, data=data, offset=self.abs(p))
        if cmd_e == Command.POSTCOPY_ADVISE and n == 16:
            self.postcopy_advise = ev.advise
            tps = ev.advise[1]
            self._set_page_size(tps, "POSTCOPY_ADVISE")
        if cmd_e == Command.PACKAGED:
            size = int.from_bytes(data, "big")
            if size > PACKAGED_MAX:
                raise UnknownCommand("PACKAGED length above QEMU's limit", offset=self.abs(p + 5),
                                     expected=f"<= {PACKAGED_MAX}", found=size)
            if self.packaged_end is not None:
                raise UnknownCommand("PACKAGED inside PACKAGED", offset=self.abs(p))
            self.packaged_end = self.abs(p + 5 + n) + size
            if self._eof and self.packaged_end > self._base + len(self._buf):
                raise TruncatedStream("PACKAGED data runs past the end of input",
                                      offset=self._base + len(self._buf),
                                      expected=f"{size} bytes of package")
        self._pos = p + 5 + n
        return ev

    # --- after EOF
    def _after_eof(self):
        p = self._pos
        if p == len(self._buf):
            if self._eof:
                self._state = "done"
                return self.next_event()
            raise _NeedData()
        if self._buf[p] != SectionType.VMDESCRIPTION:
            raise TrailingGarbage("bytes after EOF that are not a vmdesc trailer",
                                  offset=self.abs(p), expected="0x06 or end of input",
                                  found=f"0x{self._buf[p]:02x}")
        self.need(5, "vmdesc length")
        n = self.be32(p + 1)
        if n > MAX_VMDESC:
            raise VMDescError("vmdesc length above the limit", offset=self.abs(p + 1),
                              expected=f"<= {MAX_VMDESC}", found=n)
        self.need(5 + n, "vmdesc JSON")
        body = self._buf[p + 5:p + 5 + n]
        parsed = parse_vmdesc_at(self._buf, p, self._base)
        if self.vmdesc is None:
            self.vmdesc = parsed
        if "page_size" in parsed:
            self._set_page_size(int(parsed["page_size"]), "vmdesc")
        ev = VMDescription(json_bytes=body, offset=self.abs(p))
        self._pos = p + 5 + n
        self._state = "done"
        return ev


# ------------------------------------------------------------------- encoding

def encode_record(rec, page_size: Optional[int] = None) -> bytes:
    """Bytes of one record; the inverse of what the Decoder yields."""
    if isinstance(rec, Header):
        return FILE_MAGIC.to_bytes(4, "big") + rec.version.to_bytes(4, "big")
    if isinstance(rec, Configuration):
        name = rec.machine.encode("ascii")
        out = bytearray([SectionType.CONFIGURATION]) + len(name).to_bytes(4, "big") + name
        for sub in rec.subsections:
            raw = sub.name.encode("ascii")
            out += bytes([SectionType.SUBSECTION, len(raw)]) + raw
            out += sub.version.to_bytes(4, "big") + bytes(sub.body)
        return bytes(out)
    if isinstance(rec, SectionHeader):
        out = bytearray([rec.kind]) + rec.section_id.to_bytes(4, "big")
        if rec.kind in (SectionType.START, SectionType.FULL):
            raw = rec.idstr.encode("ascii")
            out += bytes([len(raw)]) + raw
            out += rec.instance_id.to_bytes(4, "big") + rec.version_id.to_bytes(4, "big")
        return bytes(out)
    if isinstance(rec, SectionFooter):
        return bytes([SectionType.FOOTER]) + rec.section_id.to_bytes(4, "big")
    if isinstance(rec, OpaquePayload):
        return bytes(rec.data)
    if isinstance(rec, CommandRecord):
        data = bytes(rec.data)
        return (bytes([SectionType.COMMAND]) + rec.cmd.to_bytes(2, "big")
                + len(data).to_bytes(2, "big") + data)
    if isinstance(rec, PackageEnd):
        return b""
    if isinstance(rec, EndOfStream):
        return bytes([SectionType.EOF])
    if isinstance(rec, VMDescription):
        body = bytes(rec.json_bytes)
        return bytes([SectionType.VMDESCRIPTION]) + len(body).to_bytes(4, "big") + body
    return ramcodec.encode_ram_record(rec, page_size)
