"""Tables in README.md and docs/ that pflower-sweep wrote must have the header it writes today:
a column the code no longer computes (the old "best round (mean)") cannot linger in the docs."""

from __future__ import annotations

from pathlib import Path

from task.run.sweep import _write_tables

ROOT = Path(__file__).resolve().parents[1]
SWEEP_TABLE = "| run | seeds |"  # how every table pflower-sweep writes starts


def test_every_sweep_table_in_the_docs_has_the_header_the_sweep_writes(tmp_path):
    _write_tables([], tmp_path)
    header = (tmp_path / "summary.md").read_text().splitlines()[0]
    found = 0
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith(SWEEP_TABLE):
                found += 1
                assert line == header, f"{path.relative_to(ROOT)}:{number}: {line!r} is not {header!r}"
    assert found >= 2  # README's default-federation table and docs/results/default-federation.md
