"""The ``qemuram`` command line: a thin layer over the library.

Exit codes: 0 success, 1 invalid stream (or verification failed / streams
differ), 2 usage error (bad arguments, unreadable paths, unsupported request).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional

from . import __version__
from .errors import QemuramError, StreamError, UsageError

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


class Progress:
    """A one-line progress indicator on stderr, shown only on a terminal."""

    def __init__(self, label: str, total: Optional[int], enabled: Optional[bool] = None):
        self.label = label
        self.total = total
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-6) / 1e6
        if self.total:
            pct = min(100.0, 100.0 * done / self.total)
            bar = "#" * int(pct / 5)
            sys.stderr.write(f"\r{self.label} [{bar:<20}] {pct:5.1f}% {rate:7.1f} MB/s")
        else:
            sys.stderr.write(f"\r{self.label} {done / 1e6:10.1f} MB {rate:7.1f} MB/s")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.last:
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()


def _size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if t and t[-1] in mult:
        return int(t[:-1], 0) * mult[t[-1]]
    return int(t, 0)


def _pairs(items: Optional[List[str]], what: str) -> Dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise UsageError(f"{what} takes NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def _input_size(path: str) -> Optional[int]:
    """Stream size for a percentage, when the file is the stream itself."""
    try:
        if path == "-":
            return None
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"QEVM":          # compressed or a container: size unknown
            return None
        return os.path.getsize(path)
    except OSError:
        return None


def _open(args, *, verify=False, workdir=None, file_names=None, content=True, placement=None):
    from .stream import open as qopen, verify as qverify
    if args.stream != "-" and not os.path.exists(args.stream):
        raise UsageError(f"no such file: {args.stream}")
    bps = {k: _size(v) for k, v in _pairs(getattr(args, "block_page_size", None),
                                           "--block-page-size").items()}
    prog = Progress("decoding", _input_size(args.stream), getattr(args, "progress", None))
    try:
        if not content:
            return qverify(args.stream, page_size=getattr(args, "page_size", None),
                           block_page_sizes=bps or None, snapshot=getattr(args, "snapshot", None),
                           progress=prog)
        return qopen(args.stream, page_size=getattr(args, "page_size", None),
                     block_page_sizes=bps or None, snapshot=getattr(args, "snapshot", None),
                     workdir=workdir, file_names=file_names, verify=verify, progress=prog,
                     placement=placement)
    finally:
        prog.done()


def _sha256(block) -> str:
    """SHA-256 of a block's content, read in bounded chunks (holes read as zeros)."""
    h = hashlib.sha256()
    step = 16 << 20
    zero = memoryview(bytes(step))
    buf = memoryview(bytearray(step))         # reused: no fresh memory per chunk
    P = block.target_page_size
    for i in range(0, block.size, step):
        n = min(step, block.size - i)
        if not block.written[i // P:(i + n + P - 1) // P].any():
            h.update(zero[:n])
        else:
            block.read_into(i, buf[:n])
            h.update(buf[:n])
    return h.hexdigest()


def _block_dict(b, with_hash: bool) -> dict:
    d = {"name": b.name, "size": b.size, "page_size": b.page_size,
         "host_page_size": b.host_page_size, "gpa": b.gpa, "addr": b.addr,
         "records": dict(b.counts), "pages_sent": int(b.sent.sum())}
    if with_hash:
        d["sha256"] = _sha256(b)
    return d


def _summary(st, with_hash: bool) -> dict:
    return {
        "format": st.format,
        "machine": st.machine,
        "page_size": st.page_size,
        "page_size_source": st.page_size_source,
        "capabilities": st.capabilities,
        "stream_size": st.size,
        "container": st.container,
        "postcopy_advise": (None if st.postcopy_advise is None else
                            {"host_page_sizes": st.postcopy_advise[0],
                             "target_page_size": st.postcopy_advise[1]}),
        "vmdesc": st.vmdesc is not None,
        "ramblocks": [_block_dict(b, with_hash) for b in st.ram.values()],
        "sections": st.sections,
        "commands": st.commands,
        "notes": st.notes,
    }


def cmd_info(args) -> int:
    with _open(args) as st:
        info = _summary(st, args.hash)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    w = sys.stdout.write
    cont = info["container"] or {}
    w(f"format:        {info['format']}" + (f" (inside {cont['kind']})" if cont.get("kind") not in
                                             (None, "plain") else "") + "\n")
    w(f"machine:       {info['machine']}\n")
    w(f"page size:     {info['page_size']} (from {info['page_size_source']})\n")
    w(f"capabilities:  {', '.join(info['capabilities']) or '-'}\n")
    w(f"stream size:   {info['stream_size']} bytes\n")
    kinds: Dict[str, int] = {}
    for s in info["sections"]:
        kinds[s["type"]] = kinds.get(s["type"], 0) + 1
    w("sections:      " + ", ".join(f"{k} {v}" for k, v in kinds.items()) + "\n")
    cmds: Dict[str, int] = {}
    for c in info["commands"]:
        cmds[c["command"]] = cmds.get(c["command"], 0) + 1
    w("commands:      " + (", ".join(f"{k} {v}" for k, v in cmds.items()) or "-") + "\n")
    w("ramblocks:\n")
    w(f"  {'name':<24} {'size':>12} {'page':>8} {'zero':>8} {'page':>8} {'xbzrle':>7}"
      f" {'mapped':>8}" + ("  sha256" if args.hash else "") + "\n")
    for b in info["ramblocks"]:
        r = b["records"]
        w(f"  {b['name']:<24} {b['size']:>#12x} {b['page_size']:>8} {r['zero']:>8} "
          f"{r['page']:>8} {r['xbzrle'] + r['compressed']:>7} {r['mapped']:>8}"
          + (f"  {b['sha256']}" if args.hash else "") + "\n")
    for n in info["notes"]:
        w(f"note: {n}\n")
    return EXIT_OK


def cmd_verify(args) -> int:
    result = {"stream": args.stream, "valid": False, "roundtrip": False}
    try:
        with _open(args, content=False) as st:
            result.update(valid=True, roundtrip=bool(st.roundtrip), format=st.format,
                          machine=st.machine, page_size=st.page_size, stream_size=st.size,
                          ramblocks=len(st.ram), notes=st.notes)
            if not st.roundtrip:
                result["error"] = {"type": "RoundTripMismatch",
                                   "message": "re-encoding differs from the input",
                                   "offset": st.roundtrip_mismatch}
    except StreamError as err:
        result["error"] = err.to_dict()
    ok = result["valid"] and result["roundtrip"]
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif ok:
        print(f"{args.stream}: valid {result['format']} stream, {result['stream_size']} bytes, "
              f"{result['ramblocks']} ramblocks; re-encodes to identical bytes")
    else:
        print(f"{args.stream}: INVALID: {_err_text(result['error'])}", file=sys.stderr)
    return EXIT_OK if ok else EXIT_INVALID


def _err_text(e: dict) -> str:
    parts = [e["type"] + ":"]
    if e.get("offset") is not None:
        parts.append(f"at byte {e['offset']}")
    parts.append(e["message"])
    if e.get("expected") is not None:
        parts.append(f"(expected {e['expected']}" + (f", found {e['found']})" if e.get("found")
                                                     is not None else ")"))
    return " ".join(parts)


def cmd_extract(args) -> int:
    out = os.path.abspath(args.output)
    if args.format != "raw":
        return _extract_physical(args, out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"{args.output} exists and is not an empty directory")
    parent = os.path.dirname(out) or "."
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.qemuram-", dir=parent)
    try:
        with _open(args, workdir=tmp) as st:
            manifest = {"stream": args.stream, "format": st.format, "machine": st.machine,
                        "page_size": st.page_size, "capabilities": st.capabilities,
                        "ramblocks": []}
            for b in st.ram.values():
                d = _block_dict(b, args.hash)
                d["file"] = os.path.basename(b.path)
                manifest["ramblocks"].append(d)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o755)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if args.json:
        json.dump(manifest, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for b in manifest["ramblocks"]:
            print(f"{b['file']:<32} {b['size']:>#12x}  {b['name']}")
        print(f"manifest: {os.path.join(args.output, 'manifest.json')}")
    return EXIT_OK


def _extract_physical(args, out: str) -> int:
    from . import elfcore
    with _open(args) as st:
        phys = st.physical
        writer = elfcore.write_elf_core if args.format == "elf" else elfcore.write_raw_physical
        writer(out, phys)
        ranges = [{"gpa": r.gpa, "length": r.length, "block": r.block,
                   "block_offset": r.block_offset} for r in phys.ranges]
    if args.json:
        json.dump({"output": args.output, "format": args.format, "ranges": ranges}, sys.stdout,
                  indent=2)
        sys.stdout.write("\n")
    else:
        for r in ranges:
            print(f"0x{r['gpa']:012x}-0x{r['gpa'] + r['length']:012x}  {r['block']}"
                  f"+0x{r['block_offset']:x}")
        print(f"wrote {args.output} ({args.format})")
    return EXIT_OK


def cmd_convert(args) -> int:
    from .canonical import CanonicalWriter, DirectMappedRam, write_atomic
    host_ps = {k: _size(v) for k, v in _pairs(args.host_page_size, "--host-page-size").items()}
    replaces = _pairs(args.replace, "--replace")
    if args.output != "-" and os.path.isdir(args.output):
        raise UsageError(f"{args.output} is a directory")
    options = dict(zero_pages=args.zero_pages, compact=args.compact, host_page_sizes=host_ps)
    report = {}

    def convert(out, direct=None) -> int:
        with _open(args, placement=direct.placement if direct else None) as st:
            for name, spec in replaces.items():
                path, _, off = spec.partition("@")
                if name not in st.ram:
                    raise UsageError(f"--replace: no block named {name!r}; "
                                     f"blocks: {', '.join(st.ram)}")
                with open(path, "rb") as f:
                    data = f.read()
                st.ram[name].write(_size(off) if off else 0, data)
            if direct is not None and direct.areas is not None:
                writer = direct.writer(st)
            else:
                writer = CanonicalWriter(st, layout=args.to, **options)
            prog = Progress("writing", None, getattr(args, "progress", None))
            if out is sys.stdout.buffer:
                n = writer.write(out, sparse=False, progress=prog)
                out.flush()
            else:
                n = writer.write(out, progress=prog)
            prog.done()
            report.update({"input": args.stream, "output": args.output, "input_size": st.size,
                           "output_size": n, "saved": st.size - n, "format": writer.layout,
                           "zero_pages": writer.zero_pages})
            return n

    if args.output == "-":
        n = convert(sys.stdout.buffer)
    else:
        # To mapped-ram from a sequential stream, pages are decoded straight
        # into the output's page areas (no scratch image).
        n = write_atomic(args.output,
                         lambda f: convert(f, DirectMappedRam(f, **options)
                                           if args.to == "mapped-ram" else None),
                         sync=args.sync)
    if args.json:
        json.dump(report, sys.stdout if args.output != "-" else sys.stderr, indent=2)
        (sys.stdout if args.output != "-" else sys.stderr).write("\n")
    elif args.output != "-":
        print(f"wrote {args.output}: {n} bytes ({report['format']}; "
              f"input {report['input_size']} bytes, saved {report['saved']})")
    return EXIT_OK


def cmd_diff(args) -> int:
    import numpy as np
    a_args = argparse.Namespace(**vars(args))
    b_args = argparse.Namespace(**vars(args))
    a_args.stream, b_args.stream = args.a, args.b
    with _open(a_args) as a, _open(b_args) as b:
        blocks = []
        differ = False
        for name in list(dict.fromkeys([*a.ram, *b.ram])):
            ba, bb = a.ram.get(name), b.ram.get(name)
            if ba is None or bb is None or ba.size != bb.size:
                differ = True
                blocks.append({"name": name, "only_in": "a" if bb is None else "b" if ba is None
                               else None, "size_a": ba and ba.size, "size_b": bb and bb.size})
                continue
            P = ba.target_page_size
            diff_pages: List[int] = []
            count = 0
            for s in range(0, ba.npages, 4096):
                n = min(4096, ba.npages - s)
                if not (ba.written[s:s + n].any() or bb.written[s:s + n].any()):
                    continue
                d = np.flatnonzero((ba.read_pages(s, n) != bb.read_pages(s, n))
                                   .any(axis=1)) + s
                count += int(d.size)
                if len(diff_pages) < args.limit:
                    diff_pages += d[:args.limit - len(diff_pages)].tolist()
            differ |= count > 0
            blocks.append({"name": name, "pages": ba.npages, "differing_pages": count,
                           "first_offsets": [p * P for p in diff_pages]})
    if args.json:
        json.dump({"a": args.a, "b": args.b, "identical": not differ, "ramblocks": blocks},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for bl in blocks:
            if "differing_pages" not in bl:
                print(f"{bl['name']}: sizes differ ({bl['size_a']} vs {bl['size_b']})")
            elif bl["differing_pages"]:
                offs = ", ".join(f"0x{o:x}" for o in bl["first_offsets"])
                print(f"{bl['name']}: {bl['differing_pages']} of {bl['pages']} pages differ; "
                      f"first at {offs}")
            else:
                print(f"{bl['name']}: identical")
    return EXIT_INVALID if differ else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qemuram",
        description="Read, check and rewrite QEMU migration / savevm streams, with guest RAM "
                    "decoded. STREAM may be a stream file, '-' for stdin, a gzip/xz-compressed "
                    "stream, a libvirt save image or a qcow2 image with internal snapshots.",
        epilog="exit codes: 0 ok, 1 invalid stream (or verify/diff found a difference), "
               "2 usage error")
    p.add_argument("--version", action="version", version=f"qemuram {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp, stream=True):
        if stream:
            sp.add_argument("stream", metavar="STREAM", help="input stream ('-' for stdin)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.add_argument("--page-size", type=_size, metavar="BYTES",
                        help="target page size, for streams that do not say it")
        sp.add_argument("--block-page-size", action="append", metavar="BLOCK=SIZE",
                        help="host page size of a block, for ambiguous postcopy streams")
        sp.add_argument("--snapshot", metavar="NAME",
                        help="internal snapshot to read from a qcow2 image (default: the last)")
        sp.add_argument("--progress", action="store_true", default=None,
                        help="show progress even when stderr is not a terminal")

    sp = sub.add_parser("info", help="describe a stream: format, machine, sections, ramblocks",
                        description="Describe a stream: format, machine, page size, "
                                    "capabilities, sections, commands, and per ramblock its "
                                    "size, page size and record counts.")
    common(sp)
    sp.add_argument("--hash", action="store_true", help="SHA-256 of each block's final content")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("verify", help="decode fully and check it re-encodes byte for byte",
                        description="Decode every record (pages, XBZRLE, device sections) and "
                                    "check that re-encoding gives the input's exact bytes. "
                                    "Exit 0 only when both hold.")
    common(sp)
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("extract", help="write guest memory: one raw file per block, or an ELF",
                        description="Write the final guest memory: by default one raw (sparse) "
                                    "file per ramblock plus manifest.json in DIR; with --format "
                                    "elf an ELF core of guest-physical memory (x86 pc/q35), "
                                    "with --format raw-physical a flat sparse image.")
    common(sp)
    sp.add_argument("-o", "--output", required=True, metavar="OUT",
                    help="output directory (raw) or file (elf, raw-physical)")
    sp.add_argument("--format", choices=["raw", "elf", "raw-physical"], default="raw")
    sp.add_argument("--hash", action="store_true",
                    help="record each block's SHA-256 in manifest.json (reads every byte)")
    sp.set_defaults(func=cmd_extract)

    sp = sub.add_parser("convert", help="re-encode canonically (layout, zero pages, page sizes)",
                        description="Re-encode a stream the way QEMU 10 writes a paused guest, "
                                    "keeping device state. OUT may be '-' for stdout.")
    common(sp)
    sp.add_argument("output", metavar="OUT", help="output stream file ('-' for stdout)")
    sp.add_argument("--to", choices=["sequential", "mapped-ram"], default=None,
                    help="output layout (default: the input's)")
    sp.add_argument("--zero-pages", choices=["records", "full"], default=None,
                    help="zero pages as ZERO records or as full pages (default: as the input)")
    sp.add_argument("--compact", action="store_true",
                    help="one pass with each page once (drops repeated iterations)")
    sp.add_argument("--host-page-size", action="append", metavar="BLOCK=SIZE",
                    help="rewrite a block's postcopy host page-size field (e.g. pc.ram=2M)")
    sp.add_argument("--replace", action="append", metavar="BLOCK=FILE[@OFFSET]",
                    help="write FILE's bytes into BLOCK at OFFSET before encoding")
    sp.add_argument("--sync", action="store_true",
                    help="fsync the output before renaming it into place (durable on power "
                         "loss; the rename alone already means no partial file)")
    sp.set_defaults(func=cmd_convert)

    sp = sub.add_parser("diff", help="compare the guest memory of two streams page by page",
                        description="Compare the final guest memory of two streams; exit 1 "
                                    "when they differ.")
    sp.add_argument("a", metavar="A")
    sp.add_argument("b", metavar="B")
    common(sp, stream=False)
    sp.add_argument("--limit", type=int, default=8, help="offsets to list per block")
    sp.set_defaults(func=cmd_diff)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    import gc
    gc.disable()        # short-lived process, few cycles: collections only cost time
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except StreamError as err:
        if getattr(args, "json", False):
            json.dump({"valid": False, "error": err.to_dict()}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        print(f"qemuram: invalid stream: {err}", file=sys.stderr)
        return EXIT_INVALID
    except (UsageError, QemuramError) as err:
        print(f"qemuram: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error of ours.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except OSError as err:
        print(f"qemuram: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
