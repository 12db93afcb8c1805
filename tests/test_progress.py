"""The progress display (task/run/progress.py): plain lines off a terminal, live bars on one."""

from __future__ import annotations

import io
import json
import logging

from flwr.common import log
from rich.console import Console

from task.run.local import log_to
from task.run.progress import MetricsTail, RunDisplay, progress_line

ROWS = [{"round": r, "train_loss": 1.0 / r, "personalized_accuracy": {"mean": 0.5, "worst": 0.25},
         "global_accuracy": 0.4, "seconds": 1.5} for r in (1, 2)]


def append(path, row: dict, newline: bool = True) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + ("\n" if newline else ""))


def test_off_a_terminal_each_round_is_one_plain_line(tmp_path):
    out = io.StringIO()
    with RunDisplay(2, tmp_path, Console(file=out, width=60)) as display:
        assert not display.bar
        display.on_message("train", 1, 4)
        for row in ROWS:
            append(tmp_path / "metrics.jsonl", row)
            display.log_line("pflower: a log line")
    lines = out.getvalue().splitlines()
    # each round's line whole (not wrapped at the console's 60 columns), before the log line after it
    assert lines == [progress_line(ROWS[0], 2), "pflower: a log line", progress_line(ROWS[1], 2),
                     "pflower: a log line"]
    assert "\x1b[" not in out.getvalue() and "━" not in out.getvalue()


def test_on_a_terminal_rounds_and_clients_are_bars(tmp_path):
    out = io.StringIO()
    with RunDisplay(2, tmp_path, Console(file=out, force_terminal=True, width=100)) as display:
        assert display.bar
        display.on_message("train", 0, 4)
        display.on_message("train", 3, 4)
        display.progress.refresh()
        clients = out.getvalue()
        append(tmp_path / "metrics.jsonl", ROWS[0])
        display.on_message("evaluate", 0, 4)
        display.progress.refresh()
    text = out.getvalue()
    assert "round 1: training" in clients and "3/4" in clients and "━" in clients
    assert "rounds" in text and "1/2" in text and "eta" in text
    assert "round 2: evaluating" in text  # the next round's phase, once round 1's row is in
    assert progress_line(ROWS[0], 2) in text


def test_the_tail_reads_whole_rows_once_and_starts_over_after_a_truncation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.new_rows() == []  # no file yet
    append(path, ROWS[0])
    append(path, ROWS[1], newline=False)  # being written
    assert [r["round"] for r in tail.new_rows()] == [1]
    with open(path, "a") as f:
        f.write("\n")
    assert [r["round"] for r in tail.new_rows()] == [2]
    assert tail.new_rows() == []
    path.write_text(json.dumps(ROWS[0]) + "\n")  # a resume truncated the rows after its checkpoint
    assert [r["round"] for r in tail.new_rows()] == [1]


def test_the_local_backends_log_goes_to_the_display_without_its_round_lines():
    shown: list[str] = []
    with log_to(shown.append):
        log(logging.INFO, "%s", progress_line(ROWS[0], 2))
        log(logging.INFO, "pflower: outputs in x")
        log(logging.WARNING, "no state on disk")
    assert shown == ["pflower: outputs in x", "WARNING: no state on disk"]
    assert any(isinstance(h, logging.StreamHandler) for h in logging.getLogger("flwr").handlers)


def test_a_resumed_runs_earlier_rounds_start_the_bar_and_the_eta_follows_the_new_ones(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append(path, ROWS[0])
    out = io.StringIO()
    with RunDisplay(4, tmp_path, Console(file=out, force_terminal=True, width=100)) as display:
        task = display.progress.tasks[display.rounds]
        assert task.completed == 1 and task.time_remaining is None  # round 1 is not this run's time
        for r in (2, 3):
            append(path, {**ROWS[0], "round": r})
            display.poll()
        assert task.completed == 3 and task.time_remaining is not None
    assert out.getvalue().count("round 1/4 |") == 1
