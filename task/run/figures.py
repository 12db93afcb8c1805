"""One style for every figure pflower writes (accuracy, cbar, FedSLR, partition, sweep summary,
trade-off): display names in titles and legends, integer round ticks, a layout that keeps every
label on the canvas, and each figure saved as PNG (for a screen) and PDF (vector, for a paper).

Each plotting function builds its figure with ``new_figure`` and writes it with ``save``;
``outside_canvas`` is what the tests check a figure against.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMATS = ("png", "pdf")
DPI = 150
# matplotlib settings of every figure: a serif-free, paper-sized look that stays readable when
# a figure is shrunk to one column.
STYLE: dict[str, Any] = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
    "lines.linewidth": 1.6, "lines.markersize": 4, "pdf.fonttype": 42,  # editable text in the PDF
}
# The colour-blind-safe Okabe-Ito palette, in the order lines take it.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")

METHOD_NAMES = {
    "apfl": "APFL", "clustered": "Clustered (robust)", "clustered_per_client": "Clustered per client",
    "ditto": "Ditto", "fedavg": "FedAvg", "fedavg_ft": "FedAvg-FT", "fedbabu": "FedBABU", "fedbn": "FedBN",
    "fedclup": "FedCLUP", "fedper": "FedPer", "fedprox": "FedProx", "fedrep": "FedRep", "fedrod": "FedRoD",
    "fedslr": "FedSLR", "fml": "FML", "ifca": "IFCA", "lgfedavg": "LG-FedAvg", "lgmix": "LG-Mix",
    "local": "Local", "pfml": "PFML", "pfedme": "pFedMe", "perfedavg": "Per-FedAvg", "cfl": "CFL",
}
DATASET_NAMES = {
    "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "digits": "Digits", "digits5": "Digits-5",
    "fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "mnist5k": "MNIST (5k)", "svhn": "SVHN",
    "usps": "USPS",
}


GROUP_PREFIX = re.compile(r"^[+~]*\w+\.")


def method_name(name: str) -> str:
    """A method's name as a paper writes it (an unknown one as given)."""
    return METHOD_NAMES.get(name, name)


def dataset_name(name: str) -> str:
    return DATASET_NAMES.get(name, name)


def run_title(strategy: str, dataset: str) -> str:
    """``FedCLUP on Digits``."""
    return f"{method_name(strategy)} on {dataset_name(dataset)}"


def override_label(overrides: str) -> str:
    """A sweep row's overrides as a legend label: ``strategy=fedavg strategy.lam=0.5`` reads
    ``FedAvg, lam=0.5``; a comparison's row label (``apfl (alpha 1.0)``) names its method first."""
    if "=" not in overrides:
        name, _, note = overrides.partition(" ")
        return f"{method_name(name)} {note}".strip()
    parts = []
    for item in overrides.split():
        key, _, value = item.partition("=")
        if key == "strategy":
            parts.append(method_name(value))
        elif key == "dataset":
            parts.append(dataset_name(value))
        else:  # a group's key without its group: strategy.lam -> lam
            parts.append(f"{GROUP_PREFIX.sub('', key)}={value}")
    return ", ".join(parts) or overrides


def styled(build: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a function that builds a figure: every artist it makes takes the house style
    (matplotlib reads its settings as each artist is made, so the whole build runs inside)."""

    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from cycler import cycler

        with plt.rc_context({**STYLE, "axes.prop_cycle": cycler(color=PALETTE)}):
            return build(*args, **kwargs)

    return wrapper


def new_figure(width: float = 6.0, height: float = 3.8, ncols: int = 1, **kwargs: Any):
    """(figure, axes) with matplotlib's constrained layout (it makes room for titles, tick labels
    and legends beside or below the axes); call it inside a ``styled`` function."""
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), layout="constrained", **kwargs)


def integer_rounds(ax: Any, label: str = "round") -> None:
    """Round numbers on the x axis: integer ticks only."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)


def legend(ax: Any, where: str = "below", **kwargs: Any) -> None:
    """The axes' legend: ``below`` the axes (a few entries, in columns), ``beside`` them (a long
    list), or ``inside`` where it covers the least; never over the lines unless asked."""
    if where == "below":
        count = len(ax.get_legend_handles_labels()[1])
        kwargs = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.16), "ncol": min(count, 2), **kwargs}
    elif where == "beside":
        kwargs = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0, **kwargs}
    ax.legend(**kwargs)


def save(fig: Any, path: str | Path) -> list[Path]:
    """Write ``fig`` as ``<path>.png`` and ``<path>.pdf`` (the suffix of ``path`` is replaced);
    return both paths, the PNG first."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in FORMATS:
        target = path.with_suffix(f".{fmt}")
        fig.savefig(target, dpi=DPI, metadata={"Creator": "pflower"} if fmt == "pdf" else None)
        written.append(target)
    plt.close(fig)
    return written


def outside_canvas(fig: Any, tolerance: float = 0.01) -> list[str]:
    """What a reader of the saved figure would see cut off: each side (left, bottom, right,
    top) past which some drawn artist (a title, a tick or axis label, a legend) reaches, by
    how many inches; empty when everything lies on the canvas."""
    fig.canvas.draw()
    drawn = fig.get_tightbbox(fig.canvas.get_renderer())
    width, height = fig.get_size_inches()
    past = {"left": -drawn.x0, "bottom": -drawn.y0, "right": drawn.x1 - width, "top": drawn.y1 - height}
    return [f"{side} by {inches:.2f} in" for side, inches in past.items() if inches > tolerance]
