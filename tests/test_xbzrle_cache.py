"""Pages updated by XBZRLE stay in memory between updates (``RamBlock``'s
page cache): every other way in or out of a block must see them, and the
block files must hold them once decoding ends."""
import io
import os

import numpy as np
import pytest

import qemuram
from qemuram import image as qimage, xbzrle
from qemuram.errors import XBZRLEError
from qemuram.image import MemoryImage
from qemuram.records import PageRun, RamBlockInfo, XbzrlePage, XbzrleRun
from qemuram.wire import RamFlag

from test_xbzrle_runs import BLOCK, NPAGES, P, _equal_length_stream, _stream

rng = np.random.default_rng(7)


def _image(tmp_path, npages=16):
    img = MemoryImage(str(tmp_path), keep=True)
    blk = img.add_block(RamBlockInfo(BLOCK, npages * P), P)
    return img, blk


def _file(tmp_path) -> bytes:
    with open(tmp_path / qimage.block_file_name(BLOCK), "rb") as f:
        return f.read()


def _pages(img, idx, data):
    idx = np.asarray(idx)
    img.apply(PageRun(RamFlag.PAGE, BLOCK, idx.astype(np.uint64) * np.uint64(P), False,
                      data=np.frombuffer(data, dtype=np.uint8).reshape(len(idx), P)), P)


def _zero(img, idx):
    img.apply(PageRun(RamFlag.ZERO, BLOCK, np.asarray(idx, dtype=np.uint64) * np.uint64(P),
                      False), P)


def _xbzrle(img, mem, updates, offset=1000):
    """Apply one XbzrleRun turning mem[i] into new for each (i, new); mem follows."""
    encs = [xbzrle.encode(mem[i], new) for i, new in updates]
    assert all(e is not None for e in encs)
    data = np.frombuffer(b"".join(encs), dtype=np.uint8)
    lengths = np.array([len(e) for e in encs])
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    img.apply(XbzrleRun(BLOCK, np.array([i * P for i, _ in updates], dtype=np.uint64), data,
                        starts, lengths, offset=offset), P)
    for i, new in updates:
        mem[i] = new


def _rand():
    return rng.integers(0, 256, P, dtype=np.uint8).tobytes()


def _changed(old, at=100, n=3):
    new = bytearray(old)
    new[at:at + n] = bytes((b + 1) & 0xFF for b in new[at:at + n])
    return bytes(new)


def _check(blk, mem):
    want = b"".join(mem)
    assert blk.read(0, blk.size) == want
    nz = np.array([any(m) for m in mem])
    assert (blk.written == nz).all()


def test_updates_stay_in_memory_until_flushed(tmp_path):
    img, blk = _image(tmp_path)
    mem = [bytes(P)] * 16
    first = [_rand() for _ in range(4)]
    _pages(img, range(4), b"".join(first))
    mem[:4] = first
    _xbzrle(img, mem, [(1, _changed(mem[1])), (2, _changed(mem[2]))])
    _xbzrle(img, mem, [(1, _changed(mem[1], 200))])
    assert _file(tmp_path)[:4 * P] == b"".join(first)      # not written yet: cached
    img.flush()
    assert _file(tmp_path) == b"".join(mem)
    _check(blk, mem)
    img.close()


def test_every_reader_sees_cached_pages(tmp_path):
    img, blk = _image(tmp_path)
    mem = [bytes(P)] * 16
    _pages(img, [3, 4], _rand() + _rand())
    mem[3], mem[4] = blk.read(3 * P, P), blk.read(4 * P, P)
    readers = [
        lambda: blk.read(0, blk.size),
        lambda: blk.read_pages(0, 16).tobytes(),
        lambda: _read_into(blk),
        lambda: blk.array().tobytes(),
        lambda: blk.pages().tobytes(),
        lambda: _copy_to(blk, tmp_path),
    ]
    for k, read in enumerate(readers):
        _xbzrle(img, mem, [(3, _changed(mem[3], 10 + k)), (9, _changed(mem[9], 50 + k))])
        assert read() == b"".join(mem), k
        blk._map = None                    # array() maps the file: later updates go round it
    img.close()


