"""Unit tests for qemuram.vmstate: measuring device payloads from the vmdesc.

The descriptions below copy the shapes QEMU 10.0.2 writes (checked on real
q35/pc/isapc/microvm streams): nested "struct" objects, folded arrays with
"array_len", unfolded arrays with "index" (the last element has none),
"tmp" fields with an inline description, subsections on devices, on structs
and on subsections, "nullptr" runs, and old-style save_state devices.
"""
from __future__ import annotations

import json
import struct

import pytest

from qemuram import errors
from qemuram.vmstate import (NULLPTR_MARKER, find_device, footer_scan, measure,
                             parse_vmdesc)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def F(name, size, type_="uint8", **extra):
    d = {"name": name, "type": type_, "size": size}
    d.update(extra)
    return d


def sub_header(name, version=1):
    raw = name.encode()
    return b"\x05" + bytes([len(raw)]) + raw + struct.pack(">I", version)


def footer(section_id):
    return b"\x7e" + struct.pack(">I", section_id)


def trailer(desc) -> bytes:
    raw = json.dumps(desc).encode()
    return b"\x06" + struct.pack(">I", len(raw)) + raw


PAD = b"\xaa\xbb\xcc"          # bytes before the payload, to test positions


def check(payload, device, tail=None, base=0):
    """measure() lands exactly on the footer placed after the payload."""
    tail = footer(7) if tail is None else tail
    buf = PAD + payload + tail
    assert measure(buf, len(PAD), device, base_offset=base) == len(PAD) + len(payload)


# --------------------------------------------------------------------------
# real device payloads (QEMU 10.0.2, pc machine)
# --------------------------------------------------------------------------

# pckbd: one struct field whose struct carries a subsection.
PCKBD_DESC = {
    "name": "pckbd", "instance_id": 0, "vmsd_name": "pckbd", "version": 3,
    "fields": [{"name": "kbd", "type": "struct", "struct": {
        "vmsd_name": "pckbd", "version": 3,
        "fields": [F("write_cmd", 1), F("status", 1), F("mode", 1),
                   F("pending_tmp", 1)],
        "subsections": [{"vmsd_name": "pckbd/extended_state", "version": 0,
                         "fields": [F("migration_flags", 4, "uint32"),
                                    F("obsrc", 4, "uint32"), F("obdata", 1),
                                    F("cbdata", 1)]}]}, "size": 40}]}
PCKBD_PAYLOAD = bytes.fromhex(
    "001c6100051470636b62642f657874656e6465645f7374617465"
    "000000000000000000000001fa00")


def test_real_pckbd():
    assert len(PCKBD_PAYLOAD) == 40
    check(PCKBD_PAYLOAD, PCKBD_DESC)


def test_real_pckbd_subsection_marker_damaged():
    bad = bytearray(PCKBD_PAYLOAD)
    bad[4] = 0x06
    with pytest.raises(errors.VMDescError) as ei:
        measure(PAD + bytes(bad) + footer(1), len(PAD), PCKBD_DESC, base_offset=100)
    assert ei.value.offset == 100 + len(PAD) + 4
    assert ei.value.section == "pckbd"


# --------------------------------------------------------------------------
# plain fields, arrays, structs
# --------------------------------------------------------------------------

TIMER = {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
         "fields": [F("cpu_ticks_offset", 8, "int64"),
                    F("unused", 8, "unused_buffer"),
                    F("cpu_clock_offset", 8, "int64")]}


def test_plain_fields_and_unused_buffer():
    check(bytes(range(24)), TIMER)


def test_array_len_multiplies_element_size():
    dev = {"name": "dma", "instance_id": 1, "vmsd_name": "dma", "version": 1,
           "fields": [F("base", 2, "uint16", array_len=4), F("flags", 1)]}
    check(bytes(9), dev)


def test_folded_array_of_structs_with_inline_tmp():
    # cpu: env.fpregs is 8 x struct fpreg, each a "tmp" of 10 bytes.
    fpreg = {"vmsd_name": "fpreg", "version": 0, "fields": [
        {"name": "tmp", "type": "tmp", "vmsd_name": "fpreg_tmp", "version": 0,
         "fields": [F("tmp_mant", 8, "uint64"), F("tmp_exp", 2, "uint16")],
         "size": 10}]}
    seg = {"vmsd_name": "segment", "version": 1,
           "fields": [F("selector", 4, "uint32"), F("base", 8, "uint64"),
                      F("limit", 4, "uint32"), F("flags", 4, "uint32")]}
    dev = {"name": "cpu", "instance_id": 0, "vmsd_name": "cpu", "version": 12,
           "fields": [F("env.fpregs", 10, "struct", array_len=8, struct=fpreg),
                      F("env.ldt", 20, "struct", struct=seg)]}
    check(bytes(100), dev)


