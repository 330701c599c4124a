"""Target page sizes other than x86's 4 KiB: 1 KiB to 64 KiB.

x86 QEMU only writes 4 KiB target pages, so these streams are assembled with
qemuram's own record encoder (the same one proven byte-exact against QEMU's
streams elsewhere), for a machine type whose target announces its page size
with the target-page-bits configuration subsection, as aarch64 `virt` does.
"""
import hashlib
import io

import numpy as np
import pytest

import qemuram
from qemuram import xbzrle
from qemuram.canonical import CanonicalWriter
from qemuram.framing import Decoder, encode_record
from qemuram.records import (ConfigSubsection, Configuration, EndOfStream, Header, PageRun,
                             RamBlockInfo, RamEos, RamMemSize, SectionFooter, SectionHeader,
                             XbzrlePage)
from qemuram.wire import RamFlag, SectionType

SIZES = [1 << 10, 2 << 10, 4 << 10, 16 << 10, 64 << 10]


def _stream(P, *, announce=True, machine="virt-10.0"):
    """A small stream: one PART with a named PAGE run, a ZERO run and an
    XBZRLE update, for a 64-page block and a 2-page block."""
    rng = np.random.default_rng(P)
    npages = 64
    pages = rng.integers(0, 256, size=(8, P), dtype=np.uint8)
    subs = [ConfigSubsection("configuration/target-page-bits", 1,
                             (P.bit_length() - 1).to_bytes(4, "big"))] if announce else []
    blocks = [RamBlockInfo("mach-virt.ram", npages * P), RamBlockInfo("rom", 2 * P)]
    new5 = pages[5].copy()
    new5[10:20] ^= 0xFF
    delta = xbzrle.encode(pages[5], new5)
    recs = [
        Header(), Configuration(machine, subs),
        SectionHeader(SectionType.START, 0, "ram", 0, 4),
        RamMemSize(npages * P + 2 * P, blocks), RamEos(), SectionFooter(0),
        SectionHeader(SectionType.PART, 0, "ram"),
        PageRun(RamFlag.PAGE, "mach-virt.ram", np.arange(8, dtype=np.uint64) * np.uint64(P),
                True, data=pages),
        PageRun(RamFlag.ZERO, "mach-virt.ram",
                np.arange(8, npages, dtype=np.uint64) * np.uint64(P), False),
        XbzrlePage("mach-virt.ram", 5 * P, False, delta),
        PageRun(RamFlag.PAGE, "rom", np.array([P], dtype=np.uint64), True, data=pages[:1]),
        RamEos(), SectionFooter(0),
        SectionHeader(SectionType.END, 0, "ram"), RamEos(), SectionFooter(0),
        EndOfStream(),
    ]
    raw = b"".join(encode_record(r, P) for r in recs)
    expect = np.zeros((npages, P), dtype=np.uint8)
    expect[:8] = pages
    expect[5] = new5
    rom = np.zeros((2, P), dtype=np.uint8)
    rom[1] = pages[0]
    return raw, {"mach-virt.ram": expect.tobytes(), "rom": rom.tobytes()}


@pytest.mark.parametrize("P", SIZES)
def test_decode_roundtrip_and_memory(P):
    raw, want = _stream(P)
    dec = Decoder()
    dec.feed(raw)
    dec.feed_eof()
    out = b"".join(encode_record(r, dec.page_size) for r in dec)
    assert dec.page_size == P and dec.page_size_source == "target-page-bits subsection"
    assert out == raw
    with qemuram.open(io.BytesIO(raw), verify=True) as st:
        assert st.roundtrip and st.page_size == P
        for name, content in want.items():
            assert st.ram[name].read(0, st.ram[name].size) == content
        assert st.ram["mach-virt.ram"].counts == {"zero": 56, "page": 8, "xbzrle": 1,
                                                  "compressed": 0, "mapped": 0}


