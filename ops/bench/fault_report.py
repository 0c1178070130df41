"""The figures of the fault tests (tests/e2e/test_faults.py) as the table in docs/OPERATIONS.md:
per fault, the streams that finished, that failed with an explicit retryable error, that were cut
or failed otherwise, that hung, the finished answers that differ from the reference, and the time
until the application ran at its size again and answered.

  MOE_FAULT_REPORT=/tmp/faults.jsonl python -m pytest tests/e2e/test_faults.py -m slow -p no:cacheprovider
  python -m ops.bench.fault_report /tmp/faults.jsonl --write-docs

Each test run appends one JSON line per fault; the last line of each fault counts.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

from ops.bench.common import REPO_ROOT, machine_line, replace_section

OPERATIONS_MD = REPO_ROOT / "docs" / "OPERATIONS.md"
COMMAND = ("MOE_FAULT_REPORT=/tmp/faults.jsonl python -m pytest tests/e2e/test_faults.py -m slow -p no:cacheprovider"
           " && python -m ops.bench.fault_report /tmp/faults.jsonl --write-docs")
COLUMNS = ("requests", "finished", "retryable", "cut", "error", "hung", "wrong")


def rows(path: Path) -> list[dict]:
    latest: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            latest[row["fault"]] = row
    return list(latest.values())


def table(found: list[dict]) -> str:
    lines = ["| fault | streams | finished | failed, retryable | cut | other error | hung | wrong answers | "
             "recovery (s) | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in found:
        recovery = "-" if row.get("recovery_s") is None else f"{row['recovery_s']:.1f}"
        lines.append("| " + " | ".join([row["fault"], *(str(row[c]) for c in COLUMNS), recovery,
                                        row.get("note") or ""]) + " |")
    return "\n".join(lines)


def section(found: list[dict]) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Measured {when}; {machine_line(2)}.\n\n```\n{COMMAND}\n```\n\n{table(found)}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="the JSON lines the fault tests wrote ($MOE_FAULT_REPORT)")
    parser.add_argument("--write-docs", action="store_true", help="replace the table in docs/OPERATIONS.md")
    args = parser.parse_args(argv)
    found = rows(args.report)
    print(table(found))
    if args.write_docs:
        replace_section("faults", section(found), OPERATIONS_MD)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
