"""Containers that hold a stream: libvirt save images, qcow2 internal snapshots,
gzip/xz-wrapped plain streams.

The fixtures in tests/data/containers/ were made by real libvirt / QEMU runs
(see make_container_fixtures.py there); manifest.json records what those runs
said (sizes, sha256 of the embedded streams as read by external tools or by
``qemu-io read -b``). No QEMU is needed here.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import struct
import zlib
from pathlib import Path

import pytest

from qemuram.containers import (LIBVIRT_SAVE_FORMATS, LibvirtSave, Qcow2StreamReader,
                                Qcow2VMState, detect, open_any)
from qemuram.errors import BadMagic, ContainerError, StreamError, TruncatedStream, UsageError

DATA = Path(__file__).parent / "data" / "containers"
MANIFEST = json.loads((DATA / "manifest.json").read_text())
LV = MANIFEST["libvirt"]["images"]
QC = MANIFEST["qcow2"]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def pattern() -> bytes:
    out = bytearray()
    i = 0
    while len(out) < MANIFEST["pattern"]["length"]:
        out += hashlib.sha256(b"qemuram-container-pattern-%d" % i).digest()
        i += 1
    return bytes(out[:MANIFEST["pattern"]["length"]])


def assert_pattern_pages_in(stream: bytes) -> None:
    pat = pattern()
    assert sha(pat) == MANIFEST["pattern"]["sha256"]
    for off in range(0, len(pat), 4096):
        assert pat[off:off + 4096] in stream, f"pattern page {off // 4096} not in stream"


def libvirt_bytes(label: str) -> bytes:
    raw = (DATA / LV[label]["file"]).read_bytes()
    return gzip.decompress(raw) if LV[label]["file"].endswith(".gz") else raw


@pytest.fixture(scope="module")
def qcow2_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("qcow2")
    out = {}
    for name, e in QC.items():
        p = d / f"{name}.qcow2"
        p.write_bytes(gzip.decompress((DATA / e["file"]).read_bytes()))
        assert sha(p.read_bytes()) == e["image_sha256"]
        out[name] = p
    return out


@pytest.fixture(scope="module")
def plain_stream() -> bytes:
    data = gzip.decompress((DATA / "plain.mig.gz").read_bytes())
    assert sha(data) == MANIFEST["plain"]["sha256"]
    return data


def read_all(f, chunk=65536) -> bytes:
    out = bytearray()
    while True:
        b = f.read(chunk)
        if not b:
            return bytes(out)
        out += b


# ----------------------------------------------------------------- detect


def test_detect_plain_and_unknown(plain_stream):
    assert detect(io.BytesIO(plain_stream)) is None
    assert detect(io.BytesIO(b"")) is None
    assert detect(io.BytesIO(b"\0" * 200)) is None
    assert detect(io.BytesIO(gzip.compress(plain_stream[:1000]))) is None


def test_detect_containers(qcow2_files):
    c = detect(io.BytesIO(libvirt_bytes("raw")))
    assert isinstance(c, LibvirtSave) and c.kind == "libvirt-save"
    with open(qcow2_files["snap-v3"], "rb") as f:
        c = detect(f)
        assert isinstance(c, Qcow2VMState) and c.kind == "qcow2"


def test_format_names():
    assert LIBVIRT_SAVE_FORMATS == {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop",
                                    5: "zstd", 6: "sparse"}


# ---------------------------------------------------------------- libvirt


@pytest.mark.parametrize("label", sorted(LV))
def test_libvirt_header_and_xml(label):
    e = LV[label]
    s = LibvirtSave(io.BytesIO(libvirt_bytes(label)))
    assert s.version == e["version"] == 2
    assert s.data_len == e["data_len"]
    assert s.stream_offset == e["stream_offset"] == 92 + e["data_len"]
    assert s.compression_id == e["compression_id"]
    assert s.compression == e["format"]
    assert s.was_running is bool(e["was_running"]) is False
    assert s.cookie_offset == e["cookie_offset"]
    assert s.xml.startswith("<domain") and s.xml.rstrip().endswith("</domain>")
    assert "<name>qemuram-fixture</name>" in s.xml
    assert "loader,file=" in s.xml and "addr=0x100000" in s.xml
    assert s.domain_name == "qemuram-fixture"
    assert s.cookie is not None and s.cookie.startswith("<cookie>")
    assert "\0" not in s.xml and "\0" not in s.cookie
    d = s.describe()
    assert d["kind"] == "libvirt-save" and d["compression"] == e["format"]


@pytest.mark.parametrize("label", sorted(k for k, v in LV.items()
                                         if v["format"] in ("raw", "gzip", "bzip2", "xz")))
def test_libvirt_stream(label):
    e = LV[label]
    s = LibvirtSave(io.BytesIO(libvirt_bytes(label)))
    with s.open_stream() as f:
        assert f.read(4) == b"QEVM"
        data = b"QEVM" + read_all(f, 7777)
    assert len(data) == e["stream_size"]
    assert sha(data) == e["stream_sha256"]
    assert data.endswith(b"}")          # JSON vmdesc closes the stream
    assert_pattern_pages_in(data)


def test_libvirt_compressed_is_streamed():
    s = LibvirtSave(io.BytesIO(libvirt_bytes("gzip")))
    f = s.open_stream()
    inner = f._inner
    assert isinstance(inner, gzip.GzipFile)
    f.seek(100)
    assert f.tell() == 100
    f.close()
    assert f.closed


def test_libvirt_lzop_names_compression():
    s = LibvirtSave(io.BytesIO(libvirt_bytes("lzop")))
    assert s.compression == "lzop"
    with pytest.raises(ContainerError, match="lzop") as ei:
        s.open_stream()
    assert ei.value.offset == 28


def test_libvirt_raw_window_is_seekable():
    e = LV["raw"]
    whole = libvirt_bytes("raw")
    s = LibvirtSave(io.BytesIO(whole))
    f = s.open_stream()
    assert f.seekable() and f.base_offset == e["stream_offset"]
    f.seek(-10, io.SEEK_END)
    assert f.read() == whole[-10:]
    f.seek(1000)
    buf = bytearray(50)
    assert f.readinto(buf) == 50 and bytes(buf) == whole[e["stream_offset"] + 1000:][:50]


def patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_libvirt_partial_magic():
    data = b"LibvirtQemudPart" + libvirt_bytes("raw")[16:]
    with pytest.raises(ContainerError, match="LibvirtQemudPart") as ei:
        LibvirtSave(io.BytesIO(data))
    assert ei.value.offset == 0 and "incomplete" in str(ei.value)
    with pytest.raises(ContainerError, match="incomplete"):
        detect(io.BytesIO(data))


def test_libvirt_bad_magic_and_truncation():
    good = libvirt_bytes("raw")
    with pytest.raises(BadMagic) as ei:
        LibvirtSave(io.BytesIO(b"LibvirtQemudSavX" + good[16:]))
    assert ei.value.offset == 0
    with pytest.raises(TruncatedStream) as ei:
        LibvirtSave(io.BytesIO(good[:50]))
    assert ei.value.offset == 50
    with pytest.raises(TruncatedStream) as ei:
        LibvirtSave(io.BytesIO(good[:10]))
    assert ei.value.offset == 10
    with pytest.raises(TruncatedStream) as ei:      # data_len runs past the end
        LibvirtSave(io.BytesIO(good[:1000]))
    assert ei.value.offset == 1000


def test_libvirt_unknown_compression_id():
    data = patched(libvirt_bytes("raw"), 28, "<I", 99)
    with pytest.raises(ContainerError, match="compression id 99") as ei:
        LibvirtSave(io.BytesIO(data))
    assert ei.value.offset == 28
    assert "at byte 28" in str(ei.value)


def test_libvirt_bad_version_and_cookie_offset():
    raw = libvirt_bytes("raw")
    with pytest.raises(ContainerError) as ei:
        LibvirtSave(io.BytesIO(patched(raw, 16, "<I", 0)))
    assert ei.value.offset == 16
    with pytest.raises(ContainerError) as ei:
        LibvirtSave(io.BytesIO(patched(raw, 32, "<I", LV["raw"]["data_len"] + 1)))
    assert ei.value.offset == 32
    with pytest.raises(ContainerError) as ei:
        LibvirtSave(io.BytesIO(patched(raw, 20, "<I", 0)))
    assert ei.value.offset == 20


def test_libvirt_was_running_and_big_endian():
    raw = libvirt_bytes("raw")
    s = LibvirtSave(io.BytesIO(patched(raw, 24, "<I", 1)))
    assert s.was_running is True
    fields = struct.unpack_from("<5I", raw, 16)
    be = bytearray(raw)
    struct.pack_into(">5I", be, 16, *fields)
    s = LibvirtSave(io.BytesIO(bytes(be)))
    assert s.byte_order == ">" and s.data_len == LV["raw"]["data_len"]
    assert s.open_stream().read(4) == b"QEVM"


def test_libvirt_zstd_and_sparse_ids():
    raw = libvirt_bytes("raw")
    s = LibvirtSave(io.BytesIO(patched(raw, 28, "<I", 5)))
    assert s.compression == "zstd"
    try:
        import zstandard  # noqa: F401
    except ImportError:
        with pytest.raises(ContainerError, match="zstd"):
            s.open_stream()
    s = LibvirtSave(io.BytesIO(patched(raw, 28, "<I", 6)))
    assert s.compression == "sparse"
    f = s.open_stream()
    assert f.base_offset == s.stream_offset and f.read(4) == b"QEVM"


def test_libvirt_truncated_compressed_stream():
    e = LV["xz"]
    data = libvirt_bytes("xz")
    s = LibvirtSave(io.BytesIO(data[:e["stream_offset"] + 5000]))
    f = s.open_stream()
    with pytest.raises(TruncatedStream) as ei:
        read_all(f)
    assert ei.value.offset == e["stream_offset"] + 5000
    s = LibvirtSave(io.BytesIO(data[:e["stream_offset"]] + b"\xfd7zXZ\0garbage" * 10))
    with pytest.raises(StreamError):
        read_all(s.open_stream())


# ------------------------------------------------------------------ qcow2


@pytest.mark.parametrize("name", sorted(QC))
def test_qcow2_snapshot_table(qcow2_files, name):
    e = QC[name]
    with open(qcow2_files[name], "rb") as f:
        q = Qcow2VMState(f)
        assert q.version == (2 if "compat=0.10" in " ".join(e["create_options"]) else 3)
        assert q.size == e["virtual_size"]
        assert [(s.id, s.name, s.vm_state_size, s.date_sec) for s in q.snapshots] == \
            [(s["id"], s["name"], s["vm_state_size"], s["date_sec"]) for s in e["snapshots"]]
        for s in q.snapshots:
            assert s.has_vm_state and s.vm_state_size_large == s.vm_state_size
            assert s.disk_size == e["virtual_size"]
            assert s.l1_size > 0 and s.l1_table_offset % q.cluster_size == 0
            assert s.date.year >= 2024


def test_qcow2_vm_state_offset(qcow2_files):
    with open(qcow2_files["snap-v3"], "rb") as f:
        q = Qcow2VMState(f)
        assert q.cluster_size == 65536
        assert q.vm_state_offset(q.snapshots[0]) == 512 << 20     # FORMAT.md's example
    with open(qcow2_files["snap-v2-512"], "rb") as f:
        q = Qcow2VMState(f)
        # 512-byte clusters: one L2 table maps 64 * 512 bytes, 64 MiB is a multiple.
        assert q.cluster_size == 512 and q.vm_state_offset(q.snapshots[0]) == 64 << 20


@pytest.mark.parametrize("name", sorted(QC))
def test_qcow2_stream_matches_qemu_io(qcow2_files, name):
    e = QC[name]
    with open(qcow2_files[name], "rb") as f:
        q = Qcow2VMState(f)
        for ref in e["snapshots"]:
            with q.open_stream(ref["name"]) as r:
                assert isinstance(r, io.RawIOBase) and r.seekable()
                data = read_all(r, 100_000)
            assert len(data) == ref["vm_state_size"]
            assert data[:8].hex() == ref["first_bytes_hex"]
            assert data.startswith(b"QEVM") and data.endswith(b"}")
            assert sha(data) == ref["vmstate_sha256"]
            assert_pattern_pages_in(data)


def test_qcow2_selection(qcow2_files):
    with open(qcow2_files["snap-v3"], "rb") as f:
        q = Qcow2VMState(f)
        assert q.find_snapshot().name == "snap2"      # the last one
        assert q.find_snapshot(1).name == "snap1"
        assert q.find_snapshot("1").name == "snap1"
        assert q.find_snapshot("snap1").id == "1"
        with pytest.raises(ContainerError) as ei:
            q.open_stream("nope")
        assert "snap1" in str(ei.value) and "snap2" in str(ei.value)
        with pytest.raises(ContainerError):
            q.find_snapshot(7)


def test_qcow2_cluster_boundaries(qcow2_files):
    with open(qcow2_files["snap-v2-512"], "rb") as f:
        q = Qcow2VMState(f)
        r = q.open_stream("snap1")
        whole = read_all(r)
        assert sha(whole) == QC["snap-v2-512"]["snapshots"][0]["vmstate_sha256"]
        for start, n in [(0, 1), (511, 2), (510, 1030), (32767, 3), (32768 - 100, 600),
                         (100_000, 70_000), (len(whole) - 5, 100)]:
            r.seek(start)
            assert r.read(n) == whole[start:start + n]
        assert r.seek(0, io.SEEK_END) == len(whole)
        assert r.read(10) == b""
        r.seek(-3, io.SEEK_END)
        buf = bytearray(8)
        assert r.readinto(buf) == 3 and bytes(buf[:3]) == whole[-3:]
        with pytest.raises(ValueError):
            r.seek(-1)
        r.seek(12345)
        assert r.tell() == 12345
        buffered = io.BufferedReader(q.open_stream("snap1"))
        assert buffered.read(4) == b"QEVM"


# --- corrupted / crafted qcow2 images (patched copies of the real one)


def qcow2_bytes(qcow2_files, name="snap-v3") -> bytearray:
    return bytearray(qcow2_files[name].read_bytes())


def vmstate_l2_entry_at(img: bytes, q: Qcow2VMState, snap, index_in_state: int):
    """File offset of the L2 entry mapping VM-state cluster number ``index_in_state``."""
    vaddr = q.vm_state_offset(snap) + index_in_state * q.cluster_size
    l2_bits = q.cluster_bits - 3
    l1_index = vaddr >> (q.cluster_bits + l2_bits)
    l1e = struct.unpack_from(">Q", img, snap.l1_table_offset + 8 * l1_index)[0]
    l2 = l1e & 0x00FFFFFFFFFFFE00
    l2_index = (vaddr >> q.cluster_bits) & ((1 << l2_bits) - 1)
    return l2 + 8 * l2_index, snap.l1_table_offset + 8 * l1_index


def test_qcow2_bad_magic_truncated_and_version(qcow2_files):
    img = qcow2_bytes(qcow2_files)
    bad = bytearray(img)
    bad[:4] = b"QFI\xfc"
    with pytest.raises(BadMagic) as ei:
        Qcow2VMState(io.BytesIO(bytes(bad)))
    assert ei.value.offset == 0
    with pytest.raises(TruncatedStream) as ei:
        Qcow2VMState(io.BytesIO(bytes(img[:40])))
    assert ei.value.offset == 40
    with pytest.raises(TruncatedStream) as ei:
        Qcow2VMState(io.BytesIO(bytes(img[:90])))     # v3 header cut short
    assert ei.value.offset == 90
    with pytest.raises(ContainerError) as ei:
        Qcow2VMState(io.BytesIO(patched(img, 4, ">I", 4)))
    assert ei.value.offset == 4


def test_qcow2_feature_bits(qcow2_files):
    img = qcow2_bytes(qcow2_files)
    with pytest.raises(ContainerError, match="extended L2") as ei:
        Qcow2VMState(io.BytesIO(patched(img, 72, ">Q", 1 << 4)))
    assert ei.value.offset == 72
    with pytest.raises(ContainerError, match="external data file"):
        Qcow2VMState(io.BytesIO(patched(img, 72, ">Q", 1 << 2)))
    with pytest.raises(ContainerError, match="unknown incompatible"):
        Qcow2VMState(io.BytesIO(patched(img, 72, ">Q", 1 << 9)))
    q = Qcow2VMState(io.BytesIO(patched(img, 72, ">Q", 1)))   # dirty: still readable
    assert q.feature_names == ["dirty"]


def test_qcow2_l1_beyond_eof(qcow2_files):
    img = qcow2_bytes(qcow2_files)
    q = Qcow2VMState(io.BytesIO(bytes(img)))
    snap = q.snapshots[0]
    far = (len(img) + (1 << 20)) & ~0xFFFF
    bad = patched(img, snap.entry_offset, ">Q", far)
    q = Qcow2VMState(io.BytesIO(bad))
    with pytest.raises(ContainerError, match="past the end") as ei:
        q.open_stream("snap1")
    assert ei.value.offset == snap.entry_offset
    assert str(far) in str(ei.value)
    # the other snapshot is untouched
    assert q.open_stream("snap2").read(4) == b"QEVM"


def test_qcow2_snapshot_table_beyond_eof(qcow2_files):
    img = qcow2_bytes(qcow2_files)
    with pytest.raises(ContainerError) as ei:
        Qcow2VMState(io.BytesIO(patched(img, 64, ">Q", (len(img) + 0x20000) & ~0xFFFF)))
    assert ei.value.offset == 64
    with pytest.raises(ContainerError) as ei:
        Qcow2VMState(io.BytesIO(patched(img, 64, ">Q", 0x10001)))
    assert ei.value.offset == 64


def test_qcow2_l2_and_data_beyond_eof(qcow2_files):
    img = qcow2_bytes(qcow2_files, "snap-v2-512")
    q = Qcow2VMState(io.BytesIO(bytes(img)))
    snap = q.snapshots[0]
    l2e_at, l1e_at = vmstate_l2_entry_at(img, q, snap, 3)
    far = (len(img) + 4096) & ~511
    bad = patched(img, l2e_at, ">Q", far)
    r = Qcow2VMState(io.BytesIO(bad)).open_stream("snap1")
    assert r.read(3 * 512) == read_all(q.open_stream("snap1"))[:3 * 512]
    with pytest.raises(ContainerError) as ei:
        r.read(10)
    assert ei.value.offset == l2e_at
    bad = patched(img, l1e_at, ">Q", far)
    with pytest.raises(ContainerError) as ei:
        Qcow2VMState(io.BytesIO(bad)).open_stream("snap1").read(10)
    assert ei.value.offset == l1e_at
    bad = patched(img, l2e_at, ">Q", 0x1234)           # reserved bits, unaligned
    r = Qcow2VMState(io.BytesIO(bad)).open_stream("snap1")
    r.seek(3 * 512)
    with pytest.raises(ContainerError, match="bad L2 entry"):
        r.read(1)


def test_qcow2_zero_unallocated_and_compressed_clusters(qcow2_files):
    img = qcow2_bytes(qcow2_files, "snap-v3")
    q = Qcow2VMState(io.BytesIO(bytes(img)))
    snap = q.snapshots[0]
    ref = read_all(q.open_stream("snap1"))
    cs = q.cluster_size
    e0, _ = vmstate_l2_entry_at(img, q, snap, 0)
    e1, _ = vmstate_l2_entry_at(img, q, snap, 1)
    e2, _ = vmstate_l2_entry_at(img, q, snap, 2)
    host0 = struct.unpack_from(">Q", img, e0)[0]
    # cluster 0 -> zero flag (v3), cluster 1 -> unallocated
    bad = patched(img, e0, ">Q", host0 | 1)
    bad = patched(bad, e1, ">Q", 0)
    # cluster 2 -> a compressed copy of itself, appended at an unaligned offset
    comp = zlib.compressobj(9, zlib.DEFLATED, -12)
    blob = comp.compress(ref[2 * cs:3 * cs]) + comp.flush()
    coff = len(bad) + 100
    nsect = (coff + len(blob) - 1) // 512 - coff // 512 + 1
    shift = 62 - (q.cluster_bits - 8)
    desc = (1 << 62) | ((nsect - 1) << shift) | coff
    bad = bytearray(patched(bad, e2, ">Q", desc)) + bytes(100) + blob + bytes(600)
    r = Qcow2VMState(io.BytesIO(bytes(bad))).open_stream("snap1")
    got = read_all(r, 30000)
    expect = bytes(2 * cs) + ref[2 * cs:]
    assert got == expect
    # compressed data that is garbage
    bad[coff:coff + len(blob)] = b"\xff" * len(blob)
    r = Qcow2VMState(io.BytesIO(bytes(bad))).open_stream("snap1")
    r.seek(2 * cs)
    with pytest.raises(ContainerError, match="compressed"):
        r.read(10)


def test_qcow2_no_vm_state(qcow2_files):
    img = qcow2_bytes(qcow2_files)
    q = Qcow2VMState(io.BytesIO(bytes(img)))
    s1, s2 = q.snapshots
    bad = patched(img, s1.entry_offset + 32, ">I", 0)
    bad = patched(bad, s1.entry_offset + 40, ">Q", 0)       # vm_state_size_large
    q = Qcow2VMState(io.BytesIO(bad))
    with pytest.raises(ContainerError, match="no VM state"):
        q.open_stream("snap1")
    assert q.find_snapshot().name == "snap2"
    bad = patched(bad, s2.entry_offset + 32, ">I", 0)
    bad = patched(bad, s2.entry_offset + 40, ">Q", 0)
    with pytest.raises(ContainerError, match="snap1.*snap2"):
        Qcow2VMState(io.BytesIO(bad)).open_stream()


def test_qcow2_ambiguous_name(qcow2_files):
    img = qcow2_bytes(qcow2_files)
    q = Qcow2VMState(io.BytesIO(bytes(img)))
    s2 = q.snapshots[1]
    # give snap2 the id "1" too (ids precede names in an entry; same length)
    name_at = s2.entry_offset + 40 + s2.extra_data_size
    bad = bytearray(img)
    assert bad[name_at:name_at + 1] == b"2"
    bad[name_at:name_at + 1] = b"1"
    q = Qcow2VMState(io.BytesIO(bytes(bad)))
    with pytest.raises(ContainerError, match="ambiguous"):
        q.find_snapshot("1")


def test_qcow2_no_snapshots(tmp_path):
    # A header-only v2 image without snapshots.
    hdr = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", 2, 0, 0, 16, 1 << 20, 0, 0, 0,
                      0x10000, 1, 0, 0)
    q = Qcow2VMState(io.BytesIO(hdr + bytes(0x10000 - len(hdr))))
    assert q.snapshots == []
    with pytest.raises(ContainerError, match="no snapshots"):
        q.open_stream()


# ---------------------------------------------------------------- open_any


def test_open_any_plain_file_object(plain_stream):
    bio = io.BytesIO(plain_stream)
    f, info = open_any(bio)
    assert f is bio and info["kind"] == "plain" and info["compression"] is None


def test_open_any_plain_gzip(plain_stream):
    f, info = open_any(DATA / "plain.mig.gz")
    try:
        assert info == {"kind": "plain", "compression": "gzip"}
        assert f.read(4) == b"QEVM"
        f.seek(0)
        assert sha(read_all(f)) == MANIFEST["plain"]["sha256"]
    finally:
        f.close()
    assert f.closed


def test_open_any_plain_xz(plain_stream, tmp_path):
    p = tmp_path / "plain.mig.xz"
    p.write_bytes(lzma.compress(plain_stream))
    f, info = open_any(str(p))
    with f:
        assert info["compression"] == "xz" and read_all(f) == plain_stream


def test_open_any_libvirt(tmp_path):
    f, info = open_any(DATA / LV["xz"]["file"])
    with f:
        assert info["kind"] == "libvirt-save" and info["compression"] == "xz"
        assert info["domain_name"] == "qemuram-fixture" and "<domain" in info["xml"]
        assert info["stream_offset"] == LV["xz"]["stream_offset"]
        assert sha(read_all(f)) == LV["xz"]["stream_sha256"]
    # a gzip-wrapped libvirt image (how the raw fixture is shipped)
    f, info = open_any(DATA / LV["raw"]["file"])
    with f:
        assert info["kind"] == "libvirt-save" and info["outer_compression"] == "gzip"
        assert info["compression"] == "raw"
        assert sha(read_all(f)) == LV["raw"]["stream_sha256"]
    with pytest.raises(UsageError):
        open_any(DATA / LV["xz"]["file"], snapshot="snap1")


def test_open_any_qcow2(qcow2_files):
    f, info = open_any(qcow2_files["snap-v3"], snapshot="snap1")
    with f:
        assert isinstance(f, Qcow2StreamReader)
        assert info["kind"] == "qcow2" and info["snapshot"] == "snap1"
        assert info["vm_state_offset"] == 512 << 20
        assert [s["name"] for s in info["snapshots"]] == ["snap1", "snap2"]
        assert sha(read_all(f)) == QC["snap-v3"]["snapshots"][0]["vmstate_sha256"]
    # shipped .qcow2.gz, default snapshot (the last)
    f, info = open_any(DATA / QC["snap-v2-512"]["file"])
    with f:
        assert info["outer_compression"] == "gzip" and info["snapshot"] == "snap2"
        assert sha(read_all(f)) == QC["snap-v2-512"]["snapshots"][1]["vmstate_sha256"]


def test_open_any_unknown(tmp_path):
    with pytest.raises(BadMagic) as ei:
        open_any(io.BytesIO(b"hello world, not a stream"))
    assert ei.value.offset == 0
    with pytest.raises(BadMagic):
        open_any(io.BytesIO(gzip.compress(b"hello world")))
    with pytest.raises(UsageError):
        open_any(DATA / "plain.mig.gz", snapshot="x")
