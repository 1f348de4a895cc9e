"""Reports of a conversation test run: readable text for people, JUnit XML for CI.

A failure reads, per failing test: the test (``FILE:LINE: name``), the turn (its number,
``FILE:LINE`` and input) and each expectation that did not hold, with its line, what
was expected and what came::

    FAIL workflows/tests/book_table.yaml:4: books a table for two
      turn 3 at workflows/tests/book_table.yaml:11: user: tomorrow
        workflows/tests/book_table.yaml:12: reply 1
          expected: At what time?
          got:      At what time? (for example 19:30 or 7pm)

Pure functions of the results, except :func:`write_junit`, which writes the file.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from commhub.core.conversation.runner import TestResult

__all__ = ["format_failure", "format_report", "junit_xml", "write_junit"]


def format_failure(result: TestResult) -> str:
    """The readable diff of a failed test (empty for one that did not fail)."""
    failure = result.failure
    if failure is None:
        return ""
    test = result.test
    lines = [f"FAIL {test.where}: {test.name}",
             f"  turn {failure.number} at {test.file}:{failure.step.line}: {failure.step.text}"]
    if failure.error is not None:
        lines.append(f"    error: {failure.error}")
    for m in failure.mismatches:
        lines.append(f"    {test.file}:{m.line}: {m.what}")
        lines.append(f"      expected: {m.expected}")
        lines.append(f"      got:      {m.got}")
    return "\n".join(lines)


def format_report(results: Sequence[TestResult], seconds: float, ready: str = "") -> str:
    """Counts per file, every failure and skip, how many expectations could not be
    checked and why, and a summary line (``12 passed, 1 failed, 2 skipped in 0.41 s``)."""
    out: list[str] = []
    by_file: dict[str, list[TestResult]] = {}
    for result in results:
        by_file.setdefault(result.test.file, []).append(result)
    for file, group in by_file.items():
        out.append(f"{file}: {_counts(group)}")
    for result in results:
        if result.status == "failed":
            out.extend(["", format_failure(result)])
    skipped = [r for r in results if r.status == "skipped"]
    if skipped:
        out.append("")
        out.extend(f"SKIP {r.test.where}: {r.test.name}: {r.reason}" for r in skipped)
    unchecked: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for note in (note for r in results for note in r.notes):
        unchecked.setdefault(note.reason, set()).add(note.kind)
        counts[note.reason] = counts.get(note.reason, 0) + 1
    if unchecked:
        out.append("")
        out.extend(f"note: {counts[reason]} expectations ({', '.join(sorted(kinds))}) not "
                   f"checked: {reason}" for reason, kinds in unchecked.items())
    out.append("")
    tail = f" ({ready})" if ready else ""
    out.append(f"{_counts(results) or 'no tests ran'} in {seconds:.2f} s{tail}")
    return "\n".join(out)


def junit_xml(results: Sequence[TestResult]) -> str:
    """JUnit XML: one ``testsuite`` per file, one ``testcase`` per test, a ``failure``
    with the readable diff, ``skipped`` with the reason, notes in ``system-out``."""
    root = ET.Element("testsuites", name="commhub conversation tests")
    by_file: dict[str, list[TestResult]] = {}
    for result in results:
        by_file.setdefault(result.test.file, []).append(result)
    total = failures = skips = 0
    total_time = 0.0
    for file, group in by_file.items():
        failed = sum(r.status == "failed" for r in group)
        skipped = sum(r.status == "skipped" for r in group)
        seconds = sum(r.seconds for r in group)
        suite = ET.SubElement(root, "testsuite", name=file, tests=str(len(group)),
                              failures=str(failed), errors="0", skipped=str(skipped),
                              time=f"{seconds:.3f}")
        for result in group:
            test = result.test
            case = ET.SubElement(suite, "testcase", name=test.name,
                                 classname=_classname(file), file=file, line=str(test.line),
                                 time=f"{result.seconds:.3f}")
            if result.status == "failed" and result.failure is not None:
                first = (result.failure.mismatches[0].what if result.failure.mismatches
                         else result.failure.error or "failed")
                element = ET.SubElement(case, "failure", type="ConversationMismatch",
                                        message=f"turn {result.failure.number}: {first}")
                element.text = format_failure(result)
            elif result.status == "skipped":
                ET.SubElement(case, "skipped", message=result.reason or "")
            if result.notes:
                ET.SubElement(case, "system-out").text = "\n".join(
                    f"{file}:{n.line}: '{n.kind}' not checked: {n.reason}" for n in result.notes)
        total += len(group)
        failures += failed
        skips += skipped
        total_time += seconds
    root.set("tests", str(total))
    root.set("failures", str(failures))
    root.set("errors", "0")
    root.set("skipped", str(skips))
    root.set("time", f"{total_time:.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")


def write_junit(results: Sequence[TestResult], path: Path) -> None:
    """Write :func:`junit_xml` to ``path`` (its folder must exist); OSError on failure."""
    path.write_text(junit_xml(results) + "\n", encoding="utf-8")


def _counts(results: Sequence[TestResult]) -> str:
    parts = []
    for status in ("passed", "failed", "skipped"):
        n = sum(r.status == status for r in results)
        if n:
            parts.append(f"{n} {status}")
    return ", ".join(parts)


def _classname(file: str) -> str:
    """``workflows/tests/book_table.yaml`` -> ``workflows.tests.book_table``."""
    path = Path(file)
    parts = [p for p in path.with_suffix("").parts if p not in (path.anchor, ".", "..")]
    return ".".join(parts) or path.stem
