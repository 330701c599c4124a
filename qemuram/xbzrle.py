"""XBZRLE page delta encoding, bit-compatible with both of QEMU's encoders.

An encoded page is a list of pairs: a ULEB128 count of bytes that did not
change, a ULEB128 count of bytes that did, then those changed bytes.  QEMU's
lengths are at most two ULEB128 bytes (14 bits), on both sides of the wire.

What the generic (non-AVX512) encoder in QEMU's migration/xbzrle.c really
emits, which is what ``encode`` reproduces by default:

* Runs are maximal.  Its word-at-a-time compare only skips whole words that
  are all-equal (zero run) or all-different (non-zero run, detected with the
  "word has a zero byte" bit trick on old ^ new, which is exact); the run end
  is then found byte by byte, so the word size never moves a boundary.
* The unchanged tail of the page is not written; an unchanged page gives 0
  bytes (QEMU skips the page).
* Overflow (the page is then sent whole) is "output longer than the page",
  plus one quirk: before each new pair QEMU wants 2 bytes of room, so when
  unchanged bytes remain after the last changed run, an output of page size
  - 1 or page size is also an overflow.  An output of exactly the page size
  is accepted when the last byte of the page changed.
* A run longer than 0x3fff that would have to be written trips an assertion
  in QEMU (it cannot happen for pages up to 8 KiB).  There is no valid
  encoding, so ``encode`` reports overflow.

QEMU built with AVX512BW support uses another encoder when the host CPU (and
its OS) can run AVX512BW code.  It walks the page in 64-byte blocks (the last
one short when the size is not a multiple of 64) and tracks runs with
per-block equality masks.  ``encode(..., variant="avx512")`` reproduces it:

* The pairs are the same as the generic encoder's: runs are carried across
  block boundaries, so they stay maximal, the unchanged tail is not written,
  an unchanged page gives 0 bytes, and a run over 0x3fff that must be written
  makes the page unencodable.
* Only the room checks differ.  It wants 2 bytes of room at the start of
  every block and after every changed run that ends inside a block, but not
  after a changed run that ends exactly where a block starts: that run is
  written out while the next block is scanned, after that block's check.
  When it ends where the last block starts and the rest of the page is
  unchanged, nothing is checked after it, so an output of page size - 1 or
  page size is accepted there (the generic encoder calls it an overflow).
  In every other case the two encoders agree on overflow as well.
"""
from __future__ import annotations

import ctypes
import functools
import platform
from typing import Optional, Tuple

import numpy as np

from .errors import UsageError, XBZRLEError

__all__ = ["encode", "decode", "decode_many", "host_variant", "uleb128_encode", "uleb128_decode",
           "ULEB128_MAX", "VARIANTS"]

ULEB128_MAX = 0x3FFF
"""Largest run length QEMU can write or read (two ULEB128 bytes)."""

VARIANTS = ("generic", "avx512")
"""QEMU's encoders: the word-at-a-time one, and the AVX512BW one."""

_AVX512_BLOCK = 64


# XSAVE state components an AVX512 encoder needs the OS to save: SSE and AVX
# registers, opmask registers and the upper/extra ZMM registers.
_XSTATE_SSE_AVX = 0x06
_XSTATE_AVX512 = 0xE0
_ARCH_GET_XCOMP_SUPP = 0x1021  # arch_prctl code, Linux >= 5.16
_SYS_ARCH_PRCTL_X86_64 = 158


