"""``pflower-sim backend=local`` (task/run/local.py): exit statuses, Ctrl-C, resume."""

from __future__ import annotations

import json
import os
import signal

import pytest

from task.run.launch import main
from task.run.local import LocalOutcome, exit_status
from task.run.progress import RunDisplay
from task.run.runfolder import read_status

from .helpers import TINY


def rounds(out) -> list[int]:
    return [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # two in-process runs (~10 s)
def test_ctrl_c_stops_a_local_run_before_its_next_message_and_it_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = [*TINY.split(), "backend=local", "strategy=fedavg", "num_rounds=2", f"output_dir={out}"]
    shown = RunDisplay.on_message

    def ctrl_c_as_round_2_starts(self, kind: str, done: int, total: int) -> None:
        shown(self, kind, done, total)
        if kind == "train" and done == 0 and self.last_round == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RunDisplay, "on_message", ctrl_c_as_round_2_starts)
    callers = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN under a shell's `&`
    assert main(args) == 130
    assert read_status(out)["status"] == "stopped" and rounds(out) == [1]
    assert f"resume={out}" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is callers  # the caller's handler back
    monkeypatch.undo()
    assert main([*args, f"resume={out}"]) == 0
    assert read_status(out)["status"] == "completed" and rounds(out) == [1, 2]
    assert "round 2/2 | train loss" in capsys.readouterr().out


def test_what_the_local_backend_refuses_or_only_checks(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--ray-address", "10.0.0.1:6379", "backend=local", f"output_dir={out}"]) == 2
    assert "--ray-address needs backend=flwr" in capsys.readouterr().err
    assert main(["backend=ray"]) == 2
    assert "backend='ray': expected one of ['flwr', 'local']" in capsys.readouterr().err
    assert main(["--dry-run", "backend=local", *TINY.split(), f"output_dir={out}"]) == 0
    assert "backend=local: 4 clients in this process" in capsys.readouterr().out
    assert not out.exists()


def test_a_failed_local_run_exits_1_with_its_error_last(tmp_path, capsys):
    assert exit_status(LocalOutcome("failed", tmp_path, None, "RuntimeError: no round aggregated")) == 1
    assert capsys.readouterr().err.strip().endswith("RuntimeError: no round aggregated")
    assert exit_status(LocalOutcome("stopped", tmp_path, signal.SIGTERM)) == 143


def test_the_callers_torch_settings_are_put_back_after_a_local_run():
    import torch

    from task.run.local import process_settings_kept

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with process_settings_kept():  # what the ClientApp handlers do (client_threads=1, deterministic)
        torch.set_num_threads(1)
        torch._C._set_deterministic_algorithms(not deterministic, warn_only=True)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
