"""Write a benchmark's section of docs/results.md and its records under benchmarks/results/."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADER = "# Results\n\nEach section is written by the benchmark it names.\n\n"


def write_results(name: str, records: list[dict], section: str) -> None:
    """Save ``records`` to ``benchmarks/results/NAME.json`` and put ``section`` between NAME's markers.

    The section replaces the previous one between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
    in docs/results.md, or is appended, so re-running a benchmark updates its own table only.
    """
    (REPO / "benchmarks/results").mkdir(parents=True, exist_ok=True)
    (REPO / f"benchmarks/results/{name}.json").write_text(json.dumps(records, indent=2) + "\n")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->\n"
    block = f"{start}\n{section.rstrip()}\n{end}"
    path = REPO / "docs/results.md"
    path.parent.mkdir(exist_ok=True)
    text = path.read_text() if path.exists() else HEADER
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text += "\n" + block
    path.write_text(text)
