#!/usr/bin/env python3
"""Print the "proven" table of the paused-guest integration matrix (Markdown).

    python -m pytest tests/integration/test_matrix.py -n 2 --junitxml=/tmp/x.xml
    python tests/integration/proven_table.py /tmp/x.xml

The rows are the case definitions of ``tests/integration/matrix.py``; the
result of each comes from the pytest result file: a junit XML file
(``--junitxml``) or a JSON report (pytest-json-report's ``--json-report-file``,
or any JSON list of ``{"nodeid", "outcome", "user_properties"}``). Only cases
whose test passed are marked proven. The QEMU version is the one the test
recorded (``record_property("qemu_version")``).

Exit status: 0 when the table was printed (whatever the results), 2 when the
result file cannot be read. ``--strict`` exits 1 unless every case is proven.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from tests.integration import matrix as M  # noqa: E402

TEST_MODULE = "test_matrix"


@dataclass
class Result:
    outcome: str                      # passed, failed, error, skipped, xfail, xpass
    message: str = ""
    properties: List[Tuple[str, str]] = field(default_factory=list)

    def props(self, name: str) -> List[str]:
        return [v for k, v in self.properties if k == name]


def _outcome_junit(tc: ET.Element) -> Tuple[str, str]:
    for tag in ("failure", "error"):
        el = tc.find(tag)
        if el is not None:
            return ("failed" if tag == "failure" else "error"), el.get("message", "")
    el = tc.find("skipped")
    if el is not None:
        kind = el.get("type", "")
        msg = el.get("message", "")
        if kind == "pytest.xfail" or msg.startswith("xfail"):
            return "xfail", msg
        return "skipped", msg
    return "passed", ""


def read_junit(path: str) -> Dict[str, Result]:
    root = ET.parse(path).getroot()
    out: Dict[str, Result] = {}
    for tc in root.iter("testcase"):
        if not tc.get("classname", "").split(".")[-1] == TEST_MODULE:
            continue
        outcome, msg = _outcome_junit(tc)
        props = [(p.get("name", ""), p.get("value", "")) for p in tc.iter("property")]
        name = tc.get("name", "")
        prev = out.get(name)
        # a test with a failing teardown appears twice: keep the worst
        if prev is not None and prev.outcome != "passed":
            continue
        out[name] = Result(outcome, msg, props)
    return out


def read_json(path: str) -> Dict[str, Result]:
    with open(path) as f:
        data = json.load(f)
    tests = data.get("tests", []) if isinstance(data, dict) else data
    out: Dict[str, Result] = {}
    for t in tests:
        nodeid = t.get("nodeid", "")
        if f"{TEST_MODULE}.py::" not in nodeid:
            continue
        props: List[Tuple[str, str]] = []
        for p in t.get("user_properties", []) or []:
            if isinstance(p, dict):
                props += [(str(k), str(v)) for k, v in p.items()]
            elif isinstance(p, (list, tuple)) and len(p) == 2:
                props.append((str(p[0]), str(p[1])))
        msg = ""
        for phase in ("setup", "call", "teardown"):
            ph = t.get(phase) or {}
            if ph.get("outcome") not in (None, "passed"):
                msg = str(ph.get("longrepr") or ph.get("crash", {}).get("message", ""))[:200]
                break
        outcome = t.get("outcome", "")
        outcome = {"xfailed": "xfail", "xpassed": "xpass"}.get(outcome, outcome)
        out[nodeid.split("::", 1)[1]] = Result(outcome, msg, props)
    return out


def read_results(path: str) -> Dict[str, Result]:
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"<"):
        return read_junit(path)
    return read_json(path)


def _mib(n: int) -> str:
    return f"{n >> 30} GiB" if n % (1 << 30) == 0 else f"{n >> 20} MiB"


def backend_text(c: M.Case) -> str:
    text = f"{c.backend} ({_mib(c.memory)})"
    for d in c.dimms:
        text += f" + {d.id} {d.backend} share={'on' if d.share else 'off'} ({_mib(d.size)})"
    if c.transport == "relay":
        text += ", via recording relay"
    return text


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def result_text(c: M.Case, r: Optional[Result]) -> str:
    if r is None:
        return "not run"
    if r.outcome == "passed":
        extra = []
        match = r.props("canonical_match")
        if match:
            extra.append("canonical " + ("byte-exact" if match[-1] == "bytes"
                                         else "record-equal"))
        bad = r.props("bad_inputs")
        if bad:
            extra.append(f"{bad[-1].split(' ')[0]} bad inputs rejected")
        return "**proven**" + (f" ({'; '.join(extra)})" if extra else "")
    if r.outcome == "xfail":
        return f"xfail: {r.message}"
    if r.outcome == "skipped":
        return f"skipped: {r.message}"
    done = r.props("proven")
    tail = f"; passed before the failure: {', '.join(done)}" if done else ""
    return f"{r.outcome.upper()}: {r.message[:160]}{tail}"


def table(results: Dict[str, Result]) -> Tuple[str, int, int]:
    rows = ["| case | QEMU version | machine | backend | capabilities | direction(s) | result |",
            "|---|---|---|---|---|---|---|"]
    proven = 0
    for c in M.CASES:
        r = results.get(c.node_name)
        version = (r.props("qemu_version") or ["—"])[-1] if r else "—"
        if r is not None and r.outcome == "passed":
            proven += 1
        rows.append("| " + " | ".join(_cell(x) for x in (
            c.id, version, c.machine, backend_text(c), c.settings_text,
            ", ".join(c.directions), result_text(c, r))) + " |")
    return "\n".join(rows), proven, len(M.CASES)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="pytest junit XML or JSON report of test_matrix.py")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 unless every case of the matrix is proven")
    args = ap.parse_args(argv)
    try:
        results = read_results(args.results)
    except (OSError, ET.ParseError, ValueError) as exc:
        print(f"proven_table: cannot read {args.results}: {exc}", file=sys.stderr)
        return 2
    text, proven, total = table(results)
    print(text)
    print()
    print(f"{proven} of {total} cases proven (source: {os.path.basename(args.results)}; "
          "only cases whose test passed are marked proven)")
    return 1 if args.strict and proven != total else 0


if __name__ == "__main__":
    sys.exit(main())
