"""The ``qemuram`` command line, against the real QEMU 10 fixtures (no QEMU needed).

Most cases run the CLI in-process (``qemuram.cli.main([...])`` with capsys);
the ones about real exit codes, pipes and stdin/stdout run
``python -m qemuram.cli`` as a subprocess.

Ground truth comes from the fixture indexes, never from qemuram itself:
tests/data/fixtures.json (sha256 of QMP ``pmemsave`` on the source of every
planted range and RAM region, the source's RAM block list, the stream's sha256)
and tests/data/containers/manifest.json (sha256 of the streams embedded in the
libvirt save images as decompressed by the real tools, of the qcow2 snapshots'
VM state as read by ``qemu-io``, and of the planted pattern).

Exit codes under test (qemuram/cli.py): 0 ok, 1 invalid stream / verify or
diff found a difference, 2 usage error.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qemuram import cli

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
CONT = DATA / "containers"
FX = json.loads((DATA / "fixtures.json").read_text())["fixtures"]
MANIFEST = json.loads((CONT / "manifest.json").read_text())
LV = MANIFEST["libvirt"]["images"]
QC = MANIFEST["qcow2"]

ALL = sorted(FX)
MAPPED = [n for n in ALL if FX[n]["capabilities"].get("mapped-ram")]
SEQUENTIAL = [n for n in ALL if n not in MAPPED]
PAGE = 4096
#: Capabilities QEMU 10 records in the stream's configuration (the others,
#: e.g. multifd and postcopy-ram, are not validated and so not written).
STREAM_CAPS = {"mapped-ram", "x-ignore-shared"}
LIBVIRT_OK = sorted(k for k in LV if k != "lzop")


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


def sha_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _gunzip_sparse(src: Path, dst: Path) -> None:
    """Decompress ``src`` to ``dst`` leaving all-zero MiB as holes (the
    mapped-ram fixtures are 70 MiB of mostly nothing)."""
    zero = bytes(1 << 20)
    with gzip.open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            chunk = fi.read(1 << 20)
            if not chunk:
                break
            if chunk == zero[:len(chunk)]:
                fo.seek(len(chunk), os.SEEK_CUR)
            else:
                fo.write(chunk)
        fo.truncate(fo.tell())


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    """``fx(name) -> Path``: the decompressed fixture stream (sha256 checked)."""
    root = tmp_path_factory.mktemp("cli-fixtures")
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            p = root / f"{name}.mig"
            _gunzip_sparse(DATA / FX[name]["file"], p)
            assert p.stat().st_size == FX[name]["stream_size"]
            assert sha_file(p) == FX[name]["stream_sha256"], name
            made[name] = p
        return made[name]

    return get


@pytest.fixture(scope="session")
def qcow2(tmp_path_factory):
    """``qcow2(name) -> Path`` of the decompressed qcow2 image."""
    root = tmp_path_factory.mktemp("cli-qcow2")
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            p = root / f"{name}.qcow2"
            _gunzip_sparse(CONT / QC[name]["file"], p)
            assert sha_file(p) == QC[name]["image_sha256"]
            made[name] = p
        return made[name]

    return get


def run(capsys, *argv):
    """(exit code, stdout, stderr) of the CLI run in-process."""
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_json(capsys, *argv, rc=0):
    code, out, err = run(capsys, *argv, "--json")
    assert code == rc, f"exit {code} (wanted {rc}); stderr: {err}"
    return json.loads(out)


def sub(*argv, input=None, check_rc=None):
    """The CLI as a real process: ``python -m qemuram.cli ARGV``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "qemuram.cli", *map(str, argv)], input=input,
                       capture_output=True, env=env, cwd=str(ROOT), timeout=300)
    if check_rc is not None:
        assert r.returncode == check_rc, (r.returncode, r.stderr.decode(errors="replace")[-2000:])
    return r


def pattern() -> bytes:
    """The container fixtures' planted 16 KiB (manifest recipe)."""
    out = bytearray()
    i = 0
    while len(out) < MANIFEST["pattern"]["length"]:
        out += hashlib.sha256(b"qemuram-container-pattern-%d" % i).digest()
        i += 1
    data = bytes(out[:MANIFEST["pattern"]["length"]])
    assert sha(data) == MANIFEST["pattern"]["sha256"]
    return data


def pattern8k() -> bytes:
    return b"".join(hashlib.sha256(b"qemuram-cli-replace-%d" % i).digest() for i in range(256))


def records(info: dict) -> dict:
    return {b["name"]: b["records"] for b in info["ramblocks"]}


def truncate_copy(src: Path, dst: Path, length: int) -> Path:
    with open(src, "rb") as f:
        data = f.read(length)
    dst.write_bytes(data)
    return dst


