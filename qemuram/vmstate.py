"""Measure device (FULL) section payloads with the stream's JSON vmdesc.

A device payload carries no length of its own, so the only way to find where it
ends (where the ``0x7e be32 section_id`` footer starts) without knowing every
device's C layout is the description QEMU appends after EOF.  QEMU writes that
description in the same pass that writes the payloads, recording for every
field the number of bytes it actually put on the wire, so the sizes are
authoritative.  What this module relies on (read from QEMU's vmstate.c and
savevm.c, and checked on QEMU 10.0.2 streams of q35, pc, isapc and microvm
machines with some sixty device types):

* A field entry's ``size`` is the byte count of ONE element.  When a field is an
  array whose elements are described alike, QEMU writes a single entry with
  ``array_len`` and describes only the first element, so the field occupies
  ``size * array_len`` bytes.  Arrays that cannot be folded like that (elements
  of a struct type that has subsections or conditional fields) get one entry
  per element, each with its own ``size`` and an ``index`` key (QEMU 10 leaves
  ``index`` off the last element).  Zero-length arrays get no entry.
* ``size`` covers everything the element wrote, including the subsections of a
  nested struct; a field's own sub-description ("struct", or the keys a
  ``vstruct``/``tmp``/``qtailq`` writer adds to the field object) is only used
  to cross-check the bytes, never to count them.
* ``subsections`` lists exactly the subsections that were written, in order.
  In the payload each one is ``0x05, u8 len, name, be32 version`` followed by
  its fields (and its own subsections); they come after the last field of the
  description they belong to.
* A NULL element of an array of pointers is one marker byte ``0x30``; QEMU 10
  describes it as a field of type ``nullptr`` and size 1 (runs of NULLs are
  folded with ``array_len``).  Older QEMUs described it with the array's own
  type; a ``struct`` entry whose struct object has no ``fields`` is that case,
  and such a description cannot be trusted to measure the rest of the array.
* Devices without a VMStateDescription (``save_state`` handlers) are described
  as one ``buffer`` field named ``data`` holding the whole payload, plus a
  device-level ``size``; they measure like any other device.
* ``devices[]`` is written in the same loop, and order, as the FULL sections,
  one entry per FULL section of the final device pass; QEMU (since 8.2)
  refuses two handlers with the same (idstr, instance_id), so the pair is a
  unique key and matching by it agrees with matching by order.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Callable, Optional

from .errors import TruncatedStream, VMDescError
from .wire import MAX_VMDESC, SectionType

SUBSECTION = SectionType.SUBSECTION          # 0x05
VMDESC_MARKER = SectionType.VMDESCRIPTION    # 0x06
FOOTER = SectionType.FOOTER                  # 0x7e
NULLPTR_MARKER = 0x30                        # one byte per NULL array element

_BE32 = struct.Struct(">I")

__all__ = ["parse_vmdesc", "find_device", "measure", "footer_scan",
           "NULLPTR_MARKER"]


# --------------------------------------------------------------------------
# Description checks (shared by parse_vmdesc and measure)
# --------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_desc(desc: Any, where: str, offset: Optional[int],
                need_fields: bool) -> None:
    """Check a vmsd-like object: ``fields`` (list) and optional ``subsections``.

    Raising here, with a path, beats a KeyError deep inside a walk.
    """
    if not isinstance(desc, dict):
        raise VMDescError(f"{where} is not an object", offset=offset)
    fields = desc.get("fields")
    if fields is None:
        if need_fields:
            raise VMDescError(f"{where} has no 'fields'", offset=offset)
    elif not isinstance(fields, list):
        raise VMDescError(f"{where}.fields is not a list", offset=offset)
    else:
        for i, field in enumerate(fields):
            _check_field(field, f"{where}.fields[{i}]", offset)
    subs = desc.get("subsections")
    if subs is not None:
        if not isinstance(subs, list):
            raise VMDescError(f"{where}.subsections is not a list", offset=offset)
        for i, sub in enumerate(subs):
            sw = f"{where}.subsections[{i}]"
            if not isinstance(sub, dict):
                raise VMDescError(f"{sw} is not an object", offset=offset)
            name = sub.get("vmsd_name")
            if not isinstance(name, str) or not 0 < len(name.encode()) <= 255:
                raise VMDescError(f"{sw} has no usable 'vmsd_name'", offset=offset)
            if "version" in sub and not _is_int(sub["version"]):
                raise VMDescError(f"{sw}.version is not an integer", offset=offset)
            _check_desc(sub, sw, offset, need_fields=True)


def _check_field(field: Any, where: str, offset: Optional[int]) -> None:
    if not isinstance(field, dict):
        raise VMDescError(f"{where} is not an object", offset=offset)
    for key, kind in (("name", str), ("type", str)):
        if not isinstance(field.get(key), kind):
            raise VMDescError(f"{where} has no string '{key}'", offset=offset)
    size = field.get("size")
    if not _is_int(size) or size < 0:
        raise VMDescError(f"{where} has no usable 'size'", offset=offset,
                          found=size)
    n = field.get("array_len", 1)
    if not _is_int(n) or n < 0:
        raise VMDescError(f"{where}.array_len is not a count", offset=offset,
                          found=n)
    sub = field.get("struct")
    if sub is not None:
        # An empty struct object is legal (see the module note on nullptr).
        _check_desc(sub, where + ".struct", offset, need_fields=False)
    if "fields" in field or "subsections" in field:
        # vstruct/tmp/qtailq/... writers put a vmsd description in the field.
        _check_desc(field, where, offset, need_fields=False)


# --------------------------------------------------------------------------
# parse_vmdesc / find_device
# --------------------------------------------------------------------------

def parse_vmdesc(data: bytes, *, offset: int = 0) -> dict:
    """Parse the vmdesc trailer found at ``data[offset:]``.

    ``data[offset]`` is either the ``0x06`` VMDESCRIPTION byte (then ``be32 n``
    and ``n`` bytes of JSON follow) or the ``{`` of bare JSON (then the rest of
    ``data`` is the JSON).  Bytes after the ``n`` JSON bytes are not looked at:
    trailing garbage is the framing layer's business.  Error offsets are
    indices into ``data``.
    """
    view = memoryview(data)
    if offset < 0 or offset >= len(view):
        raise TruncatedStream("no vmdesc trailer", offset=offset)
    if view[offset] == VMDESC_MARKER:
        if offset + 5 > len(view):
            raise TruncatedStream("vmdesc length cut short", offset=offset,
                                  expected="5 bytes", found=f"{len(view) - offset}")
        (n,) = _BE32.unpack_from(view, offset + 1)
        start = offset + 5
        if n > MAX_VMDESC:
            raise VMDescError("vmdesc length too large", offset=offset + 1,
                              expected=f"<= {MAX_VMDESC}", found=n)
        if start + n > len(view):
            raise TruncatedStream("vmdesc JSON cut short", offset=start,
                                  expected=f"{n} bytes", found=len(view) - start)
        raw = bytes(view[start:start + n])
    else:
        start = offset
        raw = bytes(view[start:])
        if len(raw) > MAX_VMDESC:
            raise VMDescError("vmdesc too large", offset=start)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise VMDescError("vmdesc is not UTF-8", offset=start + e.start) from None
    try:
        desc = json.loads(text)
    except json.JSONDecodeError as e:
        pos = start + len(text[:e.pos].encode("utf-8"))
        raise VMDescError(f"vmdesc is not valid JSON: {e.msg}", offset=pos) from None
    except RecursionError:
        raise VMDescError("vmdesc JSON nested too deeply", offset=start) from None

    if not isinstance(desc, dict):
        raise VMDescError("vmdesc is not a JSON object", offset=start)
    if not _is_int(desc.get("page_size")) or desc["page_size"] <= 0:
        raise VMDescError("vmdesc has no usable 'page_size'", offset=start,
                          found=desc.get("page_size"))
    devices = desc.get("devices")
    if not isinstance(devices, list):
        raise VMDescError("vmdesc has no 'devices' list", offset=start)
    for i, dev in enumerate(devices):
        where = f"devices[{i}]"
        if not isinstance(dev, dict):
            raise VMDescError(f"{where} is not an object", offset=start)
        if not isinstance(dev.get("name"), str):
            raise VMDescError(f"{where} has no string 'name'", offset=start)
        iid = dev.get("instance_id")
        if not _is_int(iid) or not 0 <= iid <= 0xFFFFFFFF:
            raise VMDescError(f"{where} ({dev['name']}) has no usable "
                              "'instance_id'", offset=start, found=iid)
        if "size" in dev and (not _is_int(dev["size"]) or dev["size"] < 0):
            raise VMDescError(f"{where}.size is not a byte count", offset=start)
        # 'fields' may be missing: measure() then says it cannot measure.
        _check_desc(dev, f"{where} ({dev['name']})", start, need_fields=False)
    conf = desc.get("configuration")
    if conf is not None:
        _check_desc(conf, "configuration", start, need_fields=True)
    return desc


def find_device(vmdesc: dict, idstr: str, instance_id: int) -> Optional[dict]:
    """The ``devices[]`` entry for the FULL section (idstr, instance_id), or None.

    The pair is unique in every stream QEMU >= 8.2 writes (it refuses
    duplicate handlers), and the entries are in FULL-section order; if a
    hand-made description repeats a pair, the first entry wins.
    """
    for dev in vmdesc.get("devices", ()):
        if dev.get("name") == idstr and dev.get("instance_id") == instance_id:
            return dev
    return None


# --------------------------------------------------------------------------
# measure
# --------------------------------------------------------------------------

# Field types whose writer puts exactly one vmsd description (vmsd_name,
# fields, subsections) straight into the field object, covering all its bytes.
# qtailq/qlist/gtree also nest descriptions there, but add framing bytes and
# repeat the keys per element, so only their size is used.
_INLINE_VMSD = frozenset({"vstruct", "tmp"})


class _CannotMeasure(Exception):
    """Internal: the description is of a form that does not give sizes."""


class _Walker:
    def __init__(self, buf, base_offset: int, section: Optional[str]):
        self.buf = buf
        self.n = len(buf)
        self.base = base_offset
        self.section = section

    def err(self, cls, msg, pos, **kw):
        return cls(msg, offset=self.base + pos, section=self.section, **kw)

    def need(self, pos: int, count: int, what: str) -> None:
        if pos + count > self.n:
            raise self.err(TruncatedStream, f"payload ends inside {what}", pos,
                           expected=f"{count} bytes",
                           found=f"{max(self.n - pos, 0)} bytes",
                           record=what)

    def walk(self, desc: dict, pos: int, path: str) -> int:
        """Walk one vmsd description (fields then subsections) from ``pos``."""
        fields = desc.get("fields")
        if fields is None:
            raise _CannotMeasure(path)
        for field in fields:
            pos = self.field(field, pos, f"{path}.{field['name']}")
        for sub in desc.get("subsections", ()):
            pos = self.subsection(sub, pos)
        return pos

    def field(self, field: dict, pos: int, path: str) -> int:
        size = field["size"]
        count = field.get("array_len", 1)
        total = size * count
        self.need(pos, total, path)
        ftype = field["type"]
        if ftype == "nullptr":
            bad = [i for i in range(pos, pos + total)
                   if self.buf[i] != NULLPTR_MARKER]
            if size != 1 or bad:
                at = bad[0] if bad else pos
                raise self.err(VMDescError, "NULL-pointer marker expected", at,
                               expected=hex(NULLPTR_MARKER),
                               found=hex(self.buf[at]), record=path)
        elif ftype == "struct" and "struct" in field:
            inner = field["struct"]
            if inner.get("fields") is None:
                # Pre-10.0 QEMU put a NULL element under the array's own type:
                # 'size' is that of the marker, not of the other elements.
                raise _CannotMeasure(path)
            if count:
                self.check_inner(inner, pos, size, path)
        elif ftype in _INLINE_VMSD and isinstance(field.get("fields"), list):
            if count:
                self.check_inner(field, pos, size, path)
        return pos + total

    def check_inner(self, inner: dict, pos: int, size: int, path: str) -> None:
        """Cross-check the first element of a nested struct against its size."""
        end = self.walk(inner, pos, path)
        if end != pos + size:
            raise self.err(VMDescError,
                           "nested description disagrees with its size", pos,
                           expected=f"{size} bytes", found=f"{end - pos} bytes",
                           record=path)

    def subsection(self, sub: dict, pos: int) -> int:
        name = sub["vmsd_name"]
        raw = name.encode("utf-8")
        path = name          # QEMU's subsection names already read "owner/sub"
        self.need(pos, 1, f"subsection {name}")
        if self.buf[pos] != SUBSECTION:
            raise self.err(VMDescError, f"subsection {name!r} missing", pos,
                           expected="0x05", found=hex(self.buf[pos]), record=name)
        self.need(pos, 2 + len(raw) + 4, f"subsection {name} header")
        ln = self.buf[pos + 1]
        got = bytes(self.buf[pos + 2:pos + 2 + ln])
        if ln != len(raw) or got != raw:
            raise self.err(VMDescError, "subsection name differs", pos + 1,
                           expected=name, found=got.decode("latin-1"), record=name)
        (version,) = _BE32.unpack_from(self.buf, pos + 2 + ln)
        want = sub.get("version")
        if want is not None and want != version:
            raise self.err(VMDescError, "subsection version differs", pos + 2 + ln,
                           expected=want, found=version, record=name)
        return self.walk(sub, pos + 2 + ln + 4, path)

    def undescribed_subsection(self, desc: dict, pos: int) -> bool:
        """True if a subsection of ``desc`` not in the description starts at pos.

        QEMU's loader looks for the same thing: 0x05 and a name that starts
        with the owner's vmsd name.
        """
        owner = desc.get("vmsd_name")
        if not owner or pos + 2 > self.n or self.buf[pos] != SUBSECTION:
            return False
        ln = self.buf[pos + 1]
        name = bytes(self.buf[pos + 2:pos + 2 + ln])
        return (len(name) == ln and ln > len(owner)
                and name.startswith(owner.encode("utf-8") + b"/"))


def measure(buf, pos: int, device: dict, *, base_offset: int = 0) -> Optional[int]:
    """End of the payload of ``device`` that starts at ``buf[pos]``, or None.

    ``device`` is a ``devices[]`` entry (or the vmdesc ``configuration``
    object).  None means the description gives no sizes to count (no
    ``fields``, or a pre-10.0 NULL-pointer entry).  Inconsistent bytes raise
    ``VMDescError``, too few bytes ``TruncatedStream``; both carry
    ``offset = base_offset + index`` of the field or marker at fault.
    """
    section = device.get("name") if isinstance(device, dict) else None
    _check_desc(device, f"device {section!r}", base_offset + pos, need_fields=False)
    if device.get("fields") is None:
        return None
    w = _Walker(buf, base_offset, section)
    try:
        end = w.walk(device, pos, device.get("vmsd_name") or section or "")
    except _CannotMeasure:
        return None
    if "size" in device and _is_int(device["size"]) and device["size"] != end - pos:
        raise w.err(VMDescError, "device size differs from its fields", pos,
                    expected=device["size"], found=end - pos)
    if w.undescribed_subsection(device, end):
        raise w.err(VMDescError, "subsection not in the description", end,
                    found=bytes(buf[end + 2:end + 2 + buf[end + 1]]).decode("latin-1"))
    return end


# --------------------------------------------------------------------------
# footer_scan
# --------------------------------------------------------------------------

def footer_scan(buf, pos: int, section_id: int,
                next_ok: Callable[[int], bool]) -> Optional[int]:
    """First p >= pos holding ``0x7e be32 section_id`` for which next_ok(p+5).

    Without a description the footer is the only landmark; the pattern can
    also occur inside the payload, so the caller's next_ok decides whether a
    plausible next record follows.
    """
    pattern = bytes([FOOTER]) + _BE32.pack(section_id & 0xFFFFFFFF)
    for p in _find_all(buf, pattern, max(pos, 0)):
        if next_ok(p + 5):
            return p
    return None


def _find_all(buf, pattern: bytes, start: int):
    """Yield every index >= start of pattern; memoryviews are read in windows
    so a large stream is never copied whole."""
    if hasattr(buf, "find"):
        p = buf.find(pattern, start)
        while p >= 0:
            yield p
            p = buf.find(pattern, p + 1)
        return
    window = 1 << 20
    n, k = len(buf), len(pattern)
    while start + k <= n:
        chunk = bytes(buf[start:min(n, start + window + k - 1)])
        i = chunk.find(pattern)
        while i >= 0:
            yield start + i
            i = chunk.find(pattern, i + 1)
        start += window