def _cpu_flags(path: str = "/proc/cpuinfo") -> frozenset:
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _os_xstate_mask() -> Optional[int]:
    """The XSAVE components the kernel enables for user code (what QEMU's
    XGETBV reads, minus components the kernel does not support), or None
    when the kernel cannot tell."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mask = ctypes.c_uint64(0)
        if libc.syscall(_SYS_ARCH_PRCTL_X86_64, _ARCH_GET_XCOMP_SUPP,
                        ctypes.byref(mask)) != 0:
            return None
        return mask.value
    except (OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def host_variant() -> str:
    """Which XBZRLE encoder a QEMU built with AVX512BW support picks on this
    machine: ``"avx512"`` or ``"generic"``.

    QEMU takes the AVX512 one when the CPU has AVX and AVX512BW, the OS has
    enabled XSAVE, and the OS saves the SSE, AVX and AVX512 register state
    (XCR0).  From user space: the kernel's CPU flags (it drops ``avx`` and
    the ``avx512*`` flags when it does not manage their state, and the
    OSXSAVE bit itself is not listed) and, where the kernel reports them,
    the XSAVE components it enables.  A QEMU built without AVX512BW support
    always uses the generic encoder; Debian's QEMU 10 has it.
    """
    flags = _cpu_flags()
    if not {"xsave", "avx", "avx512bw"} <= flags:
        return "generic"
    mask = _os_xstate_mask()
    wanted = _XSTATE_SSE_AVX | _XSTATE_AVX512
    if mask is not None and mask & wanted != wanted:
        return "generic"
    return "avx512"


def uleb128_encode(n: int) -> bytes:
    """Why only 14 bits: QEMU's decoder rejects a third ULEB128 byte."""
    if not 0 <= n <= ULEB128_MAX:
        raise UsageError(f"XBZRLE run length {n} outside 0..{ULEB128_MAX}")
    if n < 0x80:
        return bytes((n,))
    return bytes(((n & 0x7F) | 0x80, n >> 7))


def uleb128_decode(buf, pos: int, *, offset: int = 0) -> Tuple[int, int]:
    """Read one QEMU-sized ULEB128 at ``buf[pos]``; returns (value, next pos).

    Non-canonical two-byte forms (``80 00``) are accepted because QEMU
    accepts them.  ``offset`` is added to positions in errors so they name
    the byte in the whole stream.
    """
    n = len(buf)
    if pos >= n:
        raise XBZRLEError("data ends where a run length should start",
                          offset=offset + pos, expected="a ULEB128 length",
                          found="end of data")
    first = buf[pos]
    if not first & 0x80:
        return first, pos + 1
    if pos + 1 >= n:
        raise XBZRLEError("data ends inside a two-byte run length",
                          offset=offset + pos, expected="a second ULEB128 byte",
                          found="end of data")
    second = buf[pos + 1]
    if second & 0x80:
        raise XBZRLEError("run length longer than two ULEB128 bytes",
                          offset=offset + pos + 1,
                          expected="a final ULEB128 byte (< 0x80)",
                          found=f"0x{second:02x}")
    return (first & 0x7F) | (second << 7), pos + 2


def _as_u8(buf, *, writable: bool = False) -> np.ndarray:
    """One flat uint8 view, so every bytes-like input is handled alike."""
    if isinstance(buf, np.ndarray):
        arr = buf
        if arr.dtype != np.uint8:
            if not arr.flags.c_contiguous:
                raise UsageError("page array must be C-contiguous")
            arr = arr.view(np.uint8)
        arr = arr.reshape(-1)
        if writable and not arr.flags.writeable:
            raise UsageError("page buffer is read-only")
        return arr
    try:
        mv = memoryview(buf)
    except TypeError:
        raise UsageError(f"expected a bytes-like page, got {type(buf).__name__}") from None
    if not mv.c_contiguous:
        raise UsageError("page buffer must be contiguous")
    if writable and mv.readonly:
        raise UsageError("page buffer is read-only")
    if mv.nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.frombuffer(mv.cast("B"), dtype=np.uint8)


_FEW_RUNS = 32
"""Up to this many runs a plain loop beats numpy's per-call cost."""


