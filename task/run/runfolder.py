"""One run per output folder: a lock while a run writes to it, and a status a script can read.

A run claims its output folder before writing anything:

- a folder that already holds files is refused unless the run resumes it (``resume=<dir>``),
  so that two runs never mix in one ``metrics.jsonl``;
- ``.pflower.lock`` (created atomically, ``O_EXCL``) names the holder: host, process id, time.
  A second run or resume on a locked folder is refused with the holder's name. A lock whose
  holder is a process of this host that no longer exists (a run killed with SIGKILL) is stale
  and taken over, with a log line;
- ``status.json`` says ``running``, then ``completed``, ``failed`` (with the error) or
  ``stopped``; reports and sweeps read it, and skip runs that did not complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
import time
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common import log

from task.run.outputs import atomic_write_text

LOCK = ".pflower.lock"
STATUS = "status.json"
# pflower-sim asks the run to stop by creating this file (the ServerApp looks before every
# message it sends: the stop acts within a round, not after Flower's own `flwr stop` path).
STOP = ".pflower.stop"
# Flower's and Ray's lines of the run, as pflower-sim followed them (task/run/flower_run.py).
FLOWER_LOG = "flower.log"
# Files a folder may hold and still count as empty: what a user or a launcher puts there first.
IGNORED = {".DS_Store", LOCK, STOP, FLOWER_LOG}


class RunFolderError(RuntimeError):
    """The output folder cannot be used by this run (holds another run, or is locked)."""


def read_status(directory: Path) -> dict[str, Any] | None:
    """The folder's ``status.json`` (None if there is none or it cannot be read)."""
    try:
        return json.loads((Path(directory) / STATUS).read_text())
    except (OSError, ValueError):
        return None


def read_lock(directory: Path) -> dict[str, Any] | None:
    """Who holds the folder's lock (None if nobody does)."""
    try:
        return json.loads((Path(directory) / LOCK).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"host": "?", "pid": -1, "since": "?"}  # being written, or torn: still a lock


def holder_alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's holder may still run (a process of another host is assumed alive)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A process that has exited but not been reaped still answers ``kill(pid, 0)``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def describe(holder: dict[str, Any]) -> str:
    return f"process {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"


def _probe_writable(directory: Path) -> None:
    """Create and remove a file in ``directory``: the only test that answers for ACLs, read-only
    mounts and root squash alike (``os.access`` does not); raises the OSError."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=".pflower-probe-")
    os.close(fd)
    os.unlink(name)


def check_writable(directory: Path) -> None:
    """Refuse a folder that is a file, or that this user cannot create or write (checked on the
    nearest folder that exists), before Flower starts rather than 80 s later inside it."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = f"output_dir={directory}" if existing == directory else f"output_dir={directory}: {existing}"
        raise RunFolderError(f"{where} is a file, not a folder; choose another output_dir")
    try:
        _probe_writable(existing)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise RunFolderError(f"output_dir={directory}: cannot write in {existing} ({reason}); choose a "
                             "folder this user can write") from None


def check_free(directory: Path, resume: bool, handover: str = "") -> None:
    """Refuse a folder that holds another run (unless resuming it) or is locked by a live run
    (but for the lock ``pflower-sim`` took for this very run: its ``handover`` token)."""
    directory = Path(directory)
    check_writable(directory)
    holder = read_lock(directory)
    if holder is not None and handover and holder.get("token") == handover:
        holder = None
    if holder is not None and holder_alive(holder):
        raise RunFolderError(f"{directory} is locked by a run in progress: {describe(holder)}; "
                             f"wait for it, stop it, or remove {directory / LOCK} if that process is gone")
    if resume:
        return
    present = sorted(p.name for p in directory.iterdir() if p.name not in IGNORED) \
        if directory.is_dir() else []
    if present:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise RunFolderError(f"output_dir={directory} already holds files ({shown}): one run per folder. "
                             f"Pass resume={directory} (with the run's own overrides) to continue that "
                             "run, or choose an empty or new output_dir")


