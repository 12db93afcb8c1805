"""bench/timeline.py on SuperNode logs written as deploy/supernode.py and deploy/worker.py write
them (Flower's console format with timestamps): the stages of each message, its phases and
what of a round is left to the ServerApp."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # as bench/deployment.py
import timeline  # noqa: E402


def node_log(start: float, *, objects: float, app: float, late: float = 0.0) -> str:
    """A node's log of a query and two train phases 10 s apart; stamps from ``start`` s."""
    lines, t = [], start

    def at(seconds: float, text: str) -> None:
        whole = int(seconds)
        lines.append(f"\x1b[92mINFO 2026-12-02 10:00:{whole:02d},{int(round((seconds - whole) * 1000)):03d}"
                     f"\x1b[0m:      {text}")

    at(t, "Receiving: query message (ID: q)")
    at(t + 0.1, "Received successfully")
    at(t + 0.2, "Sending: query message (ID: r)")
    at(t + 0.3, "Sent successfully")
    for phase in range(2):
        t = start + 1 + 10 * phase + late
        at(t, "Receiving: train message (ID: m)")
        at(t + objects, "Received successfully")
        at(t + objects + 0.1, "pflower worker: running train message of run 1")
        at(t + objects + 0.1 + app, f"pflower worker: done in {app + 0.1:.2f} s (0.5 s CPU): "
                                    f"pull 0.05 s, app {app:.2f} s, push 0.05 s")
        at(t + objects + 0.1 + app + 0.2, "Sending: train message (ID: n)")
        at(t + objects + 0.1 + app + 0.2 + 0.3, "Sent successfully")
    return "\n".join(lines) + "\nSupervisor line without a stamp\n"


def test_each_message_is_split_into_its_stages():
    got = timeline.messages(node_log(0, objects=0.5, app=2.0))
    assert [m.kind for m in got] == ["train", "train"]  # the query is left out
    stages = got[1].stages()
    assert stages == pytest.approx({"objects": 0.5, "handoff": 0.1, "app": 2.0, "push": 0.05,
                                    "upload": 0.3, "node": 3.1}, abs=2e-3)


def test_the_workers_line_may_come_after_the_supernodes_sent():
    lines = node_log(0, objects=0.5, app=2.0).splitlines()
    done = next(i for i, line in enumerate(lines) if "done in" in line)
    lines.insert(done + 2, lines.pop(done))  # after "Sending" and "Sent successfully"
    got = timeline.messages("\n".join(lines))
    assert len(got) == 2 and got[0].stages()["app"] == 2.0


def test_a_round_is_its_phases_and_the_servers_rest():
    logs = [node_log(0, objects=0.5, app=2.0), node_log(0, objects=0.5, app=4.0, late=1.0)]
    p = timeline.profile(logs, round_seconds=[12.0, 10.0])
    # After warm-up: the second phase; the late node received 1 s after the first and was done
    # at 1 + 0.5 + 0.1 + 4 + 0.2 + 0.3 = 6.1 s after the first received.
    assert p["skew"] == pytest.approx(1.0, abs=2e-3) and p["span"] == pytest.approx(6.1, abs=2e-3)
    assert p["round"] == 10.0 and p["phases"] == pytest.approx(6.1, abs=2e-3)
    assert p["server"] == pytest.approx(3.9, abs=2e-3) and p["messages"] == 2
    assert p["app"] == pytest.approx(3.0)  # the median of 2 s and 4 s
    assert "round 10.0 = phases 6.1 + ServerApp and gaps 3.9" in timeline.report("after", p)


def test_logs_without_timestamps_say_so():
    assert timeline.profile(["Receiving: train message (ID: m)\nSent successfully"], [1.0]) == {}
    assert "timestamps on?" in timeline.report("before", {})
