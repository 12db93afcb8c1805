"""One submitted Flower run as ``pflower-sim`` follows it: its log, its stop, what it leaves running.

- The log: ``flwr log --stream`` is read line by line; every line goes, without ANSI colours,
  to ``<run folder>/flower.log``; the terminal gets pflower's lines and Flower's errors, not
  the notices every run repeats (``NOISE``), through the progress display
  (task/run/progress.py), which shows the rounds from the folder's metrics.jsonl. The
  ``flwr log`` process dies with pflower-sim
  (``PR_SET_PDEATHSIG``): a SIGKILL of pflower-sim leaves no orphan following the log.
- The stop: Ctrl-C / SIGTERM creates ``<run folder>/.pflower.stop``, which the ServerApp reads
  before every message it sends (``server_app.WatchedGrid``): the run stops within a round,
  keeping the last finished round's checkpoint. ``flwr stop`` follows once the folder says
  ``stopped`` (so that the SuperLink's record agrees), or ``STOP_GRACE_S`` later if it never
  does. A ServerApp whose pflower-sim is gone (SIGKILL) stops
  the same way by itself.
- What stays: ``flwr run`` starts a local SuperLink and its SuperExec processes and leaves them
  running for the next run; ``superlink_note`` says so, ``stop_superlink`` stops them
  (``pflower-sim --stop-superlink``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from task.run.progress import PROGRESS_LINE
from task.run.runfolder import FLOWER_LOG, STOP, read_status

if TYPE_CHECKING:
    from task.run.progress import RunDisplay

POLL_S = 2.0
STOP_GRACE_S = 30.0  # then `flwr stop`: a ServerApp stuck in one long wait does not see the file
STOP_WAIT_S = 120.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# Lines every run repeats that say nothing about this run (kept in flower.log all the same).
NOISE = re.compile("|".join([
    r"Manually terminating ClientAppActor",
    r"Successfully installed \S+ to ",
    r"FutureWarning", r"^\s*warnings\.warn\(",
    r"default simulated SuperNodes", r"simulated SuperNodes\)$", r"To change federation size",
    r"flwr federation simulation-config", r"^Using SuperLink: ", r"Starting logstream for run_id",
    r"^(INFO|WARNING|DEBUG)\s*:\s*$",  # Flower's empty lines
]), re.IGNORECASE)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when pflower-sim dies, however it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def show(line: str, to_terminal: bool) -> bool:
    """Whether a line of the run's log is shown on the terminal (it always goes to the file)."""
    return to_terminal and not NOISE.search(ANSI.sub("", line))