def patch_copy(src: Path, dst: Path, offset: int, value: bytes) -> Path:
    data = bytearray(src.read_bytes())
    data[offset:offset + len(value)] = value
    dst.write_bytes(bytes(data))
    return dst


# ----------------------------------------------------------------------- info

@pytest.mark.parametrize("name", ALL)
def test_info_json_describes_fixture(capsys, fx, name):
    e = FX[name]
    info = run_json(capsys, "info", fx(name), "--hash")
    for key in ("machine", "page_size", "format", "capabilities", "ramblocks", "sections",
                "commands"):
        assert key in info, key
    assert info["machine"] == e["machine_type"]
    assert info["page_size"] == e["target_page_size"] == PAGE
    assert info["format"] == ("mapped-ram" if name in MAPPED else "sequential")
    want_caps = {c for c, on in e["capabilities"].items() if on} & STREAM_CAPS
    assert set(info["capabilities"]) == want_caps
    assert info["stream_size"] == e["stream_size"]
    # the RAM block list is QEMU's own (``info ramblock`` on the source)
    got = [(b["name"], b["size"]) for b in info["ramblocks"]]
    assert got == [(b["name"], b["used_length"]) for b in e["ramblocks"]]
    advised = bool(e["capabilities"].get("postcopy-ram"))
    for b, want in zip(info["ramblocks"], e["ramblocks"]):
        # page sizes are only in the stream when postcopy was advised
        assert b["page_size"] == (want["page_size"] if advised else PAGE), b["name"]
        assert len(b["sha256"]) == 64 and int(b["sha256"], 16) >= 0
        r = b["records"]
        if name in MAPPED:
            # mapped-ram: a bitmap of the non-zero pages, no ZERO/PAGE records
            assert r["zero"] == r["page"] == 0 and r["mapped"] <= b["size"] // PAGE
            assert b["pages_sent"] == b["size"] // PAGE
        elif b["pages_sent"]:
            # one pass of a paused guest: every page exactly once
            assert r["zero"] + r["page"] == b["pages_sent"] == b["size"] // PAGE
    # sections: ram START/PART/END then devices in FULL sections
    types = [s["type"] for s in info["sections"]]
    assert types[0] == "START" and info["sections"][0]["idstr"] == "ram"
    assert "END" in types and types.count("FULL") >= 20
    assert all(s["offset"] < e["stream_size"] for s in info["sections"])
    cmds = [c["command"] for c in info["commands"]]
    assert "SWITCHOVER_START" in cmds
    if advised:
        assert cmds[:3] == ["OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE"]
        assert info["postcopy_advise"]["target_page_size"] == PAGE
    else:
        assert "POSTCOPY_ADVISE" not in cmds and info["postcopy_advise"] is None


def test_info_json_ignore_shared_block_not_sent(capsys, fx):
    info = run_json(capsys, "info", fx("q35-ignore-shared"))
    by = {b["name"]: b for b in info["ramblocks"]}
    assert by["dimm0-mem"]["pages_sent"] == 0          # shared file DIMM: skipped
    assert by["dimm1-mem"]["pages_sent"] == by["dimm1-mem"]["size"] // PAGE
    # x-ignore-shared adds each block's offset in its memory region container:
    # the DIMMs sit in the device-memory region, which starts at dimm0
    dimms = {d["block"]: d["addr"] for d in FX["q35-ignore-shared"]["dimms"]}
    for blk, gpa in dimms.items():
        assert by[blk]["addr"] == gpa - dimms["dimm0-mem"], blk
    assert by["pc.ram"]["addr"] == 0


@pytest.mark.parametrize("name", ["q35-plain", "q35-mapped-ram", "q35-postcopy-advised"])
def test_info_text(capsys, fx, name):
    rc, out, err = run(capsys, "info", fx(name), "--hash")
    assert rc == 0, err
    fmt = "mapped-ram" if name in MAPPED else "sequential"
    assert f"format:        {fmt}" in out
    assert FX[name]["machine_type"] in out
    assert "page size:     4096" in out
    for b in FX[name]["ramblocks"]:
        assert b["name"] in out
    assert "sha256" in out and "SWITCHOVER_START" in out


def test_info_hash_matches_extracted_files(capsys, fx, tmp_path):
    info = run_json(capsys, "info", fx("pc-plain"), "--hash")
    man = run_json(capsys, "extract", fx("pc-plain"), "-o", tmp_path / "x", "--hash")
    for b, m in zip(info["ramblocks"], man["ramblocks"]):
        assert b["sha256"] == m["sha256"] == sha_file(tmp_path / "x" / m["file"]), b["name"]


# --------------------------------------------------------------------- verify