def encode(old, new, *, variant: str = "generic") -> Optional[bytes]:
    """Delta of ``new`` against ``old``, byte-equal to QEMU's output.

    ``b""`` means unchanged (QEMU does not send the page) and ``None`` means
    overflow (QEMU sends a plain page instead).  The output limit is the
    page size, as QEMU calls the encoder with dlen = TARGET_PAGE_SIZE.
    With 64 KiB pages an output of exactly 65536 bytes is possible, and
    does not fit the record's be16 length (QEMU would write 0): writers
    must treat it as overflow.

    ``variant`` picks which of QEMU's encoders to reproduce: ``"generic"``
    or ``"avx512"`` (see the module docstring; ``host_variant()`` names the
    one a QEMU on this machine uses).
    """
    if variant not in VARIANTS:
        raise UsageError(f"unknown XBZRLE encoder variant {variant!r}; "
                         f"expected one of {', '.join(VARIANTS)}")
    a = _as_u8(old)
    b = _as_u8(new)
    size = a.size
    if b.size != size:
        raise UsageError(f"old and new pages differ in size ({size} != {b.size})")
    if size == 0:
        return b""
    if size < 2:
        # QEMU's room check (2 bytes) runs before anything else.
        return None
    if variant == "avx512":
        # Where the last (maybe short) 64-byte block starts: a changed run
        # ending there is written after that block's room check, and no
        # other check follows if the block is unchanged.
        lax_end = (size - 1) // _AVX512_BLOCK * _AVX512_BLOCK
    else:
        lax_end = -1  # only a run that ends the page may fill it
    diff = a != b
    if not diff.any():
        return b""
    # Every place where "differs" flips is a run boundary.
    edges = np.flatnonzero(diff[1:] != diff[:-1]) + 1
    if diff[0]:
        edges = np.concatenate(([0], edges))
    if diff[-1]:
        edges = np.concatenate((edges, [size]))
    if edges.size // 2 * 3 > size:
        return None  # every pair costs at least 3 bytes
    if edges.size <= 2 * _FEW_RUNS:
        return _assemble_few(edges.tolist(), b, size, lax_end)
    return _assemble_many(edges, b, diff, size, lax_end)


def _limit(size: int, last_end: int, lax_end: int) -> int:
    """Longest output QEMU accepts when the last changed run ends at
    ``last_end``: 2 bytes of room are wanted again after it unless it ends
    the page (or, for the AVX512 encoder, ends at ``lax_end``)."""
    return size if last_end == size or last_end == lax_end else size - 2


def _assemble_few(edges, b: np.ndarray, size: int, lax_end: int) -> Optional[bytes]:
    data = memoryview(b)
    out = bytearray()
    prev_end = 0
    for k in range(0, len(edges), 2):
        start, end = edges[k], edges[k + 1]
        for n in (start - prev_end, end - start):
            if n < 0x80:
                out.append(n)
            elif n <= ULEB128_MAX:
                out += bytes(((n & 0x7F) | 0x80, n >> 7))
            else:
                return None
        out += data[start:end]
        prev_end = end
    if len(out) > _limit(size, prev_end, lax_end):
        return None
    return bytes(out)


def _assemble_many(edges: np.ndarray, b: np.ndarray, diff: np.ndarray,
                   size: int, lax_end: int) -> Optional[bytes]:
    starts = edges[0::2]
    ends = edges[1::2]
    nz = ends - starts
    z = starts - np.concatenate(([0], ends[:-1]))
    if int(nz.max()) > ULEB128_MAX or int(z.max()) > ULEB128_MAX:
        return None
    zl = 1 + (z >= 0x80)
    nl = 1 + (nz >= 0x80)
    pair_len = zl + nl + nz
    total = int(pair_len.sum())
    if total > _limit(size, int(ends[-1]), lax_end):
        return None
    out = np.empty(total, dtype=np.uint8)
    is_data = np.ones(total, dtype=bool)
    pos = np.cumsum(pair_len) - pair_len
    for lengths, width, at in ((z, zl, pos), (nz, nl, pos + zl)):
        two = width == 2
        out[at] = np.where(two, (lengths & 0x7F) | 0x80, lengths)
        is_data[at] = False
        at2 = at[two] + 1
        out[at2] = lengths[two] >> 7
        is_data[at2] = False
    out[is_data] = b[diff]
    return out.tobytes()