class FlowerRun:
    """One submitted Flower run: its log followed, its status polled, stopped on a signal."""

    def __init__(self, command: list[str], directory: Path, env: dict[str, str],
                 display: RunDisplay | None = None):
        self.command, self.directory, self.env = command, directory, env
        self.display = display  # None: the log's lines straight to stdout
        self.run_id: str | None = None
        self.signal: int | None = None
        self.log_proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def submit(self) -> str | None:
        """Submit the run; its id, or None (Flower's own message printed)."""
        command = [c for c in self.command if c != "--stream"] + ["--format", "json"]
        proc = subprocess.run(command, env=self.env, capture_output=True, text=True)
        try:
            reply = json.loads(proc.stdout[proc.stdout.index("{"):])
        except ValueError:
            reply = {}
        if proc.returncode != 0 or not reply.get("success"):
            print(ANSI.sub("", proc.stdout + proc.stderr), file=sys.stderr)
            return None
        self.run_id = str(reply["run-id"])
        print(f"pflower-sim: run {self.run_id} started; outputs in {self.directory} (Flower's own log: "
              f"{self.directory / FLOWER_LOG})", flush=True)
        return self.run_id

    def status(self) -> dict:
        """The run's record on the SuperLink (``flwr ls``); {} if it cannot be read now."""
        proc = subprocess.run(["flwr", "ls", "--run-id", str(self.run_id), "--format", "json"],
                              env=self.env, capture_output=True, text=True)
        try:
            runs = json.loads(proc.stdout[proc.stdout.index("{"):]).get("runs", [])
        except ValueError:
            return {}
        return runs[0] if runs else {}

    def start_log(self) -> None:
        """``flwr log --stream`` into flower.log and (less the noise) onto the terminal."""
        self.log_proc = subprocess.Popen(["flwr", "log", str(self.run_id), "--stream"], env=self.env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         errors="replace", preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._copy_log, args=(self.log_proc.stdout,), daemon=True)
        self._reader.start()

    def _copy_log(self, stream) -> None:
        terminal = sys.stdout
        colours = terminal.isatty()
        with open(self.directory / FLOWER_LOG, "a") as log_file:
            for line in stream:
                log_file.write(ANSI.sub("", line))
                log_file.flush()
                if not show(line, True):
                    continue
                if self.display is None:
                    terminal.write(line if colours else ANSI.sub("", line))
                    terminal.flush()
                elif not PROGRESS_LINE.match(ANSI.sub("", line)):  # the display prints the rounds
                    self.display.log_line(line)

    def request_stop(self) -> None:
        """Ask the ServerApp to stop before its next message (see the module docstring)."""
        print(f"\npflower-sim: stopping run {self.run_id} after its last finished round; Ctrl-C again to "
              "quit at once", file=sys.stderr, flush=True)
        name = signal.Signals(self.signal).name if self.signal else "a signal"
        (self.directory / STOP).write_text(f"stopped by {name} to pflower-sim")

    def follow(self) -> dict:
        """Stream the run's log until the SuperLink says it finished; return its record.

        ``flwr log --stream`` ends when the run ends; only then (or if the stream breaks) is the
        SuperLink asked for the status, since every ``flwr ls`` costs a Python start.
        """
        self.start_log()
        asked = flwr_stopped = None
        record: dict = {}
        while True:
            if self.signal is not None and asked is None:
                self.request_stop()
                asked = time.monotonic()
            # The ServerApp has stopped (status.json says so): `flwr stop` now, so that the
            # SuperLink's record says stopped too, not the completed a returning ServerApp leaves.
            if asked is not None and flwr_stopped is None and (
                    time.monotonic() - asked > STOP_GRACE_S
                    or (read_status(self.directory) or {}).get("status") == "stopped"):
                subprocess.run(["flwr", "stop", str(self.run_id)], env=self.env, capture_output=True)
                flwr_stopped = time.monotonic()
            if asked is not None and time.monotonic() - asked > STOP_WAIT_S:
                print(f"pflower-sim: run {self.run_id} did not stop within {STOP_WAIT_S:.0f}s",
                      file=sys.stderr)
                break
            if self.display is not None:
                self.display.poll()
            if self.log_proc.poll() is None:  # still streaming: the run goes on
                time.sleep(0.2)
                continue
            record = self.status() or record
            if str(record.get("status", "")).startswith("finished"):
                break
            time.sleep(POLL_S)
        self._end_log()
        return record

    def _end_log(self) -> None:
        if self.log_proc is None:
            return
        try:
            self.log_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.log_proc.terminate()
            self.log_proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)

    def on_signal(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.signal is not None:  # the second one: quit at once
            if self.log_proc is not None:
                self.log_proc.kill()
            os._exit(128 + signum)
        self.signal = signum


# --------------------------------------------------------------------------- the local SuperLink


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def superlink_processes(superlink_pid: int) -> list[int]:
    """The local SuperLink and the processes it started (SuperExec: ``--parent-pid <pid>``, and
    its children), found in /proc."""
    children: dict[int, list[int]] = {}
    found = {superlink_pid}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        args = _cmdline(pid)
        if "--parent-pid" in args[:-1] and args[args.index("--parent-pid") + 1] == str(superlink_pid):
            found.add(pid)
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


def superlink_note(superlink_pid: int) -> str:
    """What pflower-sim leaves running, and how to stop it."""
    pids = superlink_processes(superlink_pid)
    mb = sum(_rss_mb(p) for p in pids)
    return (f"the local SuperLink (pid {superlink_pid}) and its SuperExec ({len(pids)} processes, "
            f"{mb:.0f} MB) keep running for the next run; `pflower-sim --stop-superlink` stops them")


def stop_superlink(superlink_pid: int, wait_s: float = 10.0) -> list[int]:
    """SIGTERM the local SuperLink and what it started, SIGKILL what is left after ``wait_s``."""
    pids = superlink_processes(superlink_pid)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return pids