@pytest.mark.parametrize("name", ALL)
def test_verify_fixture(capsys, fx, name):
    res = run_json(capsys, "verify", fx(name))
    assert res["valid"] is True and res["roundtrip"] is True
    assert "error" not in res
    assert res["stream_size"] == FX[name]["stream_size"]
    assert res["machine"] == FX[name]["machine_type"]
    assert res["ramblocks"] == len(FX[name]["ramblocks"])
    rc, out, err = run(capsys, "verify", fx(name))
    assert rc == 0 and "re-encodes to identical bytes" in out


def _damaged(fx, capsys, tmp_path, kind):
    """(path, expected error type, expected offset) of a damaged q35-plain copy."""
    src = fx("q35-plain")
    info = run_json(capsys, "info", src)
    full = [s for s in info["sections"] if s["type"] == "FULL"]
    part = [s for s in info["sections"] if s["type"] == "PART"][0]
    p = tmp_path / f"{kind}.mig"
    if kind == "truncated-in-ram":
        return truncate_copy(src, p, 200000), "TruncatedStream", 200000
    if kind == "truncated-after-header":
        return truncate_copy(src, p, 24), "TruncatedStream", 24
    if kind == "empty":
        return truncate_copy(src, p, 0), "BadMagic", 0
    if kind == "bad-magic":
        return patch_copy(src, p, 0, b"QEVX"), "BadMagic", 0
    if kind == "bad-section-type":
        off = full[3]["offset"]
        return patch_copy(src, p, off, b"\x55"), "UnknownSection", off
    if kind == "bad-ram-flags":
        # first ram record after the PART header (type byte + be32 section id)
        off = part["offset"] + 5
        return patch_copy(src, p, off + 7, b"\xff"), "UnknownFlags", off
    raise AssertionError(kind)