class RunFolder:
    """The claimed output folder of one run (see the module docstring)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.held = False
        self.launcher: dict[str, Any] = {}

    def stop_requested(self) -> str | None:
        """Why the run should stop now: pflower-sim asked (``STOP``), or the pflower-sim that
        launched it is gone (SIGKILL: nobody would follow or stop the run); None: go on."""
        if (self.dir / STOP).exists():
            return (self.dir / STOP).read_text().strip() or "stop asked by pflower-sim"
        if self.launcher.get("launcher") and not self.launcher_alive():
            return f"pflower-sim (process {self.launcher['launcher']}) that launched the run is gone"
        return None

    def launcher_alive(self) -> bool:
        """Whether the pflower-sim whose door lock this run took over still runs."""
        pid = self.launcher.get("launcher")
        return bool(pid) and holder_alive({"host": self.launcher.get("host"), "pid": pid})

    def claim(self, resume: bool, handover: str = "") -> None:
        """Check the folder is free for this run, then lock it and mark it running.

        ``handover``: the token of the lock ``pflower-sim`` took at its door for this run; that
        lock is taken over (the launcher's pid kept as ``launcher``: the run stops if it dies).
        """
        check_free(self.dir, resume, handover)
        self.dir.mkdir(parents=True, exist_ok=True)
        me: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        (self.dir / STOP).unlink(missing_ok=True)  # a stop asked of an earlier run of the folder
        stale = read_lock(self.dir)
        if stale is not None and handover and stale.get("token") == handover:
            me.update(token=handover, launcher=stale.get("pid"))
            atomic_write_text(self.dir / LOCK, json.dumps(me))  # a rename: never a moment unlocked
            self.held = True
            self.launcher = me
            self.set_status("running", resumed=resume)
            return
        if stale is not None:
            log(WARNING, "pflower: taking over the stale lock of %s (that process is gone)", describe(stale))
            (self.dir / LOCK).unlink(missing_ok=True)
        try:
            fd = os.open(self.dir / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            raise RunFolderError(f"{self.dir} was just locked by another run: "
                                 f"{describe(read_lock(self.dir) or {})}") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        self.held = True
        self.set_status("running", resumed=resume)

    def set_status(self, status: str, **details: Any) -> None:
        payload = {"status": status, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **details}
        atomic_write_text(self.dir / STATUS, json.dumps(payload, indent=1))

    def release(self) -> None:
        """Remove the lock (only the one this run holds)."""
        if self.held:
            (self.dir / LOCK).unlink(missing_ok=True)
            self.held = False


def claim_at_door(directory: Path) -> str:
    """Lock the folder for a run ``pflower-sim`` is about to submit; return the handover token
    the ServerApp presents to take the lock over (``RunFolder.claim``). A second run into the same
    folder is thus refused at its door, not ~100 s later when its ServerApp starts."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stale = read_lock(directory)
    if stale is not None and not holder_alive(stale):
        (directory / LOCK).unlink(missing_ok=True)
    token = os.urandom(8).hex()
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
          "token": token}
    try:
        fd = os.open(directory / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        raise RunFolderError(f"{directory} is locked by a run in progress: "
                             f"{describe(read_lock(directory) or {})}; wait for it or stop it") from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me))
    return token


def release_door_claim(directory: Path, token: str) -> None:
    """Remove the door's lock if no ServerApp took it over (the run was never submitted, or
    failed before claiming), and the folder if that left it empty (it was made for the run)."""
    directory = Path(directory)
    holder = read_lock(directory)
    if holder is not None and holder.get("token") == token and holder.get("pid") == os.getpid():
        (directory / LOCK).unlink(missing_ok=True)
    (directory / STOP).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()  # only when empty


def release_dead_lock(directory: Path) -> bool:
    """Remove a lock whose holder (a process of this host) is gone; mark a run that was still
    ``running`` as ``stopped``. True if a lock was removed."""
    holder = read_lock(directory)
    if holder is None or holder_alive(holder):
        return False
    (Path(directory) / LOCK).unlink(missing_ok=True)
    status = read_status(directory)
    if status is not None and status.get("status") == "running":
        RunFolder(directory).set_status("stopped", detail="the run was stopped; resume it with resume=<dir>")
    return True
