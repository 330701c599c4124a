"""Guest-physical memory for forensic tools, proven with real QEMU and volatility3.

A mostly-zero q35 guest with more than 4 GiB of RAM (paused, so its memory is
never touched and the stream stays small) has patterns planted below the PCI
hole and above 4 GiB.  qemuram reads them by guest-physical address, writes an
ELF core and a flat physical image, and volatility3's ELF layer reads the same
bytes that QEMU's pmemsave returns.
"""
import os
import random
import subprocess
import sys

import pytest

import qemuram

try:
    from . import harness as h
except ImportError:  # pragma: no cover
    from tests.integration import harness as h

pytestmark = pytest.mark.integration

GiB = 1 << 30


def _patterns():
    rng = random.Random(4096)
    return [
        (0x1000, rng.randbytes(4096)),                 # low RAM
        (0x7FFFF000, rng.randbytes(4096)),             # last page below q35's 2 GiB split
        (0x100000000, rng.randbytes(8192)),            # first pages above 4 GiB
        (0x100000000 + 3 * GiB - 4096, rng.randbytes(4096)),  # top of high RAM
    ]


@pytest.fixture(scope="module")
def big_guest_stream(tmp_path_factory):
    h.require(h.qemu_available(), "qemu-system-x86_64")
    d = tmp_path_factory.mktemp("forensic")
    path = str(d / "q35-5g.mig")
    planted = _patterns()
    with h.Guest(machine="q35", memory="5G", plant=planted) as g:
        g.save(path)
        truth = {addr: g.pmemsave(addr, len(data)) for addr, data in planted}
    for addr, data in planted:
        assert truth[addr] == data
    return path, planted, d


def _vol_layer(path):
    import pathlib
    from volatility3.framework import contexts
    from volatility3.framework.layers import elf, physical
    ctx = contexts.Context()
    ctx.config["file.location"] = pathlib.Path(path).as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "file", "file"))
    ctx.config["memory.base_layer"] = "file"
    layer = elf.Elf64Layer(ctx, "memory", "memory")
    ctx.add_layer(layer)
    return layer


def test_physical_reads_match_pmemsave(big_guest_stream):
    path, planted, _ = big_guest_stream
    with qemuram.open(path) as st:
        assert st.ram["pc.ram"].size == 5 * GiB
        for addr, data in planted:
            assert st.physical.read(addr, len(data)) == data
        # the PCI hole is not RAM
        with pytest.raises(qemuram.UsageError):
            st.physical.read(0xC0000000, 16)
        assert st.physical.read(0xC0000000, 16, unmapped="zero") == bytes(16)


def test_elf_core_read_by_volatility3(big_guest_stream):
    pytest.importorskip("volatility3", reason="volatility3 is a test dependency (pyproject)")
    path, planted, d = big_guest_stream
    out = str(d / "core.elf")
    r = subprocess.run([sys.executable, "-m", "qemuram.cli", "extract", path, "--format", "elf",
                        "-o", out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # sparse: a 5 GiB guest holding a few pages costs little disk
    assert os.stat(out).st_blocks * 512 < 64 << 20
    layer = _vol_layer(out)
    for addr, data in planted:
        assert layer.read(addr, len(data)) == data


def test_raw_physical_image(big_guest_stream):
    path, planted, d = big_guest_stream
    out = str(d / "phys.raw")
    r = subprocess.run([sys.executable, "-m", "qemuram.cli", "extract", path, "--format",
                        "raw-physical", "-o", out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as f:
        for addr, data in planted:
            f.seek(addr)
            assert f.read(len(data)) == data
