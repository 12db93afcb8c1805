"""Issue 24: pflower-sim's run, its folder, its stop and what it leaves behind, without `flwr run`
(each costs ~30 s): the launcher's pieces and the real ServerApp over the in-process grid."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

import server_app
from task.engine.checkpoint import CHECKPOINT, CHECKPOINT_META
from task.run import flower_run, launch, sweep
from task.run.outputs import current_umask
from task.run.runfolder import LOCK, STOP, claim_at_door, read_lock, read_status

from .fake_grid import FakeGrid
from .helpers import TINY


def _serve(overrides: str, launcher: str = "", grid: FakeGrid | None = None) -> None:
    server_app.main(grid or FakeGrid(4, overrides),
                    Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                            run_config={"overrides": overrides, "launcher": launcher}))


def _checkpoint_round(directory: Path) -> int:
    with np.load(directory / CHECKPOINT, allow_pickle=False) as data:
        return json.loads(bytes(data[CHECKPOINT_META]).decode())["round"]


def test_a_second_run_into_the_same_new_folder_is_refused_at_its_door(capsys, monkeypatch, tmp_path):
    folder = tmp_path / "new"
    seen: dict[str, int] = {}

    def submit(run):  # the first run is in flight: a second pflower-sim into the same folder
        seen["second"] = launch.main([TINY, f"output_dir={folder}"])
        seen["lock"] = read_lock(folder)["pid"]
        return None

    monkeypatch.setattr(flower_run.FlowerRun, "submit", submit)
    assert launch.main([TINY, f"output_dir={folder}"]) == 1  # (this fake submit fails)
    assert seen == {"second": 2, "lock": os.getpid()}
    assert f"{folder} is locked by a run in progress: process {os.getpid()}" in capsys.readouterr().err
    assert not folder.exists()  # the door's claim is given back, and the folder it made


def test_the_serverapp_takes_the_doors_lock_over_and_nobody_else_can(tmp_path):
    run = f"{TINY} strategy=fedavg num_rounds=1 output_dir={tmp_path / 'r'}"
    token = claim_at_door(tmp_path / "r")
    with pytest.raises(RuntimeError, match="locked by a run in progress"):
        _serve(run)  # a `flwr run` by hand into the folder pflower-sim holds
    _serve(run, launcher=token)
    assert read_status(tmp_path / "r")["status"] == "completed" and read_lock(tmp_path / "r") is None


class _StopAt(FakeGrid):
    """Creates the stop file (as pflower-sim does on Ctrl-C) at its ``at``-th push."""

    def __init__(self, overrides: str, folder: Path, at: int):
        super().__init__(4, overrides)
        self.folder, self.at, self.count = folder, at, 0

    def push_messages(self, messages):
        self.count += 1
        if self.count == self.at:
            (self.folder / STOP).write_text("stopped by SIGINT to pflower-sim")
        return super().push_messages(messages)


def test_a_stop_acts_before_the_next_message_and_the_run_resumes(tmp_path):
    out = tmp_path / "r"
    run = f"{TINY} strategy=fedavg num_rounds=6 output_dir={out}"
    grid = _StopAt(run, out, at=4)
    _serve(run, grid=grid)
    status = read_status(out)
    assert status["status"] == "stopped" and "SIGINT" in status["detail"]
    assert grid.count == 4 and _checkpoint_round(out) < 6 and read_lock(out) is None
    done = _checkpoint_round(out)
    _serve(f"{run} resume={out}")
    assert read_status(out)["status"] == "completed" and _checkpoint_round(out) == 6 > done


def test_a_run_whose_pflower_sim_is_gone_stops_by_itself(tmp_path):
    out = tmp_path / "r"
    run = f"{TINY} strategy=fedavg num_rounds=3 output_dir={out}"
    token = claim_at_door(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    lock = json.loads((out / LOCK).read_text())
    (out / LOCK).write_text(json.dumps({**lock, "pid": int(dead)}))  # pflower-sim got SIGKILL
    _serve(run, launcher=token)
    assert read_status(out)["status"] == "stopped"
    assert f"pflower-sim (process {dead}) that launched the run is gone" in read_status(out)["detail"]


def test_a_stop_after_the_last_round_reports_what_the_folder_says(capsys, tmp_path):
    out = tmp_path / "r"
    _serve(f"{TINY} strategy=fedavg num_rounds=1 output_dir={out}")
    code = launch.outcome({"status": "finished:completed"}, out, signal.SIGINT)
    assert code == 0 and "completed (the stop came after its last round)" in capsys.readouterr().out
    (out / "status.json").write_text(json.dumps({"status": "stopped"}))
    assert launch.outcome({"status": "finished:completed"}, out, signal.SIGTERM) == 143
    assert "run stopped (stopped); resume it" in capsys.readouterr().err


def test_the_log_follower_dies_with_pflower_sim(tmp_path):
    # a parent that starts a child as FlowerRun.start_log does, then is SIGKILLed
    code = ("import subprocess, sys, time; from task.run.flower_run import _die_with_parent;"
            "p = subprocess.Popen(['sleep', '60'], preexec_fn=_die_with_parent); print(p.pid, flush=True);"
            "time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and not _zombie(child):
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or _zombie(child)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_stop_superlink_stops_it_and_what_it_started(capsys, monkeypatch):
    link = subprocess.Popen(["sleep", "60"])
    exec_ = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--parent-pid",
                              str(link.pid)])
    monkeypatch.setattr(launch, "local_superlink", lambda: (link.pid, None))
    assert "--stop-superlink" in flower_run.superlink_note(link.pid)
    assert f"pid {link.pid}" in flower_run.superlink_note(link.pid)
    assert launch.main(["--stop-superlink"]) == 0
    assert link.wait(timeout=15) is not None and exec_.wait(timeout=15) is not None
    assert f"processes [{min(link.pid, exec_.pid)}, {max(link.pid, exec_.pid)}]" in capsys.readouterr().out


def test_flowers_noise_goes_to_the_log_file_only_and_no_colours_into_files(capsys, tmp_path):
    lines = ["\x1b[92mINFO \x1b[0m:      pflower: round 1/2 | train loss 0.5\n",
             "WARNING :   Manually terminating ClientAppActor\n",
             "/x/ray/_private/worker.py:1: FutureWarning: something\n",
             "  warnings.warn(\n",
             "Successfully installed pflower to /root/.flwr/apps/x.\n",
             "ERROR :     ClientApp raised an exception\n"]
    run = flower_run.FlowerRun([], tmp_path, {})
    run._copy_log(io.StringIO("".join(lines)))
    shown = capsys.readouterr().out
    assert "pflower: round 1/2" in shown and "ClientApp raised" in shown
    assert "Manually" not in shown and "FutureWarning" not in shown and "Successfully" not in shown
    assert "\x1b" not in shown  # not a terminal: no colours
    written = (tmp_path / "flower.log").read_text()
    assert "\x1b" not in written and "Manually terminating ClientAppActor" in written


def test_one_mode_for_every_file_of_a_run_folder(tmp_path):
    out = tmp_path / "r"
    _serve(f"{TINY} strategy=fedavg num_rounds=1 output_dir={out}")
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.is_file()}
    assert set(modes.values()) == {oct(0o666 & ~current_umask())}, modes


def test_a_sweep_job_refused_at_the_door_is_not_pointed_at_a_folder(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(launch, "main", lambda arguments: 2)
    _, failed = sweep.run_jobs([["lr=0.1"]], tmp_path)
    err = capsys.readouterr().err
    assert failed == ["lr-0.1"] and "it never started, so it has no folder; its message is above" in err
    assert "status.json" not in err


def test_a_superlink_started_in_another_checkout_is_refused(capsys, monkeypatch, tmp_path):
    other = tmp_path / "checkout-a"  # what Ray would put first on every ClientApp's sys.path
    other.mkdir()
    (other / "client_app.py").write_text("raise SystemExit('checkout A ran')\n")
    link = subprocess.Popen(["sleep", "60"], cwd=other)
    try:
        monkeypatch.setattr(launch, "local_superlink", lambda: (link.pid, None))
        monkeypatch.setattr(flower_run.FlowerRun, "submit", lambda run: pytest.fail("submitted"))
        assert launch.main([TINY]) == 2
        err = capsys.readouterr().err
        assert f"(pid {link.pid}) runs in {other}, which holds client_app.py" in err
        assert "--stop-superlink" in err and len(err.strip().splitlines()) == 1
        monkeypatch.setattr(launch, "ROOT", other)  # a SuperLink started in this very checkout
        assert launch.superlink_code_problem() is None
    finally:
        link.kill()
        link.wait()
