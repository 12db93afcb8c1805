"""What the user watching a run sees: a live bar of rounds with an ETA, or one line a round.

The display lives in the process the user watches, not in the ServerApp: under ``flwr run`` the
ServerApp runs inside the SuperLink's process and its output reaches the terminal only as log
lines streamed by ``flwr log`` (no terminal to draw on, and a bar redrawn through a log stream
would be a line per redraw). So pflower-sim draws it, from the run folder's ``metrics.jsonl``,
which every backend writes one row per finished round (``MetricsTail``); the local backend
runs the ServerApp in that very process and also reports each client's message as it is
answered (``RunDisplay.on_message``: a second bar, the round's clients).

On a terminal (or a notebook with ipywidgets) rich's live bars, each round's line printed
above them; elsewhere (a file, a pipe, CI) plain lines, one a round: ``progress_line``, what
the ServerApp logs. The log lines the display is handed (``RunDisplay.log``) go above the bars.
"""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

# The ServerApp's line a round as its log shows it (``INFO :  round 3/10 | ...``): where a display
# prints rounds from metrics.jsonl, the log's copy is left out.
PROGRESS_LINE = re.compile(r"^(\S+\s*:\s*)?round \d+/\d+ \|")
# rich estimates a bar's speed from its updates of the last this many seconds (its default, 30 s,
# would hold one sample of a minute-long round: no ETA ever); the ETA shows from the second round.
SPEED_WINDOW_S = 24 * 3600.0
PHASES = {"query": "finding the nodes", "train": "training", "train.personalize": "personalizing",
          "evaluate": "evaluating"}


def progress_line(row: dict, num_rounds: int) -> str:
    """One line a round: loss, personal accuracy (mean / worst), global accuracy, time."""
    parts = [f"round {row['round']}/{num_rounds}"]
    if row.get("train_loss") is not None:
        parts.append(f"train loss {row['train_loss']:.4f}")
    pers = row.get("personalized_accuracy")
    if pers:
        parts.append(f"personal acc {pers['mean']:.4f} (worst {pers['worst']:.4f})")
    if row.get("validation_accuracy"):
        parts.append(f"val acc {row['validation_accuracy']['mean']:.4f}")
    if row.get("global_accuracy") is not None:
        parts.append(f"global acc {row['global_accuracy']:.4f}")
    if row.get("rejected_replies"):
        parts.append(f"rejected {row['rejected_replies']}")
    parts.append(f"{row['seconds']:.2f}s")
    return " | ".join(parts)


class MetricsTail:
    """The rows appended to a run's metrics.jsonl since the last look (whole lines only)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0

    def new_rows(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:  # truncated: a resumed run drops the rows after its checkpoint
            self.offset = 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        whole = data[: data.rfind(b"\n") + 1]
        self.offset += len(whole)
        rows = []
        for line in whole.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # not a row (a torn write repaired later): the next look reads it again
        return rows


def wants_bar(console: Console) -> bool:
    """Whether ``console`` can show live bars: a terminal, or a notebook whose rich has its widgets."""
    if console.is_terminal:
        return True
    return console.is_jupyter and importlib.util.find_spec("ipywidgets") is not None


class RunDisplay:
    """The rounds of the run writing ``directory`` (``num_rounds`` of them), as bars or lines.

    A context manager: bars shown inside it. ``poll()`` reads the rows written since the last
    call; ``on_message`` (the local backend's ``LocalGrid`` hook) polls too and moves the
    clients' bar; ``log_line`` shows a line of the run's log after the rounds it follows.
    """

    def __init__(self, num_rounds: int, directory: Path, console: Console | None = None,
                 bar: bool | None = None):
        from rich.console import Console

        self.num_rounds = int(num_rounds)
        self.tail = MetricsTail(Path(directory) / "metrics.jsonl")
        self.console = console or Console()
        self.bar = wants_bar(self.console) if bar is None else bar
        self.last_round = 0
        self.lock = threading.Lock()
        self.progress: Progress | None = None
        self.rounds: TaskID | None = None
        self.clients: TaskID | None = None

    def __enter__(self) -> RunDisplay:
        for row in self.tail.new_rows():  # a resumed run's earlier rounds: shown, not timed
            self.log(progress_line(row, self.num_rounds))
            self.last_round = max(self.last_round, int(row["round"]))
        if self.bar:
            self._start_bars()
        return self

    def __exit__(self, *exc: object) -> None:
        self.poll()
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _start_bars(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=self.console, transient=False, speed_estimate_period=SPEED_WINDOW_S)
        self.rounds = self.progress.add_task("rounds", total=self.num_rounds, completed=self.last_round)
        self.clients = self.progress.add_task("clients", total=None, visible=False)
        self.progress.start()

    def poll(self) -> None:
        """Show the rounds finished since the last look."""
        with self.lock:  # pflower-sim's log thread polls too
            for row in self.tail.new_rows():
                self.round_done(row)

    def round_done(self, row: dict[str, Any]) -> None:
        done = int(row["round"])
        if done <= self.last_round:
            return
        self.last_round = done
        self.log(progress_line(row, self.num_rounds))
        if self.progress is not None:
            self.progress.update(self.rounds, completed=done)
            self.progress.update(self.clients, visible=False)

    def on_message(self, kind: str, done: int, total: int) -> None:
        """The ``done``-th of a phase's ``total`` messages was answered (``kind``: its type)."""
        self.poll()
        if self.progress is None:
            return
        description = f"  round {self.last_round + 1}: {PHASES.get(kind, kind)}"
        if done == 0:  # a new phase: its own clock for the ETA
            self.progress.reset(self.clients, total=total, description=description, visible=True)
        self.progress.update(self.clients, description=description, total=total, completed=done, visible=True)

    def log_line(self, line: str) -> None:
        """A line of the run's log, after the rounds it follows."""
        self.poll()
        self.log(line)

    def log(self, line: str) -> None:
        """Show a line above the bars (its ANSI colours kept on a terminal, dropped elsewhere)."""
        from rich.text import Text

        self.console.print(Text.from_ansi(line.rstrip("\n")), highlight=False, emoji=False, soft_wrap=True)
