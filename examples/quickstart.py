"""Quickstart: one pflower run from Python, its results printed and plotted.

    python examples/quickstart.py                     # LG-Mix, built-in digits, 5 rounds, in this process
    python examples/quickstart.py strategy=ditto num_rounds=3 --backend flwr

Any Hydra override pflower-sim takes can follow (docs/python_api.md). The same three lines work
in a notebook: ``results = pflower.run(...)``, then read ``results["rounds"]``.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")  # a script writes the figure to a file; a notebook shows it inline anyway
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

import pflower

# Four clients on two digit styles, small images: about ten seconds on a laptop's CPU.
DEFAULT = ["strategy=lgmix", "num_rounds=5", "dataset.domains=[plain,inverted]",
           "dataset.clients_per_domain=2", "dataset.image_size=16"]


def plot(rounds: list[dict], path) -> None:
    evaluated = [r for r in rounds if r.get("personalized_accuracy")]
    x = [r["round"] for r in evaluated]
    fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
    personal = [r["personalized_accuracy"] for r in evaluated]
    ax.plot(x, [p["mean"] for p in personal], marker="o", label="personal (mean)")
    ax.plot(x, [p["worst"] for p in personal], marker="v", label="personal (worst client)")
    if all(r.get("global_accuracy") is not None for r in evaluated):
        ax.plot(x, [r["global_accuracy"] for r in evaluated], marker="s", label="global model")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="Accuracy by round")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: a five-round LG-Mix run)")
    parser.add_argument("--backend", choices=pflower.BACKENDS, default="local")
    args = parser.parse_args(argv)
    results = pflower.run(DEFAULT + args.overrides, backend=args.backend)
    print(f"{'round':>5} {'personal':>9} {'worst':>7} {'global':>7}")
    nan = float("nan")
    for row in results["rounds"]:
        pers = row.get("personalized_accuracy") or {}
        glob = row.get("global_accuracy")
        print(f"{row['round']:>5} {pers.get('mean', nan):>9.3f} {pers.get('worst', nan):>7.3f} "
              f"{nan if glob is None else glob:>7.3f}")
    final = results["final_accuracy"]
    print(f"final personal accuracy {final['mean']:.3f} (worst client {final['worst']:.3f}); "
          f"{results['wall_seconds']:.1f}s; outputs in {results['output_dir']}")
    figure = results["output_dir"] / "quickstart.png"
    plot(results["rounds"], figure)
    print(f"figure: {figure}")
    return results


if __name__ == "__main__":
    main()
