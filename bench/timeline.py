"""Where a deployed round's time goes, read off the SuperNodes' timestamped logs.

deploy/supernode.py and deploy/worker.py put a timestamp on every log line; each SuperNode
handles one message at a time, so its log is a sequence of messages, each

    Receiving: <type> message      the SuperNode has the message (its header) from the SuperLink
    Received successfully          ... and its objects (the arrays)               -> objects
    pflower worker: running ...    the worker has claimed the task and its input  -> handoff
    pflower worker: done in ...    the ClientApp ran (app) and its reply went to the SuperNode
                                   (push: the worker's own figure; logged once the task's
                                   output is pushed too, so often after the next line)
    Sending: <type> message        the SuperNode has the reply
    Sent successfully              ... and has uploaded it to the SuperLink        -> upload

A phase (the k-th message of one type at every node) lasts from the first node's
``Receiving`` to the last node's ``Sent``; ``skew`` is how much later than the first the last
node received its message (the ServerApp pushing one node's message after another, and each
SuperNode's poll for new messages). A round's seconds less its phases' spans is the
ServerApp's own time: configuring, pushing before the first node has its message, pulling
the replies after the last upload, aggregating.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from datetime import datetime

STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
RECEIVING = re.compile(r"Receiving: (\S+) message")
RUNNING = re.compile(r"pflower worker: running (\S+) message")
DONE = re.compile(r"pflower worker: done in ([\d.]+) s \(([\d.]+) s CPU\): (.*)")
SENDING = re.compile(r"Sending: (\S+) message")
STAGES = ("objects", "handoff", "app", "push", "upload")


@dataclass
class Handled:
    """One message at one SuperNode: its type and the times (s) of its steps."""

    kind: str
    at: dict[str, float] = field(default_factory=dict)
    worker: dict[str, float] = field(default_factory=dict)  # the worker's pull, app, push

    def stages(self) -> dict[str, float]:
        at = self.at
        return {"objects": at["got"] - at["recv"], "handoff": at["run"] - at["got"],
                "app": self.worker.get("app", 0.0), "push": self.worker.get("push", 0.0),
                "upload": at["sent"] - at["send"], "node": at["sent"] - at["recv"]}


def stamp(line: str) -> float | None:
    m = STAMP.search(line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def messages(log: str) -> list[Handled]:
    """The complete messages in one SuperNode's log, in order (queries left out). The worker's
    "done" line may come after the SuperNode's "Sent" (even after the next "Receiving"): it
    belongs to the message the worker ran last."""
    done: list[Handled] = []
    current: Handled | None = None
    ran: Handled | None = None  # the message the worker said it runs, last
    for line in log.splitlines():
        t = stamp(line)
        if t is None:
            continue
        if m := RECEIVING.search(line):
            current = Handled(m.group(1), {"recv": t})
        elif m := DONE.search(line):
            if ran is not None and "done" not in ran.at:
                ran.at["done"] = t
                ran.worker = {k: float(v) for k, v in (p.split(" ")[:2] for p in m.group(3).split(", "))}
        elif current is None:
            continue
        elif "Received successfully" in line:
            current.at["got"] = t
        elif RUNNING.search(line):
            current.at["run"], ran = t, current
        elif SENDING.search(line):
            current.at["send"] = t
        elif "Sent successfully" in line:
            current.at["sent"] = t
            if current.kind != "query" and {"got", "run", "send"} <= set(current.at):
                done.append(current)
            current = None
    return done


def phases(node_logs: list[str]) -> list[list[Handled]]:
    """The phases in order of their start: the k-th message of a type at every node."""
    by_key: dict[tuple[str, int], list[Handled]] = {}
    for log in node_logs:
        seen: dict[str, int] = {}
        for msg in messages(log):
            k = seen[msg.kind] = seen.get(msg.kind, -1) + 1
            by_key.setdefault((msg.kind, k), []).append(msg)
    return sorted(by_key.values(), key=lambda p: min(m.at["recv"] for m in p))


def profile(node_logs: list[str], round_seconds: list[float]) -> dict[str, float]:
    """Medians after warm-up (each node's first message of a type, and round 1, left out):
    per message the STAGES and ``node`` (receiving to sent); per phase ``span`` and ``skew``;
    per round ``phases`` (the sum of its phases' spans), ``server`` (the rest) and ``round``."""
    all_phases = phases(node_logs)
    warm = [p for p in all_phases if not _first_of_kind(p, all_phases)]
    per_message = [m.stages() for p in warm for m in p]
    spans = [max(m.at["sent"] for m in p) - min(m.at["recv"] for m in p) for p in warm]
    skews = [max(m.at["recv"] for m in p) - min(m.at["recv"] for m in p) for p in warm]
    rounds = round_seconds[1:] or round_seconds
    per_round = sum(spans) / max(len(rounds), 1)
    out = {k: statistics.median([s[k] for s in per_message]) for k in (*STAGES, "node")
           } if per_message else {}
    if spans:
        out |= {"span": statistics.median(spans), "skew": statistics.median(skews),
                "phases": per_round, "round": statistics.median(rounds),
                "server": statistics.median(rounds) - per_round, "messages": len(per_message)}
    return out


def _first_of_kind(phase: list[Handled], ordered: list[list[Handled]]) -> bool:
    return next(p for p in ordered if p[0].kind == phase[0].kind) is phase


def report(name: str, p: dict[str, float]) -> str:
    if not p:
        return f"    {name}: no complete message in the SuperNodes' logs (timestamps on?)"
    stages = "  ".join(f"{k} {p[k]:.2f}" for k in STAGES)
    return (f"    {name} timeline (median s, {p['messages']:.0f} messages after warm-up): {stages} "
            f"= {p['node']:.2f} per message at a node\n"
            f"    {name} phase: {p['span']:.2f} first receive to last sent, last node receives "
            f"{p['skew']:.2f} after the first; round {p['round']:.1f} = phases {p['phases']:.1f} "
            f"+ ServerApp and gaps {p['server']:.1f}")