DAMAGE = ["truncated-in-ram", "truncated-after-header", "empty", "bad-magic",
          "bad-section-type", "bad-ram-flags"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_verify_damaged_copy(capsys, fx, tmp_path, kind):
    path, etype, off = _damaged(fx, capsys, tmp_path, kind)
    res = run_json(capsys, "verify", path, rc=1)
    assert res["valid"] is False and res["roundtrip"] is False
    assert res["error"]["type"] == etype
    assert res["error"]["offset"] == off
    assert res["error"]["message"]
    rc, out, err = run(capsys, "verify", path)
    assert rc == 1 and "INVALID" in err and etype in err
    # info says the same, as JSON on stdout
    res = run_json(capsys, "info", path, rc=1)
    assert res["valid"] is False and res["error"]["type"] == etype


@pytest.mark.parametrize("kind", ["truncated-in-vmdesc", "trailing-garbage", "broken-vmdesc-json"])
def test_verify_damage_after_devices_is_located(capsys, fx, tmp_path, kind):
    src = fx("q35-plain")
    data = src.read_bytes()
    marker = data.rfind(b"\x06\x00\x00")       # QEMU_VM_VMDESCRIPTION + be32 length
    assert data[marker + 5:marker + 6] == b"{"
    p = tmp_path / f"{kind}.mig"
    if kind == "truncated-in-vmdesc":
        p.write_bytes(data[:-100])
        ok = {"TruncatedStream", "VMDescError"}
    elif kind == "trailing-garbage":
        p.write_bytes(data + b"garbage")
        ok = {"TrailingGarbage", "VMDescError"}
    else:
        i = data.rfind(b'"page_size"')
        p.write_bytes(data[:i] + b"\x00" + data[i + 1:])
        ok = {"VMDescError"}
    res = run_json(capsys, "verify", p, rc=1)
    assert res["error"]["type"] in ok and res["error"]["offset"] >= marker, res["error"]


# -------------------------------------------------------------- usage errors

def test_usage_errors(capsys, fx, tmp_path):
    good = fx("q35-plain")
    missing = tmp_path / "nope.mig"
    for argv in (["info", missing], ["verify", missing], ["extract", missing, "-o", tmp_path / "o"],
                 ["convert", missing, tmp_path / "o.mig"], ["diff", missing, good]):
        rc, out, err = run(capsys, *argv)
        assert rc == 2 and "no such file" in err, argv
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.mig").exists()
    # bad options / choices
    assert run(capsys, "info", good, "--bogus")[0] == 2
    assert run(capsys, "convert", good, tmp_path / "x.mig", "--to", "vmdk")[0] == 2
    assert run(capsys, "convert", good, tmp_path / "x.mig", "--zero-pages", "some")[0] == 2
    assert run(capsys, "extract", good)[0] == 2                      # -o is required
    assert run(capsys, "frobnicate")[0] == 2
    rc, out, err = run(capsys)
    assert rc == 2 and "convert" in err                               # no command: help
    assert not (tmp_path / "x.mig").exists()


def test_usage_error_replace_unknown_block(capsys, fx, tmp_path):
    pat = tmp_path / "pat.bin"
    pat.write_bytes(pattern8k())
    out = tmp_path / "out.mig"
    rc, _, err = run(capsys, "convert", fx("q35-plain"), out, "--replace", f"no.such.block={pat}")
    assert rc == 2
    assert "no.such.block" in err and "pc.ram" in err                # names the choices
    assert not out.exists()
    rc, _, err = run(capsys, "convert", fx("q35-plain"), out, "--replace", str(pat))
    assert rc == 2 and "--replace" in err                             # NAME=VALUE missing
    rc, _, err = run(capsys, "convert", fx("q35-plain"), out, "--replace",
                     f"pc.ram={tmp_path / 'missing.bin'}")
    assert rc == 2
    rc, _, err = run(capsys, "convert", fx("q35-plain"), out, "--replace",
                     f"/rom@etc/acpi/rsdp={pat}")                     # 8 KiB into a 4 KiB block
    assert rc == 2 and "outside block" in err
    rc, _, err = run(capsys, "convert", fx("q35-plain"), out, "--host-page-size", "nope=2M")
    assert rc == 2 and "nope" in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["pat.bin"]        # no temp files left


def test_usage_error_extract_into_non_empty_dir(capsys, fx, tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    rc, _, err = run(capsys, "extract", fx("q35-plain"), "-o", d)
    assert rc == 2 and "not an empty directory" in err
    assert [p.name for p in d.iterdir()] == ["keep.txt"]
    f = tmp_path / "file"
    f.write_text("x")
    assert run(capsys, "extract", fx("q35-plain"), "-o", f)[0] == 2
    assert run(capsys, "convert", fx("q35-plain"), d)[0] == 2        # OUT is a directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_real_exit_codes(fx, tmp_path):
    assert sub("verify", fx("q35-plain")).returncode == 0
    short = truncate_copy(fx("q35-plain"), tmp_path / "short.mig", 300000)
    r = sub("verify", short, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["type"] == "TruncatedStream"
    assert sub("verify", tmp_path / "missing.mig").returncode == 2
    assert sub("info", fx("q35-plain"), "--no-such-option").returncode == 2
    assert sub("diff", fx("q35-plain"), fx("pc-plain")).returncode == 1
    assert sub("diff", fx("q35-plain"), fx("q35-plain")).returncode == 0


# ------------------------------------------------------------------ stdin

def test_stdin_plain_and_gzip(capsys, fx):
    path = fx("q35-plain")
    raw = path.read_bytes()
    ref = run_json(capsys, "info", path, "--hash")
    for data in (raw, gzip.compress(raw, compresslevel=1)):
        r = sub("info", "-", "--hash", "--json", input=data, check_rc=0)
        info = json.loads(r.stdout)
        assert info["machine"] == ref["machine"] and info["stream_size"] == len(raw)
        assert [b["sha256"] for b in info["ramblocks"]] == [b["sha256"] for b in ref["ramblocks"]]
        r = sub("verify", "-", "--json", input=data, check_rc=0)
        assert json.loads(r.stdout)["roundtrip"] is True
    # a pipe ending early is an invalid stream, not a crash
    r = sub("verify", "-", "--json", input=raw[:250000])
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["type"] == "TruncatedStream"


def test_stdin_convert_equals_file_convert(fx, tmp_path):
    path = fx("q35-plain")
    sub("convert", "-", tmp_path / "a.mig", "--to", "mapped-ram", input=path.read_bytes(),
        check_rc=0)
    sub("convert", path, tmp_path / "b.mig", "--to", "mapped-ram", check_rc=0)
    assert sha_file(tmp_path / "a.mig") == sha_file(tmp_path / "b.mig")


# ---------------------------------------------------------------- extract

@pytest.mark.parametrize("name", ALL)
def test_extract_matches_ground_truth(capsys, fx, tmp_path, name):
    e = FX[name]
    out = tmp_path / "ram"
    man = run_json(capsys, "extract", fx(name), "-o", out, "--hash")
    files = {m["name"]: m["file"] for m in man["ramblocks"]}
    assert list(files) == [b["name"] for b in e["ramblocks"]]
    assert sorted(p.name for p in out.iterdir()) == sorted([*files.values(), "manifest.json"])
    assert json.loads((out / "manifest.json").read_text()) == man
    assert man["machine"] == e["machine_type"] and man["page_size"] == PAGE
    for m, b in zip(man["ramblocks"], e["ramblocks"]):
        assert os.path.getsize(out / m["file"]) == m["size"] == b["used_length"]
        assert sha_file(out / m["file"]) == m["sha256"], m["name"]
    blocks = {n: np.memmap(out / f, dtype=np.uint8, mode="r") for n, f in files.items()}
    for p in e["planted"]:
        got = bytes(blocks[p["block"]][p["block_offset"]:p["block_offset"] + p["length"]])
        if p["pages_in_stream"]:
            assert sha(got) == p["sha256"], (name, p["name"])
        else:       # x-ignore-shared: the block's pages are not in the stream
            assert got == bytes(p["length"]), (name, p["name"])
    for r in e["ram_regions"]:
        got = bytes(blocks[r["block"]][r["block_offset"]:r["block_offset"] + r["length"]])
        assert (sha(got) == r["sha256"]) == r["pages_in_stream"], (name, hex(r["addr"]))


def test_extract_into_existing_empty_dir(capsys, fx, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    rc, out, err = run(capsys, "extract", fx("q35-plain"), "-o", d)
    assert rc == 0 and "manifest" in out
    assert (d / "manifest.json").exists() and (d / "pc.ram.raw").exists()


@pytest.mark.parametrize("how", ["truncated", "corrupted"])
def test_extract_is_atomic(capsys, fx, tmp_path, how):
    src = fx("q35-plain")
    parent = tmp_path / "parent"
    parent.mkdir()
    if how == "truncated":
        bad = truncate_copy(src, tmp_path / "bad.mig", 400000)    # after most of the RAM
    else:
        info = run_json(capsys, "info", src)
        last = [s for s in info["sections"] if s["type"] == "FULL"][-2]
        bad = patch_copy(src, tmp_path / "bad.mig", last["offset"], b"\x55")
    rc, out, err = run(capsys, "extract", bad, "-o", parent / "ram")
    assert rc == 1 and "invalid stream" in err
    assert list(parent.iterdir()) == []           # no output dir, no .ram.qemuram-* temp dir


# ---------------------------------------------------------------- convert

def test_convert_roundtrip_sequential_mapped_sequential_q35_plain(capsys, fx, tmp_path):
    src = fx("q35-plain")
    mr, back = tmp_path / "a.mr", tmp_path / "back.mig"
    rep = run_json(capsys, "convert", src, mr, "--to", "mapped-ram")
    assert rep["format"] == "mapped-ram" and rep["output_size"] == mr.stat().st_size
    info = run_json(capsys, "info", mr)
    assert info["format"] == "mapped-ram" and info["capabilities"] == ["mapped-ram"]
    assert run_json(capsys, "verify", mr)["roundtrip"] is True
    # the page area is 1 MiB aligned and sparse: far fewer blocks than its size
    assert mr.stat().st_blocks * 512 < mr.stat().st_size // 4
    run_json(capsys, "convert", mr, back, "--to", "sequential")
    assert sha_file(back) == FX["q35-plain"]["stream_sha256"]     # QEMU's own bytes again


@pytest.mark.parametrize("name", MAPPED)
def test_convert_roundtrip_mapped_sequential_mapped(capsys, fx, tmp_path, name):
    seq, back = tmp_path / "a.mig", tmp_path / "back.mr"
    run_json(capsys, "convert", fx(name), seq, "--to", "sequential")
    info = run_json(capsys, "info", seq)
    assert info["format"] == "sequential" and info["capabilities"] == []
    run_json(capsys, "convert", seq, back, "--to", "mapped-ram")
    assert sha_file(back) == FX[name]["stream_sha256"]


@pytest.mark.parametrize("name,extra", [("pc-plain", []), ("q35-postcopy-advised", []),
                                        ("q35-zero-none", ["--zero-pages", "full"])])
def test_convert_roundtrip_via_mapped_ram(capsys, fx, tmp_path, name, extra):
    mr, back = tmp_path / "a.mr", tmp_path / "back.mig"
    run_json(capsys, "convert", fx(name), mr, "--to", "mapped-ram")
    run_json(capsys, "convert", mr, back, "--to", "sequential", *extra)
    assert sha_file(back) == FX[name]["stream_sha256"]


def test_convert_ignore_shared_to_mapped_ram_is_refused(capsys, fx, tmp_path):
    # A mapped-ram file cannot say which blocks x-ignore-shared skipped, and
    # QEMU 10 neither saves nor loads that combination: a usage error, no output.
    mr = tmp_path / "a.mr"
    rc, out, err = run(capsys, "convert", fx("q35-ignore-shared"), mr, "--to", "mapped-ram")
    assert rc == 2 and "x-ignore-shared" in err and "dimm0-mem" in err
    assert not mr.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ALL)
def test_convert_identity_reproduces_qemu(capsys, fx, tmp_path, name):
    out = tmp_path / "same"
    rep = run_json(capsys, "convert", fx(name), out)
    assert rep["saved"] == 0 and rep["input_size"] == rep["output_size"] == FX[name]["stream_size"]
    assert sha_file(out) == FX[name]["stream_sha256"]


def _nonzero_pages(capsys, stream, tmp_path) -> dict:
    man = run_json(capsys, "extract", stream, "-o", tmp_path / "nz")
    out = {}
    for m in man["ramblocks"]:
        a = np.fromfile(tmp_path / "nz" / m["file"], dtype=np.uint8).reshape(-1, PAGE)
        out[m["name"]] = int(a.any(axis=1).sum())
    return out


def test_convert_zero_pages_full(capsys, fx, tmp_path):
    out = tmp_path / "full.mig"
    rep = run_json(capsys, "convert", fx("q35-plain"), out, "--zero-pages", "full")
    assert rep["zero_pages"] == "full" and rep["output_size"] == out.stat().st_size
    for b in run_json(capsys, "info", out)["ramblocks"]:
        assert b["records"]["zero"] == 0 and b["records"]["page"] == b["size"] // PAGE, b["name"]
    # QEMU with zero-page-detection=none writes the same kind of stream
    assert out.stat().st_size > 60 << 20
    assert run(capsys, "diff", fx("q35-plain"), out)[0] == 0
    assert run_json(capsys, "verify", out)["roundtrip"] is True


def test_convert_zero_pages_records(capsys, fx, tmp_path):
    src = fx("q35-zero-none")
    before = records(run_json(capsys, "info", src))
    assert all(r["zero"] == 0 for r in before.values())
    out = tmp_path / "rec.mig"
    rep = run_json(capsys, "convert", src, out, "--zero-pages", "records")
    assert rep["zero_pages"] == "records" and rep["saved"] > 60 << 20
    nonzero = _nonzero_pages(capsys, src, tmp_path)
    info = run_json(capsys, "info", out)
    for b in info["ramblocks"]:
        r = b["records"]
        assert r["page"] == nonzero[b["name"]], b["name"]
        assert r["zero"] == b["size"] // PAGE - nonzero[b["name"]], b["name"]
    assert run(capsys, "diff", src, out)[0] == 0


def test_convert_compact_reports_saved(capsys, fx, tmp_path):
    # a paused guest's stream is already one pass: nothing to drop
    out = tmp_path / "c.mig"
    rep = run_json(capsys, "convert", fx("q35-plain"), out, "--compact")
    assert rep["saved"] == 0 and sha_file(out) == FX["q35-plain"]["stream_sha256"]
    # compact + zero records on the zero-none stream: saved is the size difference
    out2 = tmp_path / "c2.mig"
    rep = run_json(capsys, "convert", fx("q35-zero-none"), out2, "--compact",
                   "--zero-pages", "records")
    assert set(rep) >= {"input", "output", "input_size", "output_size", "saved", "format",
                        "zero_pages"}
    assert rep["input_size"] == FX["q35-zero-none"]["stream_size"]
    assert rep["output_size"] == out2.stat().st_size
    assert rep["saved"] == rep["input_size"] - rep["output_size"] > 60 << 20
    rc, text, _ = run(capsys, "convert", fx("q35-zero-none"), tmp_path / "c3.mig", "--compact",
                      "--zero-pages", "records")
    assert rc == 0 and f"saved {rep['saved']}" in text


@pytest.mark.parametrize("name,to", [("q35-plain", "sequential"), ("q35-mapped-ram", "sequential"),
                                     ("q35-plain", "mapped-ram")])
def test_convert_to_stdout_equals_file(fx, tmp_path, name, to):
    f = tmp_path / "out"
    sub("convert", fx(name), f, "--to", to, check_rc=0)
    r = sub("convert", fx(name), "-", "--to", to, "--json", check_rc=0)
    assert sha(r.stdout) == sha_file(f)
    # with '-' the JSON report goes to stderr, so stdout is only the stream
    rep = json.loads(r.stderr)
    assert rep["output"] == "-" and rep["output_size"] == len(r.stdout)


def _advise_offset(info: dict) -> int:
    return [c for c in info["commands"] if c["command"] == "POSTCOPY_ADVISE"][0]["offset"]


def _set_advise_summary(path: Path, offset: int, summary: int) -> None:
    """Overwrite the host page-size summary of the POSTCOPY_ADVISE command
    (0x08, be16 cmd 3, be16 len 16, be64 summary, be64 target page size)."""
    data = bytearray(path.read_bytes())
    assert data[offset] == 0x08 and data[offset + 1:offset + 5] == b"\x00\x03\x00\x10"
    data[offset + 5:offset + 13] = summary.to_bytes(8, "big")
    path.write_bytes(bytes(data))


def test_convert_host_page_size_2m_4k_2m_roundtrip(capsys, fx, tmp_path):
    src = fx("q35-postcopy-advised")
    a, b = tmp_path / "4k.mig", tmp_path / "2m.mig"
    run_json(capsys, "convert", src, a, "--host-page-size", "pc.ram=4K")
    st = run_json(capsys, "info", a)
    assert all(blk["page_size"] == PAGE for blk in st["ramblocks"])
    # a block with the host's page size has no page-size field: 8 bytes less
    assert a.stat().st_size == FX["q35-postcopy-advised"]["stream_size"] - 8
    assert run(capsys, "diff", src, a)[0] == 0
    run_json(capsys, "convert", a, b, "--host-page-size", "pc.ram=2M")
    assert sha_file(b) == FX["q35-postcopy-advised"]["stream_sha256"]


def test_convert_host_page_size_updates_postcopy_advise(capsys, fx, tmp_path):
    a = tmp_path / "4k.mig"
    run_json(capsys, "convert", fx("q35-postcopy-advised"), a, "--host-page-size", "pc.ram=4K")
    assert run_json(capsys, "info", a)["postcopy_advise"]["host_page_sizes"] == PAGE


def test_convert_host_page_size_4k_to_2m(capsys, fx, tmp_path):
    src = fx("q35-postcopy-advised")
    # what a 4 KiB-backed source writes: no page-size field, summary 0x1000
    a = tmp_path / "4k.mig"
    run_json(capsys, "convert", src, a, "--host-page-size", "pc.ram=4K")
    _set_advise_summary(a, _advise_offset(run_json(capsys, "info", src)), PAGE)
    assert run_json(capsys, "verify", a)["roundtrip"] is True
    b = tmp_path / "2m.mig"
    run_json(capsys, "convert", a, b, "--host-page-size", "pc.ram=2M")
    st = run_json(capsys, "info", b)
    assert {blk["name"]: blk for blk in st["ramblocks"]}["pc.ram"]["page_size"] == 2 << 20
    assert sha_file(b) == FX["q35-postcopy-advised"]["stream_sha256"]


# ------------------------------------------------------------- replace + diff

def test_diff_identical(capsys, fx, tmp_path):
    mr = tmp_path / "a.mr"
    run_json(capsys, "convert", fx("q35-plain"), mr, "--to", "mapped-ram")
    res = run_json(capsys, "diff", fx("q35-plain"), mr)
    assert res["identical"] is True
    assert all(b["differing_pages"] == 0 for b in res["ramblocks"])
    rc, out, _ = run(capsys, "diff", fx("q35-plain"), mr)
    assert rc == 0 and "pc.ram: identical" in out


@pytest.mark.parametrize("offset,pages", [(0x300000, [0x300000, 0x301000]),
                                          (0x300800, [0x300000, 0x301000, 0x302000])])
def test_replace_then_diff_reports_exactly_the_pages(capsys, fx, tmp_path, offset, pages):
    src = fx("q35-plain")
    pat = tmp_path / "pat.bin"
    pat.write_bytes(pattern8k())
    out = tmp_path / "replaced.mig"
    run_json(capsys, "convert", src, out, "--replace", f"pc.ram={pat}@{offset:#x}")
    res = run_json(capsys, "diff", src, out, rc=1)
    assert res["identical"] is False
    by = {b["name"]: b for b in res["ramblocks"]}
    assert by["pc.ram"]["differing_pages"] == len(pages)
    assert by["pc.ram"]["first_offsets"] == pages
    assert all(b["differing_pages"] == 0 for n, b in by.items() if n != "pc.ram")
    rc, text, _ = run(capsys, "diff", src, out)
    assert rc == 1
    assert f"pc.ram: {len(pages)} of 16384 pages differ; first at 0x300000" in text
    res = run_json(capsys, "diff", src, out, "--limit", "1", rc=1)
    assert {b["name"]: b for b in res["ramblocks"]}["pc.ram"]["first_offsets"] == [0x300000]
    # the bytes landed where asked, and nothing else moved
    man = run_json(capsys, "extract", out, "-o", tmp_path / "x")
    ram = np.memmap(tmp_path / "x" / "pc.ram.raw", dtype=np.uint8, mode="r")
    assert bytes(ram[offset:offset + 8192]) == pattern8k()
    assert man["ramblocks"][0]["name"] == "pc.ram"


def test_diff_different_block_sets(capsys, fx):
    res = run_json(capsys, "diff", fx("q35-plain"), fx("q35-ignore-shared"), rc=1)
    only_b = {b["name"] for b in res["ramblocks"] if b.get("only_in") == "b"}
    assert only_b == {"dimm0-mem", "dimm1-mem"}


# --------------------------------------------------------------- containers

@pytest.mark.parametrize("label", LIBVIRT_OK)
def test_libvirt_save_image_info_verify_extract(capsys, tmp_path, label):
    e = LV[label]
    path = CONT / e["file"]
    info = run_json(capsys, "info", path)
    assert info["container"]["kind"] == "libvirt-save"
    assert info["container"]["compression"] == e["format"]
    assert info["container"]["stream_offset"] == e["stream_offset"]
    assert info["container"]["domain_name"] == e["domain_name"]
    assert info["machine"] == "pc-q35-10.0" and info["stream_size"] == e["stream_size"]
    res = run_json(capsys, "verify", path)
    assert res["valid"] and res["roundtrip"] and res["stream_size"] == e["stream_size"]
    run_json(capsys, "extract", path, "-o", tmp_path / "x")
    ram = (tmp_path / "x" / "pc.ram.raw").read_bytes()
    assert ram[0x100000:0x100000 + len(pattern())] == pattern()
    # convert unwraps it: QEMU's own stream, byte for byte
    run_json(capsys, "convert", path, tmp_path / "s.mig")
    assert sha_file(tmp_path / "s.mig") == e["stream_sha256"]


@pytest.mark.parametrize("image", sorted(QC))
@pytest.mark.parametrize("snap", ["snap1", "snap2", None])
def test_qcow2_snapshot_info_verify_extract(capsys, qcow2, tmp_path, image, snap):
    e = QC[image]
    want = e["snapshots"][-1] if snap is None else [s for s in e["snapshots"]
                                                      if s["name"] == snap][0]
    opt = [] if snap is None else ["--snapshot", snap]
    info = run_json(capsys, "info", qcow2(image), *opt)
    assert info["container"]["kind"] == "qcow2"
    assert info["container"]["snapshot"] == want["name"]
    assert info["stream_size"] == want["vm_state_size"]
    res = run_json(capsys, "verify", qcow2(image), *opt)
    assert res["valid"] and res["roundtrip"]
    run_json(capsys, "extract", qcow2(image), *opt, "-o", tmp_path / "x")
    ram = (tmp_path / "x" / "pc.ram.raw").read_bytes()
    assert ram[0x100000:0x100000 + len(pattern())] == pattern()
    run_json(capsys, "convert", qcow2(image), *opt, tmp_path / "s.mig")
    assert sha_file(tmp_path / "s.mig") == want["vmstate_sha256"]    # as qemu-io read it


def test_qcow2_gzip_wrapped_and_unknown_snapshot(capsys, qcow2):
    info = run_json(capsys, "info", CONT / QC["snap-v3"]["file"], "--snapshot", "snap1")
    assert info["container"]["kind"] == "qcow2"
    rc, out, err = run(capsys, "verify", qcow2("snap-v3"), "--snapshot", "nope")
    assert rc in (1, 2) and "nope" in (out + err) and "snap1" in (out + err)


def test_libvirt_lzop_is_a_clear_error(capsys, tmp_path):
    path = CONT / LV["lzop"]["file"]
    for argv in (["info", path], ["verify", path], ["extract", path, "-o", tmp_path / "x"],
                 ["convert", path, tmp_path / "o.mig"]):
        rc, out, err = run(capsys, *argv)
        # cli.py classifies it as an invalid input (ContainerError -> 1)
        assert rc in (1, 2), argv
        assert "lzop" in err, argv
    res = run_json(capsys, "verify", path, rc=1)
    assert res["error"]["type"] == "ContainerError" and "lzop" in res["error"]["message"]
    assert str(LV["lzop"]["stream_offset"]) in res["error"]["message"]   # says where to cut
    assert list(tmp_path.iterdir()) == []
    r = sub("info", path)
    assert r.returncode in (1, 2) and b"lzop" in r.stderr


# --------------------------------------------------------------------- help

OPTIONS = {
    "info": ["--json", "--hash", "--snapshot", "--page-size"],
    "verify": ["--json", "--snapshot"],
    "extract": ["--output", "--format", "--json"],
    "convert": ["--to", "--zero-pages", "--compact", "--host-page-size", "--replace",
                "--snapshot"],
    "diff": ["--json", "--limit"],
}


def test_help(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for cmd in OPTIONS:
        assert cmd in out
    assert "exit codes" in out
    for cmd, opts in OPTIONS.items():
        rc, out, _ = run(capsys, cmd, "--help")
        assert rc == 0, cmd
        for o in opts:
            assert o in out, (cmd, o)
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and "qemuram" in out


def test_help_real_process():
    r = sub("--help", check_rc=0)
    assert b"convert" in r.stdout
    r = sub("convert", "--help", check_rc=0)
    assert b"--host-page-size" in r.stdout and b"mapped-ram" in r.stdout