def _read_into(blk):
    buf = bytearray(blk.size)
    blk.read_into(0, memoryview(buf))
    return bytes(buf)


def _copy_to(blk, tmp_path):
    fd = os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, blk.size)
        blk.copy_to(fd, 0)
        return os.pread(fd, blk.size, 0)
    finally:
        os.close(fd)


def test_later_page_and_zero_records_win(tmp_path):
    img, blk = _image(tmp_path)
    mem = [bytes(P)] * 16
    _pages(img, [0, 1, 2], _rand() * 3)
    mem[:3] = [blk.read(i * P, P) for i in range(3)]
    _xbzrle(img, mem, [(0, _changed(mem[0])), (1, _changed(mem[1])), (2, _changed(mem[2])),
                       (5, _changed(mem[5]))])
    new = _rand()
    _pages(img, [1], new)                  # PAGE over a cached page
    mem[1] = new
    _zero(img, [0, 5])                     # ZERO over cached pages (one on disk, one not)
    mem[0] = mem[5] = bytes(P)
    _xbzrle(img, mem, [(1, _changed(mem[1], 7))])   # and XBZRLE on top again
    img.flush()
    assert _file(tmp_path) == b"".join(mem)
    _check(blk, mem)
    # nothing was written where the file was a hole and the page is zero
    assert blk.written.tolist() == [False, True, True] + [False] * 13
    img.close()


def test_page_turned_zero_by_xbzrle_is_cleared_in_the_file(tmp_path):
    img, blk = _image(tmp_path)
    mem = [bytes(P)] * 16
    _pages(img, [2], _changed(bytes(P)))  # little data: XBZRLE can clear it
    mem[2] = blk.read(2 * P, P)
    _xbzrle(img, mem, [(2, bytes(P))])
    assert not blk.written[2]
    _zero(img, [2])                        # the file copy still holds data: must clear it
    img.flush()
    assert _file(tmp_path) == bytes(16 * P)
    _pages(img, [2], _changed(bytes(P), 9))
    mem[2] = blk.read(2 * P, P)
    _xbzrle(img, mem, [(2, bytes(P))])     # zero again, and only flushed this time
    img.flush()
    assert _file(tmp_path) == bytes(16 * P)
    _check(blk, mem)
    img.close()


def test_write_and_put_pages_over_cached_pages(tmp_path):
    img, blk = _image(tmp_path)
    mem = [bytes(P)] * 16
    _xbzrle(img, mem, [(4, _changed(mem[4])), (6, _changed(mem[6]))])
    blk.write(4 * P + 50, b"xyz")          # part of a cached page
    mem[4] = mem[4][:50] + b"xyz" + mem[4][53:]
    blk.put_pages(np.array([6]), np.zeros((1, P), dtype=np.uint8))
    mem[6] = bytes(P)
    assert blk.read(0, blk.size) == b"".join(mem)
    _xbzrle(img, mem, [(4, _changed(mem[4], 900))])
    img.close()
    assert _file(tmp_path) == b"".join(mem)  # close writes the cache back


def test_single_records_use_the_cache(tmp_path):
    img, blk = _image(tmp_path)
    mem = [bytes(P)] * 16
    _xbzrle(img, mem, [(8, _changed(mem[8]))])
    new = _changed(mem[8], 300)
    img.apply(XbzrlePage(BLOCK, 8 * P, False, xbzrle.encode(mem[8], new), offset=500), P)
    mem[8] = new
    assert _file(tmp_path) == bytes(16 * P)
    bad = XbzrlePage(BLOCK, 8 * P, False, b"\x00\x00", offset=500)
    with pytest.raises(XBZRLEError):
        img.apply(bad, P)
    _check(blk, mem)                       # a bad delta changes nothing
    img.close()


