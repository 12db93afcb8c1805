"""`pflower-sweep --comparison` for real: two rows of PFML's table, one round, 4 clients, in-process."""

from __future__ import annotations

import pytest

from task.run.sweep import main

pytestmark = pytest.mark.slow


def test_a_comparison_writes_one_row_per_method_with_the_papers_figure(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["--comparison", "pfml_mnist", "--methods", "pfml,fedavg", "num_rounds=1",
                 "partition.num_clients=4", "backend=local", "--out", str(out)]) == 0
    lines = (out / "summary.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[:2] for r in rows] == [["| pfml", "99.07"], ["| fedavg", "94.86"]]
    assert lines[lines.index(rows[0]) - 2].startswith("| method | paper | seeds |")
    assert "left out by --methods: pfedme" in "\n".join(lines)
    assert (out / "pfml").is_dir() and (out / "summary.csv").exists() and (out / "summary.png").exists()
    # run again: both jobs are done already, nothing reruns
    assert main(["--comparison", "pfml_mnist", "--methods", "pfml,fedavg", "num_rounds=1",
                 "partition.num_clients=4", "backend=local", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("done already") == 2