def test_unfolded_array_of_structs_with_subsections():
    # fdc: "drives" elements are described one by one because fdrive has
    # subsections; QEMU 10 gives the last element no "index".
    fdrive = {"vmsd_name": "fdrive", "version": 1,
              "fields": [F("head", 1), F("track", 1), F("sect", 1)],
              "subsections": [{"vmsd_name": "fdrive/media_rate", "version": 1,
                               "fields": [F("media_rate", 1)]}]}
    rate = sub_header("fdrive/media_rate") + b"\x02"
    bare = {"vmsd_name": "fdrive", "version": 1,
            "fields": [F("head", 1), F("track", 1), F("sect", 1)]}
    state = {"vmsd_name": "fdc", "version": 2, "fields": [
        F("sra", 1), F("fifo", 1, array_len=16),
        F("drives", 3 + len(rate), "struct", index=0, struct=fdrive),
        F("drives", 3, "struct", struct=bare)]}
    inner = b"\x40" + bytes(16) + b"\x00\x01\x02" + rate + b"\x03\x04\x05"
    dev = {"name": "fdc", "instance_id": 0, "vmsd_name": "fdc", "version": 2,
           "fields": [F("state", len(inner), "struct", struct=state)]}
    check(inner, dev)


def test_struct_size_is_authoritative_for_opaque_types():
    # "virtio", "pci config", "timer"... embed their own layout: only size counts.
    dev = {"name": "0000:00:03.0/virtio-net", "instance_id": 0,
           "vmsd_name": "virtio-net", "version": 11,
           "fields": [F("virtio", 45000, "virtio")]}
    check(bytes(45000), dev)
    q = {"name": "x", "instance_id": 0, "vmsd_name": "x", "version": 1,
         "fields": [{"name": "reqs", "type": "qtailq", "vmsd_name": "req",
                     "version": 1, "fields": [F("id", 4, "uint32")],
                     "size": 11}]}          # two elements + framing bytes
    check(b"\x01" + bytes(4) + b"\x01" + bytes(4) + b"\x00", q)


def test_nested_struct_disagreeing_with_its_size():
    seg = {"vmsd_name": "segment", "version": 1, "fields": [F("selector", 4)]}
    dev = {"name": "cpu", "instance_id": 0, "vmsd_name": "cpu", "version": 1,
           "fields": [F("a", 2), F("env.ldt", 5, "struct", struct=seg)]}
    with pytest.raises(errors.VMDescError) as ei:
        measure(bytes(20), 1, dev, base_offset=10)
    assert ei.value.offset == 10 + 1 + 2


def test_empty_fields_is_zero_bytes():
    dev = {"name": "empty", "instance_id": 0, "vmsd_name": "e", "version": 1,
           "fields": []}
    check(b"", dev)


# --------------------------------------------------------------------------
# subsections
# --------------------------------------------------------------------------

E1000_LIKE = {
    "name": "0000:00:02.0/e1000", "instance_id": 0, "vmsd_name": "e1000",
    "version": 2, "fields": [F("mac", 6, "buffer"), F("regs", 4, "uint32", array_len=3)],
    "subsections": [
        {"vmsd_name": "e1000/mit_state", "version": 1,
         "fields": [F("rdtr", 4, "uint32")]},
        {"vmsd_name": "e1000/full_mac_state", "version": 1,
         "fields": [F("mac_reg", 4, "uint32", array_len=2)],
         "subsections": [{"vmsd_name": "e1000/full_mac_state/deep", "version": 3,
                          "fields": [F("x", 2, "uint16")]}]}]}


def e1000_payload():
    return (bytes(6) + bytes(12) + sub_header("e1000/mit_state") + bytes(4)
            + sub_header("e1000/full_mac_state") + bytes(8)
            + sub_header("e1000/full_mac_state/deep", 3) + b"\x12\x34")


def test_device_subsections_and_nested_subsection():
    check(e1000_payload(), E1000_LIKE)


def test_absent_subsection_is_not_listed():
    dev = dict(E1000_LIKE, subsections=E1000_LIKE["subsections"][:1])
    check(bytes(18) + sub_header("e1000/mit_state") + bytes(4), dev)
    dev = dict(E1000_LIKE)
    del dev["subsections"]
    check(bytes(18), dev)