def test_bad_delta_leaves_cached_pages_alone(tmp_path):
    img, blk = _image(tmp_path)
    mem = [bytes(P)] * 16
    _xbzrle(img, mem, [(1, _changed(mem[1])), (2, _changed(mem[2]))])
    data = np.frombuffer(xbzrle.encode(mem[1], _changed(mem[1], 9)) + b"\x00\x00", dtype=np.uint8)
    run = XbzrleRun(BLOCK, np.array([P, 2 * P], dtype=np.uint64), data,
                    np.array([0, data.size - 2]), np.array([data.size - 2, 2]), offset=1000)
    with pytest.raises(XBZRLEError) as e:
        img.apply(run, P)
    assert e.value.offset == 1000 + data.size - 1
    _check(blk, mem)
    img.close()


@pytest.mark.parametrize("cache_pages,batch", [(0, 4096), (1, 4096), (3, 2), (8, 5),
                                               (NPAGES, 4096)])
def test_streams_decode_the_same_whatever_the_cache(monkeypatch, tmp_path, cache_pages, batch):
    """Tiny caches evict (write back) all the time; 0 pages turns it off."""
    monkeypatch.setattr(qimage, "_cache_budget", [cache_pages * P])
    monkeypatch.setattr(qimage, "_XBZRLE_BATCH", batch)
    for k, (data, model) in enumerate((_stream()[:2], _equal_length_stream()[:2])):
        out = tmp_path / str(k)
        out.mkdir()
        with qemuram.open(io.BytesIO(data), page_size=P, workdir=str(out)) as st:
            blk = st.ram[BLOCK]
            want = b"".join(model.mem)
            # decoding has ended: the file alone holds the final memory
            with open(out / qimage.block_file_name(BLOCK), "rb") as f:
                assert f.read() == want
            assert (blk.written == np.array([any(m) for m in model.mem])).all()
            assert blk.read(0, NPAGES * P) == want


def test_flush_writes_long_stretches_and_scattered_pages(tmp_path):
    img, blk = _image(tmp_path, npages=64)
    mem = [bytes(P)] * 64
    _pages(img, [40], _rand())
    mem[40] = on_disk = blk.read(40 * P, P)
    # 30 consecutive pages in consecutive cache rows, one turned zero midway,
    # then pages cached later and out of order
    _xbzrle(img, mem, [(i, _changed(mem[i], i)) for i in range(5, 35)] + [(40, _changed(mem[40]))])
    _xbzrle(img, mem, [(20, bytes(P)), (50, _changed(mem[50])), (2, _changed(mem[2]))])
    _xbzrle(img, mem, [(i, _changed(mem[i], 3 * i)) for i in range(63, 35, -1)])
    assert _file(tmp_path) == bytes(40 * P) + on_disk + bytes(23 * P)
    img.flush()
    assert _file(tmp_path) == b"".join(mem)
    _check(blk, mem)
    img.close()


def test_one_cache_budget_for_all_blocks(tmp_path, monkeypatch):
    """Blocks share the process's budget: a second block gets what the first
    left, none once it is spent, and the budget comes back on close."""
    monkeypatch.setattr(qimage, "_cache_budget", [10 * P])
    img = MemoryImage(str(tmp_path))
    first = img.add_block(RamBlockInfo(name="a", used_length=8 * P), P)
    second = img.add_block(RamBlockInfo(name="b", used_length=8 * P), P)
    third = img.add_block(RamBlockInfo(name="c", used_length=8 * P), P)
    assert first._cached_rows(np.arange(4)) is not None
    assert qimage._cache_budget[0] == 2 * P               # a took all its 8 pages
    assert second._cached_rows(np.arange(2)) is not None   # b gets the 2 left
    assert qimage._cache_budget[0] == 0
    assert third._cached_rows(np.arange(1)) is None        # c goes to the file directly
    img.close()
    assert qimage._cache_budget[0] == 10 * P
