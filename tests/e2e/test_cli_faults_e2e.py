"""Runs a script can trust, through real `flwr run`s: exit status read from the SuperLink, a
failed job left out of a sweep's summary, and Ctrl-C that stops the run and leaves it resumable."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest

from task.run.runfolder import LOCK, read_status

from .conftest import ROOT, TINY

pytestmark = pytest.mark.slow


def _flwr_status(env: dict, log: str) -> list[str]:
    """The SuperLink's status of every run the launcher's output says it started."""
    statuses = []
    for run_id in re.findall(r"pflower-sim: run (\d+) started", log):
        out = subprocess.run(["flwr", "ls", "--run-id", run_id, "--format", "json"], env=env,
                             capture_output=True, text=True, cwd=ROOT).stdout
        statuses += [r["status"] for r in json.loads(out[out.index("{"):])["runs"]]
    return statuses


def test_a_sweep_with_a_failing_job_exits_1_and_reports_only_the_completed_one(flwr_runner, tmp_path):
    # round_timeout=0.001 passes the door and fails late: every reply comes after the round's
    # deadline, so no round aggregates (lr=1e30, used before, is refused at the door: issue 24).
    proc = subprocess.run(["pflower-sweep", TINY, "strategy=fedavg", "num_rounds=1",
                           "round_timeout=600,0.001",
                           "--out", str(tmp_path)], env=flwr_runner.env, capture_output=True, text=True,
                          cwd=ROOT, timeout=400)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    failed = next(d for d in tmp_path.iterdir() if d.name.endswith("round_timeout-0.001"))
    status = read_status(failed)
    assert status["status"] == "failed" and "no round aggregated" in status["error"]
    assert "run failed (finished:failed): RuntimeError: no round aggregated" in proc.stderr
    assert "1 of 2 jobs failed" in proc.stderr.strip().splitlines()[-1]
    summary = (tmp_path / "summary.md").read_text()
    assert "round_timeout=600" in summary and "0.001" not in summary
    assert sorted(_flwr_status(flwr_runner.env, proc.stdout)) == ["finished:completed", "finished:failed"]


def test_ctrl_c_stops_the_run_and_leaves_its_folder_resumable(flwr_runner, tmp_path):
    out, state = tmp_path / "run", tmp_path / "state"
    args = [TINY, "strategy=ditto", "num_rounds=40", f"client_state_dir={state}", f"output_dir={out}"]
    proc = subprocess.Popen(["pflower-sim", *args], env=flwr_runner.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.npz").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, log[-3000:]
    assert "resume it with the same overrides plus resume=" in log
    assert not (out / LOCK).exists() and read_status(out)["status"] == "stopped"
    assert _flwr_status(flwr_runner.env, log) == ["finished:stopped"]
    stopped_at = len((out / "metrics.jsonl").read_text().splitlines())
    time.sleep(3)  # nothing goes on writing in the background
    assert len((out / "metrics.jsonl").read_text().splitlines()) == stopped_at < 40
    resumed = subprocess.run(["pflower-sim", *args[:-3], f"num_rounds={stopped_at + 1}",
                              f"client_state_dir={state}", f"resume={out}"], env=flwr_runner.env,
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, stopped_at + 2))
    assert read_status(out)["status"] == "completed"
