"""``qemuram convert`` output loads in real QEMU 10 and gives the source's guest memory.

Every case converts a real QEMU stream with the CLI (``python -m qemuram.cli``
as a subprocess), loads the result into a destination QEMU started with the
matching machine, memory backend, devices and migration capabilities, and
compares QMP ``pmemsave`` of the planted ranges and of the whole of low RAM
(0..0xA0000 and 1 MiB..end of main RAM) with the source: either a source QEMU
the test ran itself, or the ground truth recorded for the fixture streams in
tests/data/fixtures.json.

Cases whose failure is a known library bug are strict xfails with
``raises=`` a dedicated exception, so any *other* failure still fails.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import random
import shlex
import shutil
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

try:
    from . import harness as h
    from .matrix import hugetlb1g_lock      # one lock for every 1 GiB-page test
except ImportError:  # run outside the package layout
    from tests.integration import harness as h
    from tests.integration.matrix import hugetlb1g_lock

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
CONT = DATA / "containers"
FX = json.loads((DATA / "fixtures.json").read_text())["fixtures"]
MANIFEST = json.loads((CONT / "manifest.json").read_text())
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096
CHUNK = 64 * MiB
#: The same lock file as tests/integration/matrix.py: only two 1 GiB pages exist.


class PostcopyAdviseNotRewritten(AssertionError):
    """QEMU refused a --host-page-size conversion: 'Postcopy needs matching RAM page sizes'."""


class IgnoredBlockSent(AssertionError):
    """QEMU refused pages for a block x-ignore-shared skips ('should not be migrated')."""


@pytest.fixture(autouse=True)
def _qemu():
    h.require(h.qemu_available((10, 0)), "qemu-system-x86_64 >= 10.0")


# --------------------------------------------------------------------------
# helpers: the CLI, fixtures, memory comparison
# --------------------------------------------------------------------------

def _env() -> Dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def qemuram(*argv) -> subprocess.CompletedProcess:
    """Run the CLI; it must succeed."""
    r = subprocess.run([sys.executable, "-m", "qemuram.cli", *map(str, argv)],
                       capture_output=True, env=_env(), cwd=str(ROOT), timeout=300)
    assert r.returncode == 0, (argv, r.returncode, r.stderr.decode(errors="replace")[-3000:])
    return r


def info(path) -> dict:
    return json.loads(qemuram("info", path, "--json").stdout)


def convert(src, dst, *opts) -> dict:
    rep = json.loads(qemuram("convert", src, dst, *opts, "--json").stdout)
    assert rep["output_size"] == os.path.getsize(dst)
    return rep


def cli_shell() -> str:
    """A shell prefix that runs the CLI from this checkout (for exec: URIs)."""
    return (f"PYTHONPATH={shlex.quote(str(ROOT))} {shlex.quote(sys.executable)} "
            f"-m qemuram.cli")


def gunzip_sparse(src: Path, dst: Path) -> Path:
    zero = bytes(MiB)
    with gzip.open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            chunk = fi.read(MiB)
            if not chunk:
                break
            if chunk == zero[:len(chunk)]:
                fo.seek(len(chunk), os.SEEK_CUR)
            else:
                fo.write(chunk)
        fo.truncate(fo.tell())
    return dst


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    """``fx(name) -> Path`` of a decompressed fixture stream."""
    root = tmp_path_factory.mktemp("convert-qemu-fixtures")
    made: Dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = gunzip_sparse(DATA / FX[name]["file"], root / f"{name}.mig")
            assert made[name].stat().st_size == FX[name]["stream_size"]
        return made[name]

    return get


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


def planted_ranges(memory: int, seed: str) -> List[Tuple[int, bytes]]:
    """Fixture-like planted data (as tests/data/make_fixtures.py plants)."""
    rng = random.Random(f"qemuram-convert-qemu:{seed}")
    top = b"".join(struct.pack(">Q", 0x70CE_0000_0000_0000 | i) for i in range(PAGE // 8))
    return [
        (0x100000, rng.randbytes(64 * KiB)),
        (0x200000, b"\xaa" * PAGE),
        (0x300000, bytes(1536) + rng.randbytes(1024) + bytes(1024) + b"\x5a" * 504 + bytes(8)),
        (memory - PAGE, top),
    ]


def ram_regions(memory: int) -> List[Tuple[int, int]]:
    """Plain RAM of a pc/q35 guest below 4 GiB (memory <= 2 GiB)."""
    return [(0, 0xA0000), (0x100000, memory - 0x100000)]


class Memory:
    """sha256 of every RAM region (and of its 64 MiB chunks) plus planted ranges."""

    def __init__(self, regions, planted):
        self.regions = regions          # [(addr, length, sha256, [chunk sha256] or None)]
        self.planted = planted          # [(addr, length, sha256)]

    @classmethod
    def read(cls, g: h.Guest, memory: int, planted: Sequence[Tuple[int, bytes]] = (),
             patch: Optional[Tuple[int, bytes]] = None) -> "Memory":
        """pmemsave of ``g``; ``patch`` (addr, bytes) is applied to what was read
        (the expected memory after a --replace)."""
        regions = []
        for addr, length in ram_regions(memory):
            whole, chunks = hashlib.sha256(), []
            for off in range(0, length, CHUNK):
                n = min(CHUNK, length - off)
                data = g.pmemsave(addr + off, n)
                if patch is not None:
                    pa, pd = patch
                    lo, hi = max(pa, addr + off), min(pa + len(pd), addr + off + n)
                    if lo < hi:
                        buf = bytearray(data)
                        buf[lo - addr - off:hi - addr - off] = pd[lo - pa:hi - pa]
                        data = bytes(buf)
                whole.update(data)
                chunks.append(sha(data))
            regions.append((addr, length, whole.hexdigest(), chunks))
        plants = []
        for addr, data in planted:
            got = g.pmemsave(addr, len(data))
            plants.append((addr, len(data), sha(got)))
        return cls(regions, plants)

    @classmethod
    def of_fixture(cls, name: str) -> "Memory":
        e = FX[name]
        regions = [(r["addr"], r["length"], r["sha256"], None) for r in e["ram_regions"]
                   if r["pages_in_stream"]]
        plants = [(p["addr"], p["length"], p["sha256"]) for p in e["planted"]
                  if p["pages_in_stream"]]
        return cls(regions, plants)

    def check(self, g: h.Guest, what: str) -> None:
        """Assert that guest ``g`` holds this memory."""
        for addr, length, want in self.planted:
            got = g.pmemsave(addr, length)
            assert sha(got) == want, f"{what}: planted range {addr:#x}+{length:#x} differs"
        for addr, length, want, chunks in self.regions:
            whole, first = hashlib.sha256(), None
            for i, off in enumerate(range(0, length, CHUNK)):
                data = g.pmemsave(addr + off, min(CHUNK, length - off))
                whole.update(data)
                if chunks is not None and first is None and sha(data) != chunks[i]:
                    first = addr + off
            where = "" if first is None else f"; first differing 64 MiB chunk at {first:#x}"
            assert whole.hexdigest() == want, \
                f"{what}: RAM {addr:#x}+{length:#x} differs from the source{where}"


@contextlib.contextmanager
def destination(path, *, machine="q35", memory=64 * MiB, backend="default",
                caps: Optional[Dict[str, bool]] = None, extra_args=(), dimms=(),
                error_map=None):
    """A destination QEMU that loaded ``path`` (``migrate-incoming file:``).

    ``error_map`` [(text in QEMU's stderr, exception class)] turns a known
    load failure into a dedicated exception (for strict ``raises=`` xfails).
    """
    with h.Guest(machine, memory, backend, incoming=True, extra_args=list(extra_args),
                 dimms=list(dimms)) as dst:
        dst.set_capabilities(caps or {})
        try:
            dst.load(str(path), timeout=180)
        except h.MigrationFailed as exc:
            for text, cls in error_map or ():
                if text in (exc.stderr or "") or text in str(exc):
                    raise cls(f"{text}: {exc}") from exc
            raise
        yield dst


def capture_postcopy(tmp: Path, memory: int, backend: str, seed: str):
    """A postcopy-advised stream, captured through the harness Relay between two
    QEMUs with ``backend`` main RAM and postcopy-ram on (as
    tests/data/make_fixtures.py does); returns (path, source Memory)."""
    plant = planted_ranges(memory, seed)
    path = tmp / f"postcopy-{backend}.mig"
    with h.Guest("q35", memory, backend, plant=plant) as src:
        mem = Memory.read(src, memory, plant)
        src.set_capabilities({"postcopy-ram": True})
        with h.Guest("q35", memory, backend, incoming=True) as dst:
            dst.set_capabilities({"postcopy-ram": True})
            dst.migrate_incoming(f"unix:{os.path.join(dst.tmpdir, 'in.sock')}")
            with h.Relay(dst.incoming_uri(), str(path), timeout=300) as relay:
                src.migrate(relay.uri)
                src.wait_migration(300)
                dst.wait_incoming(300)
                assert relay.wait(60) and not relay.errors, relay.errors
    return path, mem


def fix_postcopy_advise(src: Path, dst: Path, offset: int, summary: int) -> None:
    """Copy ``src`` with the host page-size summary of the POSTCOPY_ADVISE
    command at ``offset`` set to ``summary``."""
    data = bytearray(src.read_bytes())
    assert data[offset] == 0x08 and struct.unpack(">HH", data[offset + 1:offset + 5]) == (3, 16)
    data[offset + 5:offset + 13] = struct.pack(">Q", summary)
    dst.write_bytes(bytes(data))


# --------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["q35-plain", "pc-plain"])
def test_sequential_to_mapped_ram_loads(fx, tmp_path, name):
    out = tmp_path / "out.mr"
    rep = convert(fx(name), out, "--to", "mapped-ram")
    assert rep["format"] == "mapped-ram"
    assert info(out)["capabilities"] == ["mapped-ram"]
    with destination(out, machine=FX[name]["machine"], caps={"mapped-ram": True}) as dst:
        Memory.of_fixture(name).check(dst, f"{name} -> mapped-ram")


@pytest.mark.parametrize("name", ["q35-mapped-ram", "q35-mapped-ram-multifd"])
def test_mapped_ram_to_sequential_loads(fx, tmp_path, name):
    out = tmp_path / "out.mig"
    rep = convert(fx(name), out, "--to", "sequential")
    assert rep["format"] == "sequential" and rep["output_size"] < 1 * MiB
    assert info(out)["capabilities"] == []
    with destination(out, caps={"mapped-ram": False}) as dst:
        Memory.of_fixture(name).check(dst, f"{name} -> sequential")


# --------------------------------------------------------------------------
# zero pages
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name,mode", [("q35-plain", "full"), ("q35-zero-none", "records")])
def test_zero_pages_loads(fx, tmp_path, name, mode):
    out = tmp_path / "out.mig"
    rep = convert(fx(name), out, "--zero-pages", mode)
    assert rep["zero_pages"] == mode
    ram = {b["name"]: b["records"] for b in info(out)["ramblocks"]}["pc.ram"]
    if mode == "full":
        assert ram["zero"] == 0 and ram["page"] == 64 * MiB // PAGE
    else:
        assert ram["zero"] > 16000 and 0 < ram["page"] < 100
    with destination(out) as dst:
        Memory.of_fixture(name).check(dst, f"{name} --zero-pages {mode}")


# --------------------------------------------------------------------------
# --compact of a multi-iteration live stream
# --------------------------------------------------------------------------

# A 64 KiB firmware for -bios: at reset (F000:FFF0) jump to F000:0000, which is
#     cli
#   outer: mov bx, 0x0100
#   inner: mov es, bx
#          inc dword [es:0]        ; one counter per 4 KiB page, 0x1000..0x9F000
#          add bx, 0x100
#          cmp bx, 0xA000
#          jb inner
#          jmp outer
# so the running guest keeps re-dirtying 158 pages of low RAM.
DIRTY_LOOP = bytes.fromhex("fa bb0001 8ec3 2666ff060000 81c30001 81fb00a0 72ee ebe9")
RESET_JUMP = bytes.fromhex("ea 0000 00f0")      # jmp far F000:0000


def dirty_bios(path: Path) -> Path:
    rom = bytearray(64 * KiB)
    rom[:len(DIRTY_LOOP)] = DIRTY_LOOP
    rom[0xFFF0:0xFFF0 + len(RESET_JUMP)] = RESET_JUMP
    path.write_bytes(bytes(rom))
    return path


def test_compact_live_stream_loads(tmp_path):
    """A running guest migrated to file with max-bandwidth 2 MiB/s and a 50 ms
    downtime limit cannot converge while its loop re-dirties 632 KiB, so QEMU
    sends those pages pass after pass; after ~2.5 s the limits are raised and
    it completes. --compact keeps one copy of each page."""
    bios = dirty_bios(tmp_path / "dirty-bios.bin")
    live = tmp_path / "live.mig"
    plant = planted_ranges(64 * MiB, "compact")
    with h.Guest("q35", 64 * MiB, paused=False, plant=plant,
                 extra_args=["-bios", str(bios)]) as src:
        first = src.pmemsave(0x1000, 4)
        time.sleep(0.1)
        assert src.pmemsave(0x1000, 4) != first, "the guest loop is not running"
        src.set_parameters(max_bandwidth=2 * MiB, downtime_limit=50)
        src.migrate(f"file:{live}")
        time.sleep(2.5)
        src.set_parameters(max_bandwidth=h.FAST_BANDWIDTH, downtime_limit=300)
        done = src.wait_migration(120)
        assert src.status() == "postmigrate"
        src_mem = Memory.read(src, 64 * MiB, plant)
    syncs = done["ram"]["dirty-sync-count"]
    st = info(live)
    parts = sum(s["type"] == "PART" for s in st["sections"])
    ram = {b["name"]: b for b in st["ramblocks"]}["pc.ram"]
    sent = ram["records"]["page"] + ram["records"]["zero"]
    # really several iterations: pages went more than once
    assert syncs >= 3 and parts > 1 and sent > ram["size"] // PAGE + 200, (syncs, parts, sent)

    out = tmp_path / "compact.mig"
    rep = convert(live, out, "--compact")
    assert rep["output_size"] <= rep["input_size"] and rep["saved"] > 0
    assert rep["saved"] == rep["input_size"] - rep["output_size"]
    st = info(out)
    ram = {b["name"]: b for b in st["ramblocks"]}["pc.ram"]
    assert ram["records"]["page"] + ram["records"]["zero"] == ram["size"] // PAGE
    assert sum(s["type"] == "PART" for s in st["sections"]) == 1
    with destination(out, extra_args=["-bios", str(bios)]) as dst:
        src_mem.check(dst, "--compact live stream")
    # Pages sent pass after pass, decoded straight into a mapped-ram output's
    # page areas (the last copy of each page wins there too).
    mr = tmp_path / "live.mapped-ram"
    convert(live, mr, "--to", "mapped-ram")
    with destination(mr, caps={"mapped-ram": True}, extra_args=["-bios", str(bios)]) as dst:
        src_mem.check(dst, "live stream -> mapped-ram")


# --------------------------------------------------------------------------
# --host-page-size (postcopy-advised streams)
# --------------------------------------------------------------------------

def _host_page_case(stream: Path, expected: Memory, tmp: Path, size: str, size_bytes: int,
                    memory: int, dst_backend: str) -> None:
    src = info(stream)
    out = tmp / f"hps-{size}.mig"
    convert(stream, out, "--host-page-size", f"pc.ram={size}")
    caps = {"postcopy-ram": True}
    # 1. With POSTCOPY_ADVISE's host page-size summary set by hand to what the
    #    destination computes (QEMU's ram_pagesize_summary(): the OR of its
    #    blocks' page sizes), the conversion's MEM_SIZE rewrite is what QEMU
    #    wants: the stream loads and gives the source's memory.
    summary = 0
    for b in src["ramblocks"]:
        summary |= size_bytes if b["name"] == "pc.ram" else b["page_size"]
    advise = [c for c in src["commands"] if c["command"] == "POSTCOPY_ADVISE"][0]
    fixed = tmp / f"hps-{size}-advise-fixed.mig"
    fix_postcopy_advise(out, fixed, advise["offset"], summary)
    st = info(fixed)
    assert st["postcopy_advise"]["host_page_sizes"] == summary
    assert {b["name"]: b for b in st["ramblocks"]}["pc.ram"]["page_size"] == size_bytes
    with destination(fixed, memory=memory, backend=dst_backend, caps=caps) as dst:
        expected.check(dst, f"--host-page-size pc.ram={size} (advise fixed by hand)")
    # 2. The conversion as qemuram writes it.
    with destination(out, memory=memory, backend=dst_backend, caps=caps,
                     error_map=[("Postcopy needs matching RAM page sizes",
                                 PostcopyAdviseNotRewritten)]) as dst:
        expected.check(dst, f"--host-page-size pc.ram={size}")


def test_host_page_size_4k_to_2m_loads(tmp_path):
    h.require(h.hugepages_status("2M", 64 * MiB), "2 MiB hugepages for a 64 MiB destination")
    stream, mem = capture_postcopy(tmp_path, 64 * MiB, "default", "4k-to-2m")
    assert {b["name"]: b for b in info(stream)["ramblocks"]}["pc.ram"]["page_size"] == PAGE
    _host_page_case(stream, mem, tmp_path, "2M", 2 * MiB, 64 * MiB, "hugetlb2m")


def test_host_page_size_2m_to_4k_loads(fx, tmp_path):
    stream = fx("q35-postcopy-advised")
    assert {b["name"]: b for b in info(stream)["ramblocks"]}["pc.ram"]["page_size"] == 2 * MiB
    _host_page_case(stream, Memory.of_fixture("q35-postcopy-advised"), tmp_path, "4K", PAGE,
                    64 * MiB, "default")


def test_host_page_size_4k_to_1g_loads(tmp_path):
    stream, mem = capture_postcopy(tmp_path, GiB, "default", "4k-to-1g")
    with hugetlb1g_lock():
        h.require(h.hugepages_status("1G", GiB), "one free 1 GiB hugepage")
        _host_page_case(stream, mem, tmp_path, "1G", GiB, GiB, "hugetlb1g")


def test_host_page_size_1g_to_4k_loads(tmp_path):
    with hugetlb1g_lock():
        h.require(h.hugepages_status("1G", 2 * GiB), "two free 1 GiB hugepages")
        stream, mem = capture_postcopy(tmp_path, GiB, "hugetlb1g", "1g-to-4k")
    assert {b["name"]: b for b in info(stream)["ramblocks"]}["pc.ram"]["page_size"] == GiB
    _host_page_case(stream, mem, tmp_path, "4K", PAGE, GiB, "default")


# --------------------------------------------------------------------------
# --replace
# --------------------------------------------------------------------------

def test_replace_loads(tmp_path):
    plant = planted_ranges(64 * MiB, "replace")
    pattern = b"".join(hashlib.sha256(b"qemuram-replace-%d" % i).digest() for i in range(256))
    assert len(pattern) == 8 * KiB
    stream = tmp_path / "fresh.mig"
    with h.Guest("q35", 64 * MiB, plant=plant) as src:
        before = src.pmemsave(0x300000, len(pattern))
        expected = Memory.read(src, 64 * MiB, patch=(0x300000, pattern))
        src.save(str(stream))
    assert before != pattern
    (tmp_path / "pattern.bin").write_bytes(pattern)
    out = tmp_path / "replaced.mig"
    convert(stream, out, "--replace", f"pc.ram={tmp_path / 'pattern.bin'}@0x300000")
    with destination(out) as dst:
        got = dst.pmemsave(0x300000, len(pattern))
        assert got == pattern, h.describe_difference(got, pattern, base=0x300000)
        expected.check(dst, "--replace pc.ram@0x300000")
        # the other planted ranges are untouched
        for addr, data in plant:
            if not (0x300000 <= addr < 0x300000 + len(pattern)):
                assert dst.pmemsave(addr, len(data)) == data, hex(addr)


# --------------------------------------------------------------------------
# exec: pipelines
# --------------------------------------------------------------------------

def test_exec_source_into_qemuram_mapped_ram(tmp_path):
    plant = planted_ranges(64 * MiB, "exec-source")
    out, err = tmp_path / "out.mr", tmp_path / "convert.err"
    with h.Guest("q35", 64 * MiB, plant=plant) as src:
        mem = Memory.read(src, 64 * MiB, plant)
        src.migrate(f"exec:{cli_shell()} convert - {shlex.quote(str(out))} --to mapped-ram "
                    f"2>{shlex.quote(str(err))}")
        src.wait_migration(120)
    # the converter renames its output into place when it is complete
    deadline = time.monotonic() + 120
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert out.exists(), f"no {out}; converter stderr: {err.read_text() if err.exists() else ''}"
    assert info(out)["format"] == "mapped-ram"
    with destination(out, caps={"mapped-ram": True}) as dst:
        mem.check(dst, "exec: source -> qemuram convert -> mapped-ram")


def test_exec_destination_from_mapped_ram(fx):
    src = fx("q35-mapped-ram")
    with h.Guest("q35", 64 * MiB, incoming=True) as dst:
        dst.migrate_incoming(f"exec:{cli_shell()} convert {shlex.quote(str(src))} - "
                             "--to sequential")
        dst.wait_incoming(120)
        Memory.of_fixture("q35-mapped-ram").check(dst, "exec: qemuram convert -> destination")


# --------------------------------------------------------------------------
# containers
# --------------------------------------------------------------------------

def container_pattern() -> bytes:
    out = bytearray()
    i = 0
    while len(out) < MANIFEST["pattern"]["length"]:
        out += hashlib.sha256(b"qemuram-container-pattern-%d" % i).digest()
        i += 1
    return bytes(out[:MANIFEST["pattern"]["length"]])


def _container_source_memory(extra_args=()) -> Memory:
    """The container fixtures' source: a paused q35 64 MiB guest whose only RAM
    content is the pattern planted at 0x100000 (make_container_fixtures.py)."""
    plant = [(MANIFEST["pattern"]["addr"], container_pattern())]
    with h.Guest("pc-q35-10.0", 64 * MiB, plant=plant, extra_args=list(extra_args)) as g:
        return Memory.read(g, 64 * MiB, plant)


def test_libvirt_save_image_converted_loads(tmp_path):
    e = MANIFEST["libvirt"]["images"]["xz"]
    image = CONT / e["file"]
    st = info(image)
    # The domain had only the devices a -nodefaults q35 has: check before relying on it.
    dom = ET.fromstring(st["container"]["xml"])
    assert dom.find("os/type").get("machine") == st["machine"] == "pc-q35-10.0"
    assert dom.find("memory").text == str(64 * 1024) and dom.find("vcpu").text == "1"
    devices = sorted((d.tag, d.get("type") or "", d.get("model") or d.get("bus") or "")
                     for d in dom.find("devices") if d.tag != "emulator")
    assert devices == [("controller", "pci", "pcie-root"), ("controller", "sata", ""),
                       ("controller", "usb", "none"), ("input", "mouse", "ps2"),
                       ("memballoon", "", "none")], devices
    out = tmp_path / "libvirt.mig"
    convert(image, out)
    assert sha(out.read_bytes()) == e["stream_sha256"]      # the embedded QEMU stream
    # libvirt's command line: main RAM from memory-backend-ram "pc.ram", CPU
    # qemu64 with the features of the save cookie
    cpu = ["-cpu", "qemu64,pni=off,svm=off,x2apic=on,hypervisor=on,lahf_lm=on"]
    mem = _container_source_memory(cpu)
    with destination(out, machine="pc-q35-10.0", backend="ram", extra_args=cpu) as dst:
        mem.check(dst, "libvirt save image -> convert")


def test_qcow2_snapshot_converted_loads(tmp_path):
    image = gunzip_sparse(CONT / MANIFEST["qcow2"]["snap-v3"]["file"], tmp_path / "snap.qcow2")
    snap = [s for s in MANIFEST["qcow2"]["snap-v3"]["snapshots"] if s["name"] == "snap1"][0]
    out = tmp_path / "snap1.mr"
    convert(image, out, "--snapshot", "snap1", "--to", "mapped-ram")
    seq = tmp_path / "snap1.mig"
    convert(out, seq, "--to", "sequential")
    assert sha(seq.read_bytes()) == snap["vmstate_sha256"]   # as qemu-io read it
    # the savevm guest had the image on virtio-blk: the destination needs it too
    disk = tmp_path / "disk.qcow2"
    shutil.copyfile(image, disk)
    drive = ["-drive", f"file={disk},if=none,id=d0,format=qcow2",
             "-device", "virtio-blk-pci,drive=d0"]
    mem = _container_source_memory()
    with destination(out, machine="pc-q35-10.0", extra_args=drive,
                     caps={"mapped-ram": True}) as dst:
        mem.check(dst, "qcow2 snapshot -> convert --to mapped-ram")


# --------------------------------------------------------------------------
# x-ignore-shared through mapped-ram
# --------------------------------------------------------------------------

def test_ignore_shared_refuses_mapped_ram(fx, tmp_path):
    e = FX["q35-ignore-shared"]
    dimms = [h.Dimm(d["size"], d["backend"], share=d["share"], addr=d["addr"], id=d["id"])
             for d in e["dimms"]]
    caps = {"x-ignore-shared": True}
    expected = Memory.of_fixture("q35-ignore-shared")
    with destination(fx("q35-ignore-shared"), caps=caps, dimms=dimms) as dst:
        expected.check(dst, "q35-ignore-shared as QEMU wrote it")          # the set-up is right
    # qemuram refuses to write this stream as mapped-ram (a mapped-ram file
    # cannot record the skipped block), with a usage error and no output.
    mr = tmp_path / "a.mr"
    r = subprocess.run([sys.executable, "-m", "qemuram.cli", "convert", str(fx("q35-ignore-shared")),
                        str(mr), "--to", "mapped-ram"], capture_output=True, text=True)
    assert r.returncode == 2 and "x-ignore-shared" in r.stderr, r.stderr
    assert not mr.exists()
