"""The fault tests' figures as the docs table (ops/bench/fault_report.py): the last line of each
fault counts, the columns in order, and the docs section is replaced between its markers."""

from __future__ import annotations

import json

from ops.bench import fault_report


def _row(fault: str, finished: int, recovery: float | None) -> str:
    return json.dumps({"fault": fault, "requests": 20, "finished": finished, "retryable": 20 - finished, "cut": 0,
                       "error": 0, "hung": 0, "wrong": 0, "recovery_s": recovery, "note": ""})


def test_the_table_has_the_last_run_of_each_fault(tmp_path) -> None:
    report = tmp_path / "faults.jsonl"
    report.write_text("\n".join([_row("engine", 10, 9.0), _row("none", 20, None), _row("engine", 17, 12.5)]) + "\n")
    lines = fault_report.table(fault_report.rows(report)).splitlines()
    assert lines[2:] == ["| engine | 20 | 17 | 3 | 0 | 0 | 0 | 0 | 12.5 |  |",
                         "| none | 20 | 20 | 0 | 0 | 0 | 0 | 0 | - |  |"]


def test_write_docs_replaces_its_section(tmp_path, monkeypatch) -> None:
    report, doc = tmp_path / "faults.jsonl", tmp_path / "OPS.md"
    report.write_text(_row("none", 20, None) + "\n")
    doc.write_text("# Ops\n\n<!-- bench:faults:start -->\nold\n<!-- bench:faults:end -->\n\n## After\n")
    monkeypatch.setattr(fault_report, "OPERATIONS_MD", doc)
    assert fault_report.main([str(report), "--write-docs"]) == 0
    text = doc.read_text()
    assert "old" not in text and "| none | 20 | 20 |" in text and fault_report.COMMAND in text
    assert text.endswith("<!-- bench:faults:end -->\n\n## After\n")