def test_listed_subsection_missing_from_payload():
    payload = bytes(18) + sub_header("e1000/mit_state") + bytes(4)
    with pytest.raises(errors.VMDescError) as ei:
        measure(PAD + payload + footer(3), len(PAD), E1000_LIKE, base_offset=50)
    assert ei.value.offset == 50 + len(PAD) + len(payload)
    assert "full_mac_state" in str(ei.value)


def test_payload_subsection_missing_from_description():
    dev = dict(E1000_LIKE, subsections=E1000_LIKE["subsections"][:1])
    payload = bytes(18) + sub_header("e1000/mit_state") + bytes(4)
    extra = sub_header("e1000/full_mac_state") + bytes(8)
    with pytest.raises(errors.VMDescError) as ei:
        measure(payload + extra + footer(3), 0, dev)
    assert ei.value.offset == len(payload)


def test_subsection_name_and_version_checked():
    dev = {"name": "d", "instance_id": 0, "vmsd_name": "dev", "version": 1,
           "fields": [F("a", 1)],
           "subsections": [{"vmsd_name": "dev/one", "version": 2,
                            "fields": [F("b", 1)]}]}
    check(b"\x00" + sub_header("dev/one", 2) + b"\x01", dev)
    with pytest.raises(errors.VMDescError) as ei:
        measure(b"\x00" + sub_header("dev/two", 2) + b"\x01" + footer(1), 0, dev)
    assert ei.value.offset == 2
    with pytest.raises(errors.VMDescError) as ei:
        measure(b"\x00" + sub_header("dev/one", 5) + b"\x01" + footer(1), 0, dev)
    assert ei.value.offset == 1 + 2 + len("dev/one")


def test_subsection_inside_unfolded_struct_missing():
    sub = {"vmsd_name": "ich9_pm/memhp", "version": 1, "fields": [F("m", 2)]}
    pm = {"vmsd_name": "ich9_pm", "version": 1, "fields": [F("p", 1)],
          "subsections": [sub]}
    dev = {"name": "0000:00:1f.0/ICH9LPC", "instance_id": 0,
           "vmsd_name": "ICH9LPC", "version": 1,
           "fields": [F("pm", 1 + len(sub_header("ich9_pm/memhp")) + 2, "struct",
                        struct=pm), F("tail", 1)]}
    good = b"\x01" + sub_header("ich9_pm/memhp") + b"\x00\x00" + b"\x09"
    check(good, dev)
    bad = b"\x01" + b"\x00" * (len(good) - 1)
    with pytest.raises(errors.VMDescError) as ei:
        measure(bad, 0, dev, base_offset=1000)
    assert ei.value.offset == 1001


# --------------------------------------------------------------------------
# NULL pointers
# --------------------------------------------------------------------------

CLOCK = {"vmsd_name": "clock", "version": 0, "fields": [F("period", 8, "uint64")]}


def test_nullptr_runs():
    # array of 5 pointers: NULL, NULL, clk, clk, NULL (QEMU 10 folds runs)
    dev = {"name": "clk-sel", "instance_id": 0, "vmsd_name": "clk-sel", "version": 0,
           "fields": [F("clock_in", 1, "nullptr", array_len=2),
                      F("clock_in", 8, "struct", array_len=2, struct=CLOCK),
                      F("clock_in", 1, "nullptr")]}
    m = bytes([NULLPTR_MARKER])
    check(m + m + bytes(16) + m, dev)


def test_nullptr_marker_wrong():
    dev = {"name": "c", "instance_id": 0, "vmsd_name": "c", "version": 0,
           "fields": [F("a", 2), F("clock_in", 1, "nullptr", array_len=3)]}
    with pytest.raises(errors.VMDescError) as ei:
        measure(b"\x00\x00\x30\x30\x00" + footer(1), 0, dev, base_offset=7)
    assert ei.value.offset == 7 + 4


def test_pre_10_nullptr_description_cannot_measure():
    # Older QEMUs described a NULL first element as the array type with an
    # empty struct and size 1; the other elements' size is unknown.
    dev = {"name": "s390_css", "instance_id": 0, "vmsd_name": "s390_css",
           "version": 1,
           "fields": [{"name": "css", "array_len": 256, "type": "struct",
                       "struct": {}, "size": 1}]}
    assert measure(bytes(300), 0, dev) is None


# --------------------------------------------------------------------------
# devices that cannot be measured, old-style devices
# --------------------------------------------------------------------------

