"""Every figure pflower writes (task/run/figures.py's style): PNG and PDF, integer round ticks,
a legend entry for every line, readable titles, nothing past the canvas's edges."""

from __future__ import annotations

import json

import matplotlib
import pytest

from strategies.fedslr import fedslr_figure, plot_fedslr
from strategies.lgmix import cbar_figure, plot_cbar
from task.algorithms.tradeoff import tradeoff_figure, tradeoff_rows
from task.data.load import load_federation
from task.data.partitions import partition_figure, partition_summary, write_partition_report
from task.run import figures
from task.run.outputs import RunOutputs, accuracy_figure
from task.run.sweep import summarize, summary_figure

from .helpers import tiny_cfg

matplotlib.use("Agg")


def fake_rows(rounds: int = 12, clients: int = 3) -> list[dict]:
    """metrics.jsonl rows carrying what every plot reads (accuracies, LG-Mix's and FedSLR's keys)."""
    rows = []
    for r in range(1, rounds + 1):
        acc = 0.3 + 0.05 * r
        rows.append({"round": r, "bytes_up": 1000 * r, "bytes_down": 2000,
                     "personalized_accuracy": {"mean": acc, "weighted": acc, "worst": acc / 2},
                     "validation_accuracy": {"mean": acc, "weighted": acc, "worst": acc / 2},
                     "global_accuracy": acc / 3, "lgmix_cbar_mean": 0.5, "lgmix_c_mean": 0.4,
                     "lgmix": {str(c): {"c": 0.4, "cbar": 0.5 + 0.01 * c} for c in range(clients)},
                     "fedslr": {"rank_fraction": 0.5, "p_sparsity": 0.2, "downlink_ratio": 0.6}})
    return rows


def write_job(directory, shift: float) -> None:
    directory.mkdir(parents=True)
    rows = [{**r, "personalized_accuracy": {k: v + shift for k, v in r["personalized_accuracy"].items()}}
            for r in fake_rows()]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "results.json").write_text(json.dumps({"last_evaluated_round": rows[-1], "bytes_up": 1.0,
                                                        "bytes_down": 1.0, "wall_seconds": 1.0}))


def all_figures(tmp_path):
    """Each figure builder, over data like a run's: (name, figure)."""
    groups = {f"strategy={name} strategy.lam=0.5": [tmp_path / f"{name}{s}" for s in (0, 1)]
              for name in ("fedclup", "fedavg")}
    for i, dirs in enumerate(groups.values()):
        for s, d in enumerate(dirs):
            write_job(d, 0.01 * (i + s))
    summary = summarize(groups, tmp_path)
    federation = load_federation(tiny_cfg(), "cpu")
    return [("accuracy", accuracy_figure(fake_rows(), figures.run_title("fedclup", "digits"))),
            ("cbar", cbar_figure(fake_rows(clients=14))), ("fedslr", fedslr_figure(fake_rows())),
            ("summary", summary_figure(summary)),
            ("tradeoff", tradeoff_figure(tradeoff_rows(groups, 0.6), 0.6)),
            ("partition", partition_figure(partition_summary(federation)))]


def test_every_figure_is_readable_and_whole(tmp_path):
    built = all_figures(tmp_path)
    assert (tmp_path / "summary.pdf").read_bytes()[:5] == b"%PDF-"  # summarize() wrote both formats
    for name, fig in built:
        assert figures.outside_canvas(fig) == [], name
        for ax in fig.axes:
            lines = [line for line in ax.get_lines() if len(line.get_xdata()) > 1]
            legend = ax.get_legend() or (fig.axes[-1].get_legend() if name == "tradeoff" else None)
            if name != "partition":
                assert legend is not None and lines, name
                named = {t.get_text() for t in legend.get_texts()}
                assert all(ln.get_label() in named or ln.get_label().startswith("_") for ln in lines), name
                unnamed = [line for line in lines if line.get_label().startswith("_")]
                assert name == "cbar" or not unnamed, name  # cbar: many clients share one entry
            if ax.get_xlabel() == "round":
                ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
                assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)
        matplotlib.pyplot.close(fig)


def test_titles_and_legends_use_display_names(tmp_path):
    built = dict(all_figures(tmp_path))
    assert built["accuracy"].axes[0].get_title() == "FedCLUP on Digits"
    labels = [t.get_text() for t in built["summary"].axes[0].get_legend().get_texts()]
    assert labels == ["FedCLUP (n=2)", "FedAvg (n=2)"]  # the shared lam=0.5 is left out
    assert figures.override_label("strategy=lgfedavg dataset=cifar10 strategy.lam=0.5") == \
        "LG-FedAvg, CIFAR-10, lam=0.5"
    # a comparison's rows are labelled by method, with what sets a row apart
    assert figures.override_label("perfedavg") == "Per-FedAvg"
    assert figures.override_label("apfl (alpha 1.0)") == "APFL (alpha 1.0)"
    assert figures.run_title("my_method", "my_data") == "my_method on my_data"  # unknown names as given
    matplotlib.pyplot.close("all")


def test_each_plot_is_written_as_png_and_pdf(tmp_path):
    rows = fake_rows()
    outputs = RunOutputs(tmp_path / "run")
    for row in rows:
        outputs.append_round(row)
    written = [outputs.plot_accuracy("FedAvg on MNIST"), plot_cbar(rows, tmp_path / "cbar.png"),
               plot_fedslr(rows, tmp_path / "fedslr.png"),
               write_partition_report(load_federation(tiny_cfg(), "cpu"), tmp_path / "part")[1]]
    for png in written:
        pdf = png.with_suffix(".pdf")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert pdf.read_bytes()[:5] == b"%PDF-", pdf


@pytest.mark.parametrize(("n", "classes"), [(1, 10), (40, 10), (12, 100)])
def test_the_partition_figure_fits_any_client_and_class_count(n, classes):
    summary = {"num_classes": classes, "num_clients": n, "domain_names": ["plain", "inverted"],
               "clients": [{"train_labels": [5] * classes, "domain": i % 2} for i in range(n)]}
    fig = partition_figure(summary)
    assert figures.outside_canvas(fig) == []
    assert len(fig.axes) == (2 if classes > 20 else 1)  # many classes: a colour scale instead of a legend
    matplotlib.pyplot.close(fig)


def test_the_canvas_check_sees_a_clipped_label():
    """What partition.png looked like before: a legend beside the axes and a long x label, laid
    out by hand (no constrained layout), run off the canvas's right edge."""
    fig, ax = matplotlib.pyplot.subplots(figsize=(4, 3))
    ax.bar([0, 1], [1, 2], label="class 0")
    ax.set_xlabel("client / domain or cluster id (0=plain, 1=inverted, 2=rotated, 3=noisy, 4=blurred)")
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left")
    assert any(side.startswith("right") for side in figures.outside_canvas(fig))
    matplotlib.pyplot.close(fig)