def decode(data, page, *, offset: int = 0) -> None:
    """Apply an encoded delta to ``page`` in place, all or nothing.

    Accepts and rejects exactly what QEMU's xbzrle_decode_buffer does, but
    checks the whole input before touching ``page``: QEMU would leave a
    half-patched page behind.  Error offsets are ``offset`` plus the position
    in ``data`` of the length field (or byte) at fault.  The record-level
    limit (encoded length <= page size) is the caller's check.
    """
    src = data if isinstance(data, bytes) else bytes(data)
    dst = _as_u8(page, writable=True)
    dlen = dst.size
    n = len(src)
    runs = []
    i = 0
    d = 0
    while i < n:
        if n - i < 2:
            raise XBZRLEError("data ends inside a run pair",
                              offset=offset + i,
                              expected="a zero-run length and a non-zero run",
                              found=f"{n - i} byte left")
        count = src[i]
        if count < 0x80:
            j = i + 1
        else:
            count, j = uleb128_decode(src, i, offset=offset)
        if i and not count:
            raise XBZRLEError("zero-length zero run after the first pair",
                              offset=offset + i, expected="a length >= 1",
                              found=0)
        d += count
        if d > dlen:
            raise XBZRLEError("zero run goes past the end of the page",
                              offset=offset + i,
                              expected=f"a length <= {dlen - (d - count)}",
                              found=count)
        i = j
        if n - i < 2:
            raise XBZRLEError("data ends before a non-zero run",
                              offset=offset + i,
                              expected="a non-zero run length and its bytes",
                              found=f"{n - i} byte(s) left")
        count = src[i]
        if count < 0x80:
            j = i + 1
        else:
            count, j = uleb128_decode(src, i, offset=offset)
        if not count:
            raise XBZRLEError("zero-length non-zero run", offset=offset + i,
                              expected="a length >= 1", found=0)
        if d + count > dlen:
            raise XBZRLEError("non-zero run goes past the end of the page",
                              offset=offset + i,
                              expected=f"a length <= {dlen - d}", found=count)
        if j + count > n:
            raise XBZRLEError("non-zero run goes past the end of the data",
                              offset=offset + i,
                              expected=f"a length <= {n - j}", found=count)
        runs.append((d, j, count))
        d += count
        i = j + count
    # Slice copies beat a numpy scatter at every run count a page can hold
    # (measured: 64 runs 64 us vs 96 us; 1000 runs 0.93 ms vs 1.04 ms).
    out = memoryview(dst)
    for d, j, count in runs:
        out[d:d + count] = src[j:j + count]