def test_old_style_save_state_device():
    dev = {"name": "slirp", "instance_id": 0, "size": 131,
           "fields": [{"name": "data", "size": 131, "type": "buffer"}]}
    check(bytes(131), dev)
    bad = dict(dev, size=130)
    with pytest.raises(errors.VMDescError):
        measure(bytes(140), 0, bad)


def test_device_without_fields_is_not_measured():
    assert measure(bytes(10), 0, {"name": "x", "instance_id": 0}) is None
    assert measure(bytes(10), 0, {"name": "x", "instance_id": 0,
                                  "vmsd_name": "x", "version": 1}) is None


def test_configuration_record():
    conf = {"vmsd_name": "configuration", "version": 1,
            "fields": [F("len", 4, "uint32"), F("name", 11, "buffer")],
            "subsections": [{"vmsd_name": "configuration/capabilities",
                             "version": 1,
                             "fields": [F("caps_count", 4, "uint32"),
                                        F("capabilities", 11, "capability")]}]}
    payload = (struct.pack(">I", 11) + b"pc-q35-10.0"
               + sub_header("configuration/capabilities")
               + struct.pack(">I", 1) + b"\x0amapped-ram")
    check(payload, conf, tail=b"\x01")


# --------------------------------------------------------------------------
# truncation and bad descriptions
# --------------------------------------------------------------------------

def test_truncated_payload_offset_is_the_field_start():
    payload = bytes(20)                 # TIMER needs 24
    with pytest.raises(errors.TruncatedStream) as ei:
        measure(PAD + payload, len(PAD), TIMER, base_offset=4096)
    assert ei.value.offset == 4096 + len(PAD) + 16
    assert ei.value.section == "timer"
    assert isinstance(ei.value, errors.StreamError)


def test_truncated_inside_subsection_header():
    buf = bytes(18) + sub_header("e1000/mit_state")[:6]
    with pytest.raises(errors.TruncatedStream) as ei:
        measure(buf, 0, E1000_LIKE, base_offset=1)
    assert ei.value.offset == 1 + 18


def test_bad_description_raises_vmdesc_error():
    for field in ({"name": "a", "type": "uint8"},                # no size
                  {"name": "a", "type": "uint8", "size": -1},
                  {"name": "a", "type": "uint8", "size": 1, "array_len": "2"},
                  {"type": "uint8", "size": 1},
                  "not an object"):
        dev = {"name": "d", "instance_id": 0, "fields": [field]}
        with pytest.raises(errors.VMDescError) as ei:
            measure(bytes(4), 0, dev, base_offset=9)
        assert ei.value.offset == 9


# --------------------------------------------------------------------------
# parse_vmdesc
# --------------------------------------------------------------------------

VMDESC = {"page_size": 4096,
          "configuration": {"vmsd_name": "configuration", "version": 1,
                            "fields": [F("len", 4, "uint32"), F("name", 11, "buffer")]},
          "devices": [TIMER, PCKBD_DESC, E1000_LIKE,
                      {"name": "dma", "instance_id": 0, "vmsd_name": "dma",
                       "version": 1, "fields": [F("a", 1)]},
                      {"name": "dma", "instance_id": 1, "vmsd_name": "dma",
                       "version": 1, "fields": [F("a", 2)]}]}


def test_parse_vmdesc_record_at_offset():
    data = b"\x00" * 5 + b"\x00" + trailer(VMDESC)
    desc = parse_vmdesc(data, offset=6)
    assert desc == VMDESC


def test_parse_vmdesc_bare_json():
    assert parse_vmdesc(json.dumps(VMDESC).encode()) == VMDESC


def test_parse_vmdesc_malformed_json_offset():
    raw = b'{"page_size": 4096, "devices": [}'
    data = b"XX" + b"\x06" + struct.pack(">I", len(raw)) + raw
    with pytest.raises(errors.VMDescError) as ei:
        parse_vmdesc(data, offset=2)
    assert ei.value.offset == 2 + 5 + raw.index(b"}")


