"""The canonical encoder against QEMU's own output for the same guest memory."""
import gzip
import hashlib
import io
import json
import os

import numpy as np
import pytest

import qemuram
from qemuram.canonical import CanonicalWriter, write_atomic
from qemuram.errors import UsageError

DATA = os.path.join(os.path.dirname(__file__), "data")
FIXTURES = json.load(open(os.path.join(DATA, "fixtures.json")))["fixtures"]


def _raw(name):
    return gzip.open(os.path.join(DATA, FIXTURES[name]["file"])).read()


def _memory(st):
    return {n: hashlib.sha256(b.read(0, b.size)).hexdigest() for n, b in st.ram.items()}


def _encode(st, **kw):
    out = io.BytesIO()
    CanonicalWriter(st, **kw).write(out)
    return out.getvalue()


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_canonical_equals_qemu_in_its_own_layout(name):
    raw = _raw(name)
    with qemuram.open(io.BytesIO(raw)) as st:
        assert _encode(st) == raw


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_layout_conversions_keep_memory_and_come_back(name):
    raw = _raw(name)
    with qemuram.open(io.BytesIO(raw)) as st:
        want = _memory(st)
        other = "mapped-ram" if st.format == "sequential" else "sequential"
        if name == "q35-ignore-shared":
            # mapped-ram cannot record which blocks x-ignore-shared skipped
            with pytest.raises(UsageError, match="x-ignore-shared"):
                _encode(st, layout=other)
            return
        converted = _encode(st, layout=other)
    with qemuram.open(io.BytesIO(converted), verify=True) as st2:
        assert st2.format == other
        assert st2.roundtrip
        assert _memory(st2) == want
        # capabilities and the vmdesc stay consistent with the layout
        assert ("mapped-ram" in st2.capabilities) == (other == "mapped-ram")
        conf = st2.vmdesc["configuration"]
        caps_desc = [s for s in conf.get("subsections", [])
                     if s["vmsd_name"] == "configuration/capabilities"]
        assert bool(caps_desc) == bool(st2.capabilities)
        back_layout = "sequential" if other == "mapped-ram" else "mapped-ram"
        # mapped-ram has no ZERO records, so the zero-page setting is restated.
        zero = "full" if name == "q35-zero-none" else None
        back = _encode(st2, layout=back_layout, zero_pages=zero)
    # Converting back reproduces QEMU's original bytes.
    assert back == raw


def test_zero_pages_full_and_records():
    raw = _raw("q35-plain")
    with qemuram.open(io.BytesIO(raw)) as st:
        full = _encode(st, zero_pages="full")
        want = _memory(st)
    with qemuram.open(io.BytesIO(full)) as st2:
        assert sum(b.counts["zero"] for b in st2.ram.values()) == 0
        assert _memory(st2) == want
        assert _encode(st2, zero_pages="records") == raw
    # QEMU's own zero-page-detection=none stream is what "full" gives
    none = _raw("q35-zero-none")
    with qemuram.open(io.BytesIO(none)) as st3:
        assert _encode(st3, zero_pages="full") == none


def test_host_page_size_rewrite_of_postcopy_stream():
    raw = _raw("q35-postcopy-advised")
    with qemuram.open(io.BytesIO(raw)) as st:
        assert st.ram["pc.ram"].host_page_size == 0x200000
        small = _encode(st, host_page_sizes={"pc.ram": 4096})
    with qemuram.open(io.BytesIO(small)) as st2:
        assert st2.ram["pc.ram"].host_page_size is None
        assert _encode(st2, host_page_sizes={"pc.ram": 0x200000}) == raw


def test_replace_changes_only_those_pages():
    raw = _raw("q35-plain")
    pattern = bytes(range(256)) * 32
    with qemuram.open(io.BytesIO(raw)) as st:
        st.ram["pc.ram"].write(0x300000, pattern)
        out = _encode(st)
    with qemuram.open(io.BytesIO(out)) as st2, qemuram.open(io.BytesIO(raw)) as st1:
        a, b = st1.ram["pc.ram"].pages(), st2.ram["pc.ram"].pages()
        diff = np.flatnonzero((np.asarray(a) != np.asarray(b)).any(axis=1))
        assert diff.tolist() == [0x300, 0x301]
        assert st2.ram["pc.ram"].read(0x300000, len(pattern)) == pattern


def test_unknown_block_and_layout_are_usage_errors():
    with qemuram.open(io.BytesIO(_raw("q35-plain"))) as st:
        with pytest.raises(UsageError):
            CanonicalWriter(st, host_page_sizes={"nope": 4096})
        with pytest.raises(UsageError):
            CanonicalWriter(st, layout="zigzag")


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.mig"

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_atomic(str(target), boom)
    assert list(tmp_path.iterdir()) == []