def decode_many(buf, starts, lengths, pages=None, *, page_size: Optional[int] = None,
                rows=None, offset: int = 0) -> None:
    """Apply many deltas at once: ``buf[starts[k]:starts[k] + lengths[k]]``
    to row ``rows[k]`` (default ``k``) of the (pages, size) uint8 array
    ``pages``.  ``pages=None`` only checks the deltas (``page_size`` then
    gives the size).  Rows must be distinct.

    Same acceptance and errors as ``decode`` on each delta in turn, and all
    or nothing.  Why: every delta's pairs are walked in lock step, one numpy
    pass per pair index instead of a Python step per pair; the first sign of
    trouble hands over to ``decode`` for the exact error.
    """
    b = _as_u8(buf)
    s = np.asarray(starts, dtype=np.int64).reshape(-1)
    e = s + np.asarray(lengths, dtype=np.int64).reshape(-1)
    count = s.size
    if pages is not None:
        if (not isinstance(pages, np.ndarray) or pages.dtype != np.uint8 or pages.ndim != 2
                or not pages.flags.c_contiguous):
            raise UsageError("pages must be a C-contiguous (pages, page size) uint8 array")
        flat = _as_u8(pages, writable=True)
        size = pages.shape[1]
    elif page_size is not None:
        size = page_size
    else:
        raise UsageError("decode_many needs pages or page_size")
    if count and (int(s.min()) < 0 or int(e.max()) > b.size):
        raise UsageError("a delta lies outside the buffer")
    # Spare bytes so reads past a delta's end stay inside the array; the
    # length checks reject whatever such reads produce.
    bp = np.zeros(b.size + 4, dtype=np.uint8)
    bp[:b.size] = b
    walked = _walk_short(bp, s, e, size, pages is not None)
    if walked is None:
        walked = _walk(bp, s, e, size)
    if walked is None:
        return _decode_each(b, s, e, pages, size, rows, offset)
    if pages is None:
        return None
    rec, at, src, c = walked
    if not rec.size:
        return None
    row = rec if rows is None else np.asarray(rows, dtype=np.int64)[rec]
    dst = row * size + at
    if int(c.max()) == 1:
        flat[dst] = b[src]
        return None
    step = np.arange(int(c.sum()), dtype=np.int64) - np.repeat(np.cumsum(c) - c, c)
    flat[np.repeat(dst, c) + step] = b[np.repeat(src, c) + step]
    return None


_TAIL = 8
"""When this few deltas are left to walk, the rest is walked in Python: one
numpy pass per pair index would cost more than a Python step per pair."""


def _walk_short(bp: np.ndarray, s: np.ndarray, e: np.ndarray, size: int, pairs: bool):
    """The pairs of every delta, when all lengths are one byte (the usual
    case: QEMU sends runs under 128 bytes): (delta, page position, data
    position, length) arrays (empty unless ``pairs``), or None if any delta
    needs a closer look."""
    rec = np.flatnonzero(e > s)
    pos = s[rec]
    end = e[rec]
    d = np.zeros(rec.size, dtype=np.int64)
    last_pos = np.empty(s.size, dtype=np.int64)
    last_d = np.empty(s.size, dtype=np.int64)
    steps = []
    tail = None
    same = True                    # every delta has the same number of pairs
    while rec.size:
        if rec.size <= _TAIL:
            tail = _walk_tail(bp, rec, pos, end, d, not steps, size)
            if tail is None:
                return None
            last_pos[rec] = end
            last_d[rec] = 0
            break
        z = bp[pos]
        data = pos + 2
        c = bp[pos + 1]
        nxt = data + c
        d = d + z + c
        steps.append((rec, z, c, d, data))
        more = nxt < end
        if more.all():
            pos = nxt
            continue
        done = ~more
        last_pos[rec[done]] = nxt[done]
        last_d[rec[done]] = d[done]
        if not more.any():
            break
        same = False
        rec, pos, end, d = rec[more], nxt[more], end[more], d[more]
    if not steps:
        return _EMPTY_WALK if tail is None or not pairs else tail
    live = steps[0][0]
    if not (np.array_equal(last_pos[live], e[live]) and int(last_d[live].max()) <= size):
        return None
    z = np.concatenate([st[1] for st in steps])
    c = np.concatenate([st[2] for st in steps])
    if not (((z | c) < 0x80).all() and c.all() and z[live.size:].all()):
        return None
    if not pairs:
        return _EMPTY_WALK
    n = len(steps)
    if same and n > 1 and tail is None:
        # Delta by delta rather than pair index by pair index: the page
        # writes then walk each page in turn (about 3x faster).
        def cat(k):
            return np.concatenate([st[k] for st in steps]).reshape(n, -1).T.reshape(-1)
        if int(c.max()) == 1:
            c = np.ones(c.size, dtype=np.int64)
        else:
            c = cat(2).astype(np.int64)
        at = cat(3)
        at -= c
        return np.repeat(live, n), at, cat(4), c

    def cat(k):
        return np.concatenate([st[k] for st in steps])
    c = c.astype(np.int64)
    out = (cat(0), cat(3) - c, cat(4), c)
    if tail is not None:
        out = tuple(np.concatenate(x) for x in zip(out, tail))
    return out