@pytest.mark.parametrize("desc", [
    [],
    {"devices": []},                                        # no page_size
    {"page_size": 4096},                                    # no devices
    {"page_size": 4096, "devices": {}},
    {"page_size": 4096, "devices": [{"instance_id": 0}]},
    {"page_size": 4096, "devices": [{"name": "a"}]},
    {"page_size": 4096, "devices": [{"name": "a", "instance_id": -1}]},
    {"page_size": 4096, "devices": [{"name": "a", "instance_id": 0,
                                     "fields": [{"name": "f", "type": "u"}]}]},
    {"page_size": 4096, "devices": [{"name": "a", "instance_id": 0, "fields": [],
                                     "subsections": [{"fields": []}]}]},
    {"page_size": 4096, "devices": [{"name": "a", "instance_id": 0, "fields": [],
                                     "subsections": [{"vmsd_name": "a/b"}]}]},
])
def test_parse_vmdesc_missing_keys(desc):
    with pytest.raises(errors.VMDescError) as ei:
        parse_vmdesc(trailer(desc))
    assert ei.value.offset == 5


def test_parse_vmdesc_truncated_and_not_utf8():
    rec = trailer(VMDESC)
    with pytest.raises(errors.TruncatedStream):
        parse_vmdesc(rec[:-1])
    with pytest.raises(errors.TruncatedStream):
        parse_vmdesc(rec[:3])
    raw = b'{"page_size": 4096, "devices": [], "x": "\xff"}'
    with pytest.raises(errors.VMDescError) as ei:
        parse_vmdesc(b"\x06" + struct.pack(">I", len(raw)) + raw)
    assert ei.value.offset == 5 + raw.index(b"\xff")


def test_parse_vmdesc_allows_device_without_fields():
    desc = {"page_size": 4096, "devices": [{"name": "odd", "instance_id": 0}]}
    assert parse_vmdesc(trailer(desc))["devices"][0]["name"] == "odd"


# --------------------------------------------------------------------------
# find_device, and a whole tail of a stream
# --------------------------------------------------------------------------

def test_find_device_by_name_and_instance():
    assert find_device(VMDESC, "dma", 1)["fields"][0]["size"] == 2
    assert find_device(VMDESC, "dma", 0)["fields"][0]["size"] == 1
    assert find_device(VMDESC, "dma", 2) is None
    assert find_device(VMDESC, "nope", 0) is None


def test_sequence_of_full_sections_matches_devices_order():
    """Walk FULL sections the way the framing layer will, devices[] in order."""
    payloads = [bytes(24), PCKBD_PAYLOAD, e1000_payload(), b"\x01", b"\x02\x03"]
    stream = b""
    for sid, (dev, payload) in enumerate(zip(VMDESC["devices"], payloads), 10):
        name = dev["name"].encode()
        stream += (b"\x04" + struct.pack(">I", sid) + bytes([len(name)]) + name
                   + struct.pack(">II", dev["instance_id"], 1) + payload + footer(sid))
    stream += b"\x00" + trailer(VMDESC)
    desc = parse_vmdesc(stream, offset=stream.rindex(b"\x00\x06") + 1)
    p, seen = 0, []
    while stream[p] == 0x04:
        sid, = struct.unpack_from(">I", stream, p + 1)
        ln = stream[p + 5]
        idstr = stream[p + 6:p + 6 + ln].decode()
        iid, _ver = struct.unpack_from(">II", stream, p + 6 + ln)
        start = p + 14 + ln
        dev = find_device(desc, idstr, iid)
        assert dev is desc["devices"][len(seen)]
        end = measure(stream, start, dev)
        assert stream[end:end + 5] == footer(sid)
        seen.append(idstr)
        p = end + 5
    assert stream[p] == 0 and len(seen) == 5


# --------------------------------------------------------------------------
# footer_scan
# --------------------------------------------------------------------------

def test_footer_scan_skips_false_footers():
    sid = 0x1B
    fake = footer(sid)
    buf = b"\x00" * 3 + fake + b"\x99" + fake + b"\x04rest"
    ok = lambda q: buf[q:q + 1] in (b"\x04", b"\x00")
    assert footer_scan(buf, 0, sid, ok) == 9
    assert footer_scan(buf, 0, sid, lambda q: True) == 3
    assert footer_scan(buf, 4, sid, lambda q: True) == 9
    assert footer_scan(buf, 0, sid + 1, lambda q: True) is None
    assert footer_scan(buf, 0, sid, lambda q: False) is None
    assert footer_scan(memoryview(buf), 0, sid, ok) == 9


def test_footer_scan_memoryview_across_windows():
    sid = 5
    buf = bytearray((1 << 20) + 64)
    at = (1 << 20) - 2                   # straddles the first window's end
    buf[at:at + 5] = footer(sid)
    assert footer_scan(memoryview(buf), 0, sid, lambda q: True) == at
    assert footer_scan(memoryview(buf), at + 1, sid, lambda q: True) is None
