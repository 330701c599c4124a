"""Quick real-QEMU checks of the integration harness itself."""
import os
import random

import pytest

try:
    from . import harness as h
except ImportError:  # run outside the package layout
    from tests.integration import harness as h

pytestmark = pytest.mark.integration

RAM = 64 << 20


@pytest.fixture
def qemu():
    """Skip (fail under CI=true) when no usable QEMU is installed."""
    h.require(h.qemu_available(), "qemu-system-x86_64")


def _planted():
    rng = random.Random(20240601)
    return [
        (0x100000, rng.randbytes(64 << 10)),
        (0x200000, b"\xaa" * 4096),
        (0x300000, b"\x00" * 2048 + rng.randbytes(2048)),
        (RAM - 4096, bytes(range(256)) * 16),
    ]


def _check_planted(guest, planted):
    for addr, data in planted:
        got = guest.pmemsave(addr, len(data))
        assert got == data, h.describe_difference(got, data, base=addr,
                                                  names=("pmemsave", "planted"))


def test_paused_guest_pmemsave_equals_planted(qemu):
    planted = _planted()
    with h.Guest("q35", RAM, plant=planted) as g:
        assert g.accel in ("kvm", "tcg")
        assert g.status() == "prelaunch"
        _check_planted(g, planted)
        # memsave of vCPU 0 (paging off before the guest ran: virtual == physical)
        assert g.memsave(0x200000, 4096) == b"\xaa" * 4096


def test_migrate_to_file_then_load_on_destination(qemu, tmp_path):
    planted = _planted()
    path = tmp_path / "q35.mig"
    with h.Guest("q35", RAM, plant=planted) as src:
        info = src.save(str(path))
        assert info["status"] == "completed"
        with open(path, "rb") as f:
            assert f.read(8) == b"QEVM\x00\x00\x00\x03"
        src_ram = src.pmemsave(0, RAM)
        with h.Guest("q35", RAM, incoming=True) as dst:
            dst.load(str(path))
            dst_ram = dst.pmemsave(0, RAM)
            assert h.first_difference(src_ram, dst_ram) is None, \
                h.describe_difference(src_ram, dst_ram, names=("source", "destination"))
            _check_planted(dst, planted)


def test_failed_load_reports_qemu_error(qemu, tmp_path):
    bogus = tmp_path / "bogus.mig"
    bogus.write_bytes(b"QEVM\x00\x00\x00\x03" + b"\xff" * 64)
    with h.Guest("q35", RAM, incoming=True) as dst:
        with pytest.raises(h.MigrationFailed) as exc:
            dst.load(str(bogus), timeout=30)
        assert exc.value.status == "failed"
        assert exc.value.error_desc  # QEMU's own text
        assert exc.value.error_desc in str(exc.value)


def test_relay_records_postcopy_advised_stream(qemu):
    planted = [(0x100000, b"relay!" * 1000)]
    with h.Guest("q35", RAM, plant=planted) as src, \
            h.Guest("q35", RAM, incoming=True) as dst:
        for g in (src, dst):
            g.set_capabilities(postcopy_ram=True)
        dst.migrate_incoming(f"unix:{os.path.join(dst.tmpdir, 'in.sock')}")
        with h.Relay(dst.incoming_uri(), timeout=120) as relay:
            src.migrate(relay.uri)
            src.wait_migration(60)
            dst.wait_incoming(60)
            assert relay.wait(30), relay.errors
            assert not relay.errors
            stream = relay.read()
            assert stream[:4] == b"QEVM"
            assert relay.returned > 0  # the return path was used
            # POSTCOPY_ADVISE command (0x08, cmd 3, len 16) precedes the RAM section
            assert b"\x08\x00\x03\x00\x10" in stream[:200]
        _check_planted(dst, planted)


@pytest.mark.hugepages
def test_hugetlb2m_backend(qemu):
    h.require(h.hugepages_status("2M", RAM), "2 MiB hugepages on /dev/hugepages-2M")
    planted = _planted()
    with h.Guest("q35", RAM, backend="hugetlb2m", plant=planted) as g:
        _check_planted(g, planted)


def test_first_difference():
    a = bytes(10000)
    assert h.first_difference(a, a) is None
    b = bytearray(a)
    b[8193] = 1
    assert h.first_difference(a, bytes(b)) == 8193
    assert h.first_difference(a, a[:5000]) == 5000
    assert "0x2001" in h.describe_difference(a, bytes(b))
