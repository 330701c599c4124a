#!/usr/bin/env python3
"""Make the small real QEMU migration streams kept in tests/data/.

    python tests/data/make_fixtures.py               # all fixtures
    python tests/data/make_fixtures.py --only q35-plain --only pc-plain
    python tests/data/make_fixtures.py --list

Each fixture is a paused guest (QEMU -S: its CPUs never run) with deterministic
data planted in guest RAM through ``-device loader``, saved with QEMU's own
migration code through the harness in tests/integration/harness.py. The
stream is written gzip-compressed (level 9, mtime 0) as ``NAME.mig.gz`` and
described in ``fixtures.json``:

  * how it was made: machine, RAM size and backend, DIMMs, migration
    capabilities and parameters, transport, accelerator, QEMU version;
  * the stream's size and sha256 (uncompressed) and the .gz size;
  * ``planted``: every planted range (guest-physical address, length, sha256
    of the bytes planted) with the sha256 of QMP ``pmemsave`` of that range on
    the source (the script stops if it differs from what was planted), and
    whether the stream carries those pages (checked by loading the stream into
    a destination QEMU and reading the range back);
  * ``ram_regions``: sha256 of pmemsave over whole guest-physical ranges that
    are plain RAM (below 0xA0000, 0x100000 to the end of main RAM, each DIMM),
    with the RAM block and block offset they correspond to;
  * ``ramblocks``: QEMU's RAM block list (``info ramblock``) on the source.

Entries of fixtures.json that this script does not make are left untouched.
Re-running replaces the streams (QEMU's iteration slicing is timing dependent,
so the bytes may change; the planted data and RAM contents do not).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration import harness as h  # noqa: E402

MiB = 1 << 20
RAM = 64 * MiB
PAGE = 4096
SAMPLE = ROOT / "qemuram" / "samples" / "q35-64m.mig.gz"
SAMPLE_README = ROOT / "qemuram" / "samples" / "README"
INDEX = HERE / "fixtures.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# Fixture definitions
# --------------------------------------------------------------------------

FIXTURES = {
    "q35-plain": dict(
        description="q35, 64 MiB default (anonymous) RAM, plain precopy to file:",
        machine="q35"),
    "pc-plain": dict(
        description="pc (i440fx), 64 MiB default RAM, plain precopy to file:",
        machine="pc"),
    "q35-mapped-ram": dict(
        description="q35, capability mapped-ram, file: URI (sparse file, "
                    "1 MiB-aligned page area)",
        machine="q35", capabilities={"mapped-ram": True}),
    "q35-mapped-ram-multifd": dict(
        description="q35, capabilities mapped-ram + multifd, multifd-channels 2, "
                    "file: URI",
        machine="q35", capabilities={"mapped-ram": True, "multifd": True},
        parameters={"multifd-channels": 2}),
    "q35-zero-none": dict(
        description="q35, parameter zero-page-detection=none (zero pages sent "
                    "as full PAGE records)",
        machine="q35", parameters={"zero-page-detection": "none"}),
    "q35-ignore-shared": dict(
        description="q35, capability x-ignore-shared; main RAM default backend plus "
                    "two 32 MiB DIMMs: dimm0 memory-backend-file share=on on tmpfs "
                    "(its pages are not sent), dimm1 memory-backend-memfd share=on "
                    "(still sent)",
        machine="q35", capabilities={"x-ignore-shared": True},
        dimms=[dict(id="dimm0", size=32 * MiB, backend="file", share=True),
               dict(id="dimm1", size=32 * MiB, backend="memfd", share=True)]),
    "q35-postcopy-advised": dict(
        description="q35, capability postcopy-ram on source and destination, "
                    "64 MiB main RAM on 2 MiB hugetlbfs; captured through a "
                    "recording relay between two QEMUs; completed as plain precopy "
                    "(postcopy advised, never started)",
        machine="q35", backend="hugetlb2m", capabilities={"postcopy-ram": True},
        transport="relay"),
}


#: Fixtures whose random block is 64 KiB; the others plant 16 KiB to keep
#: tests/data small (random bytes do not compress).
BIG_RANDOM = ("q35-plain", "pc-plain")


def planted_ranges(name: str, machine: str, ram_size: int):
    """Deterministic (seeded by the fixture name) planted data in main RAM."""
    rng = random.Random(f"qemuram-fixture:{name}")
    random_len = (64 if name in BIG_RANDOM else 16) * 1024
    top = b"".join(struct.pack(">Q", 0x70CE_0000_0000_0000 | i) for i in range(PAGE // 8))
    ranges = [
        ("random-block", 0x100000, rng.randbytes(random_len)),
        ("aa-page", 0x200000, b"\xaa" * PAGE),
        ("partly-zero-page", 0x300000,
         bytes(1536) + rng.randbytes(1024) + bytes(1024) + b"\x5a" * 504 + bytes(8)),
        ("top-of-ram", ram_size - PAGE, top),
    ]
    if machine == "pc":
        ranges.append(("pc-low-9f000", 0x9F000, bytes(range(256)) * (PAGE // 256)))
    return ranges


def dimm_ranges(name: str, dimm_id: str, addr: int, size: int):
    rng = random.Random(f"qemuram-fixture:{name}:{dimm_id}")
    return [
        (f"{dimm_id}-start", addr, rng.randbytes(8 * 1024)),
        (f"{dimm_id}-end", addr + size - PAGE,
         (dimm_id.encode() + b"-end-") * (PAGE // (len(dimm_id) + 5)) +
         bytes(PAGE % (len(dimm_id) + 5))),
    ]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

_RAMBLOCK_RE = re.compile(
    r"^\s*(\S+)\s+(\d+) (KiB|MiB|GiB)\s+(0x[0-9a-fA-F]+)\s+(0x[0-9a-fA-F]+)\s+(0x[0-9a-fA-F]+)")


def ramblocks(guest: h.Guest):
    text = guest.qmp("human-monitor-command", **{"command-line": "info ramblock"})
    blocks = []
    for line in text.splitlines():
        m = _RAMBLOCK_RE.match(line)
        if m:
            unit = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(3)]
            blocks.append({"name": m.group(1), "page_size": int(m.group(2)) * unit,
                           "used_length": int(m.group(5), 16)})
    return blocks


def machine_type(stream: bytes) -> str:
    if stream[8:9] != b"\x07":
        return ""
    (n,) = struct.unpack(">I", stream[9:13])
    return stream[13:13 + n].decode("ascii", "replace")


def write_gz(path: Path, data: bytes) -> int:
    blob = gzip.compress(data, compresslevel=9, mtime=0)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return len(blob)


def make_guest(spec: dict, accel: str, dimm_addrs=None, plant=(), incoming=False):
    dimms = []
    for d in spec.get("dimms", []):
        addr = dimm_addrs.get(d["id"]) if dimm_addrs else None
        dimms.append(h.Dimm(d["size"], d["backend"], share=d.get("share"),
                            addr=addr, id=d["id"]))
    return h.Guest(spec["machine"], spec.get("memory", RAM), spec.get("backend", "default"),
                   dimms=dimms, paused=True, incoming=incoming,
                   plant=[(a, d) for _, a, d in plant], accel=accel)


def configure(guest: h.Guest, spec: dict) -> None:
    guest.set_capabilities(spec.get("capabilities", {}))
    guest.set_parameters(spec.get("parameters", {}))


# --------------------------------------------------------------------------
# Making one fixture
# --------------------------------------------------------------------------

def make(name: str, accel: str, workdir: Path) -> dict:
    spec = dict(FIXTURES[name])
    notes = []
    ram_size = spec.get("memory", RAM)
    if spec.get("backend", "default") in ("hugetlb2m", "hugetlb1g"):
        ok, why = h.backend_status(spec["backend"], 2 * ram_size)  # source + destination
        if not ok:
            notes.append(f"{spec['backend']} backing unavailable ({why}); made with the "
                         "default backend instead, so no per-block page-size field")
            spec["backend"] = "default"

    plant = planted_ranges(name, spec["machine"], ram_size)
    dimm_addrs = {}
    if spec.get("dimms"):
        # DIMM addresses are deterministic for a machine and DIMM list: ask QEMU.
        with make_guest(spec, accel) as probe:
            dimm_addrs = {d["id"]: int(d["addr"]) for d in probe.memory_devices()}
        for d in spec["dimms"]:
            plant += dimm_ranges(name, d["id"], dimm_addrs[d["id"]], d["size"])

    stream_path = workdir / f"{name}.mig"
    with make_guest(spec, accel, dimm_addrs, plant) as src:
        if dimm_addrs:
            got = {d["id"]: int(d["addr"]) for d in src.memory_devices()}
            if got != dimm_addrs:
                raise SystemExit(f"{name}: DIMM addresses moved: {dimm_addrs} -> {got}")
        version = src.qmp("query-version")
        planted = []
        for pname, addr, data in plant:
            back = src.pmemsave(addr, len(data))
            if back != data:
                raise SystemExit(f"{name}: pmemsave of {pname} differs from what was "
                                 "planted: " + h.describe_difference(back, data, base=addr))
            planted.append({"name": pname, "addr": addr, "length": len(data),
                            "sha256": sha256(data), "pmemsave_sha256": sha256(back)})
        regions = [{"addr": 0, "length": 0xA0000, "block": "pc.ram", "block_offset": 0},
                   {"addr": 0x100000, "length": ram_size - 0x100000, "block": "pc.ram",
                    "block_offset": 0x100000}]
        for d in spec.get("dimms", []):
            regions.append({"addr": dimm_addrs[d["id"]], "length": d["size"],
                            "block": f"{d['id']}-mem", "block_offset": 0})
        src_regions = {}
        for r in regions:
            src_regions[r["addr"]] = src.pmemsave(r["addr"], r["length"])
            r["sha256"] = sha256(src_regions[r["addr"]])
        blocks = ramblocks(src)
        configure(src, spec)

        if spec.get("transport") == "relay":
            with make_guest(spec, accel, dimm_addrs, incoming=True) as dst:
                configure(dst, spec)
                dst.migrate_incoming(f"unix:{os.path.join(dst.tmpdir, 'incoming.sock')}")
                with h.Relay(dst.incoming_uri(), str(stream_path), timeout=300) as relay:
                    src.migrate(relay.uri)
                    src.wait_migration(300)
                    dst.wait_incoming(300)
                    if not relay.wait(60) or relay.errors:
                        raise SystemExit(f"{name}: relay problem: {relay.errors}")
                    returned = relay.returned
                    post = src.query_migrate()
                verify(name, dst, planted, regions, src_regions, spec, notes)
            notes.append(f"captured through harness.Relay over unix sockets; "
                         f"{returned} bytes went back on the return path")
            if post.get("status") != "completed":
                raise SystemExit(f"{name}: unexpected final status {post}")
        else:
            src.save(str(stream_path), timeout=300)
            with make_guest(spec, accel, dimm_addrs, incoming=True) as dst:
                configure(dst, spec)
                dst.load(str(stream_path), timeout=300)
                verify(name, dst, planted, regions, src_regions, spec, notes)
        accel_used = src.accel

    stream = stream_path.read_bytes()
    if spec.get("capabilities", {}).get("postcopy-ram"):
        # With postcopy-ram the MEM_SIZE list gives a page size for blocks whose
        # page size is not the host's: check that it is really there.
        for b in blocks:
            if b["page_size"] == PAGE:
                continue
            name_b = b["name"].encode()
            entry_bytes = (bytes([len(name_b)]) + name_b
                           + struct.pack(">QQ", b["used_length"], b["page_size"]))
            if entry_bytes not in stream[:4096]:
                raise SystemExit(f"{name}: no page-size field for {b['name']} in MEM_SIZE")
            notes.append(f"MEM_SIZE entry of {b['name']} carries page size "
                         f"{b['page_size']:#x}")
    gz_name = f"{name}.mig.gz"
    gz_size = write_gz(HERE / gz_name, stream)
    entry = {
        "file": gz_name,
        "description": spec["description"],
        "machine": spec["machine"],
        "machine_type": machine_type(stream),
        "memory_size": ram_size,
        "backend": spec.get("backend", "default"),
        "dimms": [dict(d, addr=dimm_addrs[d["id"]], block=f"{d['id']}-mem")
                  for d in spec.get("dimms", [])],
        "capabilities": spec.get("capabilities", {}),
        "parameters": spec.get("parameters", {}),
        "harness_parameters": {"max-bandwidth": h.FAST_BANDWIDTH},
        "transport": ("unix socket via recording relay (source-to-destination bytes)"
                      if spec.get("transport") == "relay" else "file:"),
        "paused": True,
        "accel": accel_used,
        "qemu_version": "{major}.{minor}.{micro}".format(**version["qemu"]),
        "stream_size": len(stream),
        "stream_sha256": sha256(stream),
        "gz_size": gz_size,
        "target_page_size": PAGE,
        "ramblocks": blocks,
        "planted": planted,
        "ram_regions": regions,
        "notes": notes,
    }
    if spec.get("capabilities", {}).get("mapped-ram"):
        entry["notes"].append("mapped-ram file: sparse on disk, holes read as zeros; "
                              f"apparent size {len(stream)} bytes")
    return entry


def verify(name, dst, planted, regions, src_regions, spec, notes) -> None:
    """Load check: which planted ranges and regions came through the stream."""
    ignore_shared = spec.get("capabilities", {}).get("x-ignore-shared", False)
    skipped_blocks = {f"{d['id']}-mem" for d in spec.get("dimms", [])
                      if ignore_shared and d["backend"] == "file" and d.get("share")}
    for r in regions:
        got = dst.pmemsave(r["addr"], r["length"])
        same = got == src_regions[r["addr"]]
        r["pages_in_stream"] = same
        expect = r["block"] not in skipped_blocks
        if same != expect:
            raise SystemExit(f"{name}: region {r['addr']:#x}+{r['length']:#x} ({r['block']}) "
                             f"{'arrived' if same else 'did not arrive'} at the destination, "
                             "expected the opposite: "
                             + h.describe_difference(got, src_regions[r["addr"]], base=r["addr"]))
    by_block = [(r["addr"], r["addr"] + r["length"], r) for r in regions]
    for p in planted:
        got = dst.pmemsave(p["addr"], p["length"])
        inside = [r for lo, hi, r in by_block if lo <= p["addr"] < hi]
        p["block"] = inside[0]["block"] if inside else "pc.ram"
        p["block_offset"] = (p["addr"] - inside[0]["addr"] + inside[0]["block_offset"]
                             if inside else p["addr"])
        p["pages_in_stream"] = sha256(got) == p["sha256"]
        if p["block"] not in skipped_blocks and not p["pages_in_stream"]:
            raise SystemExit(f"{name}: planted {p['name']} did not arrive at the destination")
        if p["block"] in skipped_blocks and p["pages_in_stream"]:
            raise SystemExit(f"{name}: planted {p['name']} arrived although its block "
                             "should be skipped")
    if skipped_blocks:
        notes.append("blocks listed in the stream without pages (x-ignore-shared): "
                     + ", ".join(sorted(skipped_blocks))
                     + "; the destination check read zeros there")
    notes.append("loaded into a destination QEMU with the same capabilities: "
                  "planted ranges and RAM regions verified with pmemsave")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

SAMPLE_README_TEXT = """\
q35-64m.mig.gz is a real QEMU migration stream, gzip-compressed: a paused q35
guest with 64 MiB of RAM (default backend, no migration capabilities) saved with
`migrate file:` by QEMU {qemu_version} ({accel}), with deterministic data planted in
guest RAM at 0x100000 (64 KiB random), 0x200000 (a page of 0xAA), 0x300000 (a
partly zero page) and 0x3FFF000 (top of RAM). It is the fixture "q35-plain"
made by tests/data/make_fixtures.py in the qemuram repository, whose
tests/data/fixtures.json lists the sha256 of every planted range. The uncompressed stream is
{size} bytes with sha256 {sha}.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="make only this fixture (repeatable)")
    ap.add_argument("--list", action="store_true", help="list fixture names")
    ap.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    ap.add_argument("--no-sample", action="store_true",
                    help="do not refresh qemuram/samples/q35-64m.mig.gz")
    args = ap.parse_args(argv)
    if args.list:
        for name, spec in FIXTURES.items():
            print(f"{name:24} {spec['description']}")
        return 0
    names = args.only or list(FIXTURES)
    unknown = [n for n in names if n not in FIXTURES]
    if unknown:
        ap.error(f"unknown fixture(s) {unknown}; known: {list(FIXTURES)}")
    ok, why = h.qemu_available((10, 0))
    if not ok:
        print(f"make_fixtures: {why}", file=sys.stderr)
        return 2

    index = {}
    if INDEX.exists():
        index = json.loads(INDEX.read_text())
    index.setdefault("fixtures", {})
    workdir = Path(tempfile.mkdtemp(prefix="qemuram-fixtures-"))
    try:
        for name in names:
            entry = make(name, args.accel, workdir)
            index["fixtures"][name] = entry
            print(f"{name:24} stream {entry['stream_size']:>9} B  gz {entry['gz_size']:>7} B"
                  f"  ({entry['accel']}, {entry['machine_type']})")
            (workdir / f"{name}.mig").unlink()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    versions = sorted({e.get("qemu_version") for e in index["fixtures"].values()
                       if e.get("qemu_version")})
    index.update({
        "generator": "tests/data/make_fixtures.py",
        "qemu_version": versions[-1] if len(versions) == 1 else versions,
        "qemu_binary": h.qemu_available()[1],
        "compression": "gzip level 9, mtime 0",
    })
    index["fixtures"] = dict(sorted(index["fixtures"].items()))
    ordered = {k: index[k] for k in ("generator", "qemu_version", "qemu_binary", "compression")}
    ordered.update({k: v for k, v in index.items() if k not in ordered})
    INDEX.write_text(json.dumps(ordered, indent=1) + "\n")

    if "q35-plain" in names and not args.no_sample:
        SAMPLE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HERE / "q35-plain.mig.gz", SAMPLE)
        e = index["fixtures"]["q35-plain"]
        SAMPLE_README.write_text(SAMPLE_README_TEXT.format(
            qemu_version=e["qemu_version"], size=e["stream_size"], sha=e["stream_sha256"],
            accel="KVM" if e["accel"] == "kvm" else "TCG"))
        print(f"sample: {SAMPLE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
