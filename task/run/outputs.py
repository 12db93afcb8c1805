"""Run outputs: one directory with the resolved config, per-round metrics, results and plots."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime
from logging import WARNING
from pathlib import Path
from typing import Any, BinaryIO

from omegaconf import DictConfig, OmegaConf

from task.run import figures
from task.run.client_table import CLIENTS_CSV, ClientInfo, csv_text


def default_output_dir(cfg: DictConfig) -> Path:
    """``outputs/<date-time>-<strategy>-<dataset>`` unless the config names a directory."""
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser().resolve()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("outputs", f"{stamp}-{cfg.strategy.name}-{cfg.dataset.name}").resolve()


def current_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, racing threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` so that a reader never sees a half-written file:
    into a temporary file in the same directory, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        # mkstemp makes the file 0600; every file of a run folder gets what open() gives
        # (0666 less the umask), whichever way it was written: one rule for the whole folder.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def jsonable(value: Any) -> Any:
    """Floats that JSON can carry (NaN and inf become null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


SELECTION_RULE = "best round = highest mean validation accuracy; its test accuracy is reported"
NO_SELECTION = ("no validation data (val_fraction = 0): no best round is selected, only the final "
                "round is reported")


def select_best_round(rows: list[dict]) -> dict | None:
    """The round with the highest mean validation accuracy (the earliest of equals), or None.

    Test accuracy never takes part: it is only what the selected round reports.
    """
    scored = [r for r in rows if r.get("validation_accuracy")]
    if not scored:
        return None
    return max(scored, key=lambda r: (r["validation_accuracy"]["mean"], -r["round"]))


NEW_CLIENT_KEYS = ("new_clients", "new_client_accuracy", "new_client_per_client_accuracy",
                   "new_client_global_accuracy")


def _new_client_results(rows: list[dict]) -> dict[str, Any]:
    """The held-out new clients' scores (new_clients=F), from the row that has them (the last)."""
    scored = [r for r in rows if "new_clients" in r]
    return {k: scored[-1].get(k) for k in NEW_CLIENT_KEYS} if scored else {}


def _new_client_lines(results: dict) -> list[str]:
    accuracy = results.get("new_client_accuracy")
    if not results.get("new_clients"):
        return []
    if accuracy is None:
        return [f"pflower: new clients {results['new_clients']}: no valid score came back"]
    return [f"pflower: {len(results['new_clients'])} new clients (never trained), after adapting: acc "
            f"{accuracy['mean']:.4f} (weighted {accuracy['weighted']:.4f}, worst {accuracy['worst']:.4f})"]


class RunOutputs:
    """Writes ``config.yaml``, ``metrics.jsonl``, ``results.json``, plots and, given the
    federation's ``clients``, ``clients.csv``."""

    def __init__(self, directory: Path, clients: Sequence[ClientInfo] | None = None):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.clients = clients

    def write_config(self, cfg: DictConfig) -> None:
        atomic_write_text(self.dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    def append_round(self, row: dict) -> None:
        if "per_client_accuracy" in row:
            row = {**row, "per_client_accuracy": dict(sorted(row["per_client_accuracy"].items()))}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(jsonable(row)) + "\n")
        if self.clients is not None:
            path = self.dir / CLIENTS_CSV
            text = csv_text([jsonable(row)], self.clients, header=not path.exists())
            with path.open("a") as f:
                f.write(text)

    def rounds(self, drop_torn_tail: bool = False) -> list[dict]:
        """The rows of metrics.jsonl. A line that is not JSON is an error naming the file and
        line, except a torn last line (a crash mid-write) when ``drop_torn_tail``."""
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().splitlines()
        rows = []
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                if drop_torn_tail and number == len(lines):
                    from flwr.common import log

                    log(WARNING, "pflower: dropping the torn last line %s of %s (a crash mid-write)",
                        number, self.metrics_path)
                    break
                raise ValueError(f"{self.metrics_path}, line {number}: not a JSON row ({err})") from None
        return rows

    def truncate_rounds(self, last_round: int) -> None:
        """Keep only rounds <= ``last_round`` (used when resuming from a checkpoint); a torn
        last line is dropped with a log line."""
        kept = [r for r in self.rounds(drop_torn_tail=True) if r["round"] <= last_round]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        if self.clients is not None:
            atomic_write_text(self.dir / CLIENTS_CSV, csv_text(kept, self.clients, header=True))

    def write_json(self, name: str, payload: dict) -> None:
        atomic_write_text(self.dir / name, json.dumps(jsonable(payload), indent=2))

    def write_results(self, wall_seconds: float) -> dict:
        """Summarise metrics.jsonl into results.json: the final and the selected round, totals.

        The best round is chosen on validation data only (``select_best_round``); its test
        accuracy is what the best-round columns report. Without validation data there is no
        best round, and ``selection`` says so.
        """
        rows = self.rounds()
        evaluated = [r for r in rows if r.get("personalized_accuracy")]
        final = evaluated[-1] if evaluated else None
        best = select_best_round(rows)
        results = {
            "num_rounds": len(rows),
            "selection": SELECTION_RULE if best is not None else NO_SELECTION,
            "last_round": rows[-1] if rows else None,
            "last_evaluated_round": final,
            "best_round": best,
            "final_accuracy": (final or {}).get("personalized_accuracy"),
            "best_accuracy": (best or {}).get("personalized_accuracy"),
            "per_client_accuracy": (final or {}).get("per_client_accuracy", {}),
            "group_accuracy": (final or {}).get("group_accuracy"),
            "best_group_accuracy": (best or {}).get("group_accuracy"),
            **_new_client_results(rows),
            "bytes_up": sum(r.get("bytes_up", 0) for r in rows),
            "bytes_down": sum(r.get("bytes_down", 0) for r in rows),
            "eval_bytes_down": sum(r.get("eval_bytes_down", 0) for r in rows),
            "rejected_replies": sum(r.get("rejected_replies", 0) for r in rows),
            "wall_seconds": wall_seconds,
        }
        self.write_json("results.json", results)
        return results

    @staticmethod
    def summary_lines(results: dict) -> list[str]:
        return [*RunOutputs._accuracy_lines(results), *_new_client_lines(results)]

    @staticmethod
    def _accuracy_lines(results: dict) -> list[str]:
        """The end-of-run summary: final and selected accuracy, and a per-group table."""
        final, best = results.get("final_accuracy"), results.get("best_accuracy")
        lines = []
        if final:
            lines.append(f"pflower: final round {results['last_evaluated_round']['round']}: personal acc "
                         f"{final['mean']:.4f} (weighted {final['weighted']:.4f}, "
                         f"worst {final['worst']:.4f})")
        if best:
            val = results["best_round"]["validation_accuracy"]["mean"]
            lines.append(f"pflower: best round by validation {results['best_round']['round']} (val acc "
                         f"{val:.4f}): personal test acc {best['mean']:.4f} (worst {best['worst']:.4f})")
        else:
            lines.append(f"pflower: {NO_SELECTION}")
        groups = results.get("group_accuracy")
        if groups:
            width = max(len(name) for name in groups)
            lines.append(f"pflower: {'group'.ljust(width)} | final acc"
                         + (" | best-round acc" if results.get("best_group_accuracy") else ""))
            for name, value in groups.items():
                best_value = (results.get("best_group_accuracy") or {}).get(name)
                lines.append(f"pflower: {name.ljust(width)} | {value:9.4f}"
                             + (f" | {best_value:14.4f}" if best_value is not None else ""))
        return lines

    def plot_accuracy(self, title: str) -> Path:
        """accuracy.png and .pdf: the personal models' mean, worst-client and validation
        accuracy and the global model's, per round (``task.run.figures``' style)."""
        return figures.save(accuracy_figure(self.rounds(), title), self.dir / "accuracy.png")[0]


@figures.styled
def accuracy_figure(rows: list[dict], title: str):
    """The figure of ``plot_accuracy``: one line per accuracy a round reports."""
    rows = [r for r in rows if r.get("personalized_accuracy")]
    fig, ax = figures.new_figure()
    xs = [r["round"] for r in rows]
    for key, style, label in (("mean", "o-", "test mean"), ("worst", "v--", "test worst client")):
        ax.plot(xs, [r["personalized_accuracy"][key] for r in rows], style, label=f"personal models, {label}")
    val = [(r["round"], r["validation_accuracy"]["mean"]) for r in rows if r.get("validation_accuracy")]
    if val:
        ax.plot(*zip(*val, strict=True), "d:", label="personal models, validation mean")
    glob = [(r["round"], r["global_accuracy"]) for r in rows if r.get("global_accuracy") is not None]
    if glob:
        ax.plot(*zip(*glob, strict=True), "s-", label="global model, test")
    ax.set(ylabel="accuracy", title=title, ylim=(0, 1))
    figures.integer_rounds(ax)
    figures.legend(ax)
    return fig