@pytest.mark.parametrize("P", SIZES)
def test_mapped_ram_layout_at_this_page_size(P):
    raw, want = _stream(P)
    with qemuram.open(io.BytesIO(raw)) as st:
        out = io.BytesIO()
        CanonicalWriter(st, layout="mapped-ram").write(out)
    with qemuram.open(io.BytesIO(out.getvalue()), verify=True) as st2:
        assert st2.format == "mapped-ram" and st2.roundtrip and st2.page_size == P
        blk = st2.ram["mach-virt.ram"]
        assert blk.mapped_ram.page_size == P and blk.mapped_ram.pages_offset % (1 << 20) == 0
        for name, content in want.items():
            assert hashlib.sha256(st2.ram[name].read(0, st2.ram[name].size)).digest() == \
                hashlib.sha256(content).digest()


def test_unknown_page_size_is_an_error_not_a_guess():
    raw, _ = _stream(16 << 10, announce=False)
    with pytest.raises(qemuram.PageSizeError) as exc:
        qemuram.open(io.BytesIO(raw))
    assert "page_size" in str(exc.value) and exc.value.offset is not None
    # stating it works
    with qemuram.open(io.BytesIO(raw), page_size=16 << 10, verify=True) as st:
        assert st.roundtrip and st.page_size_source == "option"


def test_wrong_stated_page_size_is_caught():
    raw, _ = _stream(16 << 10)
    with pytest.raises(qemuram.PageSizeError):
        qemuram.open(io.BytesIO(raw), page_size=4096)


def test_page_offset_not_aligned_to_the_page_size():
    P = 16 << 10
    raw, _ = _stream(P)
    dec = Decoder()
    dec.feed(raw)
    dec.feed_eof()
    run = next(r for r in dec if isinstance(r, PageRun) and r.kind == RamFlag.ZERO)
    bad = bytearray(raw)
    # second record of the ZERO run: move its offset by 4 KiB (a multiple of
    # 1 KiB, so the flags stay valid, but not of the 16 KiB page)
    at = run.offset + 9
    hdr = int.from_bytes(bad[at:at + 8], "big") + 4096
    bad[at:at + 8] = hdr.to_bytes(8, "big")
    with pytest.raises(qemuram.PageOutOfRange) as exc:
        qemuram.open(io.BytesIO(bytes(bad)))
    assert exc.value.offset == at


def _advised_stream(last_block_addr):
    """postcopy advised (summary 4 KiB | 2 MiB) + x-ignore-shared + a multifd
    flush in the setup: the one layout where the optional page-size field can
    be read two ways when a block's address happens to equal 2 MiB."""
    from qemuram.records import CommandRecord, RamMultifdFlush, build_capabilities
    P = 4096
    recs = [
        Header(),
        Configuration("pc-q35-10.0", [ConfigSubsection("configuration/capabilities", 1,
                                                       build_capabilities(["x-ignore-shared"]))]),
        CommandRecord(3, (0x201000).to_bytes(8, "big") + P.to_bytes(8, "big")),
        SectionHeader(SectionType.START, 0, "ram", 0, 4),
        RamMemSize(0x400000 + P, [RamBlockInfo("pc.ram", 0x400000, None, 0),
                                  RamBlockInfo("dimm0", P, None, last_block_addr)]),
        RamMultifdFlush(), RamEos(), SectionFooter(0),
        EndOfStream(),
    ]
    return b"".join(encode_record(r, P) for r in recs)


def test_ambiguous_postcopy_page_size_field_needs_the_callers_word():
    raw = _advised_stream(0x200000)
    with pytest.raises(qemuram.PageSizeError) as exc:
        qemuram.open(io.BytesIO(raw))
    assert "block_page_sizes" in str(exc.value)
    # The caller states the block's page size: each reading is then unique.
    with qemuram.open(io.BytesIO(raw), block_page_sizes={"dimm0": 4096}, verify=True) as st:
        assert st.roundtrip
        assert st.ram["dimm0"].host_page_size is None and st.ram["dimm0"].addr == 0x200000
    with qemuram.open(io.BytesIO(raw), block_page_sizes={"dimm0": 0x200000}) as st:
        assert st.ram["dimm0"].host_page_size == 0x200000 and st.ram["dimm0"].addr == 0x200


def test_unambiguous_when_the_address_is_no_page_size():
    raw = _advised_stream(0x300000)
    with qemuram.open(io.BytesIO(raw), verify=True) as st:
        assert st.roundtrip and st.ram["dimm0"].addr == 0x300000