_EMPTY_WALK = (np.zeros(0, dtype=np.int64),) * 4


def _walk(bp: np.ndarray, s: np.ndarray, e: np.ndarray, size: int):
    """Like ``_walk_short`` for any valid delta; None if one is not."""
    rec = np.flatnonzero(e > s)
    pos = s[rec]
    end = e[rec]
    d = np.zeros(rec.size, dtype=np.int64)
    parts = []
    first = True
    while rec.size:
        if rec.size <= _TAIL:
            tail = _walk_tail(bp, rec, pos, end, d, first, size)
            if tail is None:
                return None
            parts.append(tail)
            break
        ok = end - pos >= 2
        b0 = bp[pos]
        b1 = bp[pos + 1]
        two = b0 >= 0x80
        z = np.where(two, (b0 & 0x7F) | (b1.astype(np.int64) << 7), b0)
        ok &= ~two | (b1 < 0x80)
        if not first:
            ok &= z != 0
        j = pos + 1 + two
        c0 = bp[j]
        c1 = bp[j + 1]
        ok &= end - j >= 2
        ctwo = c0 >= 0x80
        c = np.where(ctwo, (c0 & 0x7F) | (c1.astype(np.int64) << 7), c0)
        ok &= ~ctwo | (c1 < 0x80)
        ok &= c != 0
        data = j + 1 + ctwo
        nxt = data + c
        at = d + z
        d = at + c
        ok &= (nxt <= end) & (d <= size)
        if not ok.all():
            return None
        parts.append((rec, at, data, c))
        more = nxt < end
        if not more.all():
            rec, end, d, nxt = rec[more], end[more], d[more], nxt[more]
        pos = nxt
        first = False
    if not parts:
        return _EMPTY_WALK
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(4))


def _uleb_in(src: bytes, i: int, n: int):
    """(length, next index) of the one- or two-byte ULEB128 at ``src[i]``, with
    at least one byte left after it (a pair's second half, or data); (None, i)
    when there is no such length."""
    if n - i < 2:
        return None, i
    v = src[i]
    if v < 0x80:
        return v, i + 1
    if src[i + 1] < 0x80:
        return (v & 0x7F) | (src[i + 1] << 7), i + 2
    return None, i


def _walk_tail(bp: np.ndarray, rec, pos, end, d, first: bool, size: int):
    """The remaining pairs of deltas ``rec`` (at ``pos``, page position
    ``d``), one Python step per pair, with ``decode``'s checks; None if one
    is invalid."""
    out_rec, out_at, out_data, out_c = [], [], [], []
    for r, p, n, at in zip(rec.tolist(), pos.tolist(), (end - pos).tolist(), d.tolist()):
        src = bp[p:p + n].tobytes()
        i = 0
        lead = first               # at the delta's first pair (a zero run of 0 is allowed)
        while i < n:
            z, i = _uleb_in(src, i, n)
            if z is None or (not z and not lead):
                return None
            c, i = _uleb_in(src, i, n)
            if c is None:
                return None
            at += z
            if not c or at + c > size or i + c > n:
                return None
            out_rec.append(r)
            out_at.append(at)
            out_data.append(p + i)
            out_c.append(c)
            at += c
            i += c
            lead = False
    return tuple(np.array(x, dtype=np.int64) for x in (out_rec, out_at, out_data, out_c))


def _decode_each(b, s, e, pages, size, rows, offset):
    """Slow path: check every delta in order (raising the first error), then
    apply them."""
    scratch = bytearray(size)
    for k in range(s.size):
        decode(b[s[k]:e[k]], scratch, offset=offset + int(s[k]))
    if pages is None:
        return None
    for k in range(s.size):
        r = k if rows is None else int(rows[k])
        decode(b[s[k]:e[k]], pages[r], offset=offset + int(s[k]))
    return None
