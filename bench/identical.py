"""Bit-identical metrics before and after a refactor: every method, a fixed seed, in-process.

    python bench/identical.py record /tmp/before.json     # on the old code
    python bench/identical.py check /tmp/before.json      # on the new code: exit 1 on any difference

Each run is the real ServerApp round loop and ClientApp handlers over the in-process grid
(tests/fake_grid.py, every message through Flower's protobuf encoding), 4 nodes, 3 rounds on
the tiny digits federation; its metrics.jsonl rows are kept whole except wall-clock
``seconds``. Every registered method runs once, and a few under an attack and a robust
aggregator, so that the threat model and the aggregators are compared too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ("dataset.domains=[plain,inverted] dataset.clients_per_domain=2 dataset.image_size=16 "
        "local_epochs=1 num_rounds=3 seed=3")
# The clustered methods' runs recorded before their paper mode existed: their robust mode.
MODES = {"clustered": " strategy.mode=robust", "clustered_per_client": " strategy.mode=robust"}
THREATS = {
    "fedavg+alie+median": "strategy=fedavg attack=alie attack.fraction=0.25 aggregator=median",
    "fedavg+gaussian+krum": "strategy=fedavg attack=gaussian attack.fraction=0.25 aggregator=krum",
    "ditto+ipm+trimmed_mean": "strategy=ditto attack=ipm attack.fraction=0.25 aggregator=trimmed_mean",
    "lgmix+bitflip+cc": "strategy=lgmix attack=bitflip attack.fraction=0.25 aggregator=centered_clipping",
    "clustered+signflip": "strategy=clustered strategy.mode=robust attack=signflip attack.fraction=0.25",
    "ifca+labelflip": "strategy=ifca attack=labelflip attack.fraction=0.25",
}


def runs() -> dict[str, str]:
    """Run name -> overrides: every registered method, then the attacked runs."""
    from strategies import REGISTRY

    return {**{name: f"strategy={name}" + MODES.get(name, "") for name in sorted(REGISTRY)}, **THREATS}


def strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "seconds"}


def run_all(names: list[str] | None = None) -> dict[str, list[dict]]:
    from tests.fake_grid import InProcessRunner

    out: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runner = InProcessRunner(Path(tmp))
        for name, overrides in runs().items():
            if names and name not in names:
                continue
            folder = runner.run(name.replace("+", "_"), f"{TINY} {overrides}")
            lines = (folder / "metrics.jsonl").read_text().splitlines()
            out[name] = [strip(json.loads(line)) for line in lines if line.strip()]
            print(f"{name}: {len(out[name])} rounds", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("record", "check"))
    parser.add_argument("path", type=Path)
    parser.add_argument("--only", nargs="*", help="run names to compare (default: all)")
    args = parser.parse_args()
    got = run_all(args.only)
    if args.mode == "record":
        args.path.write_text(json.dumps(got, indent=1, sort_keys=True))
        print(f"recorded {len(got)} runs in {args.path}")
        return 0
    want = json.loads(args.path.read_text())
    bad = [name for name in got if want.get(name) != json.loads(json.dumps(got[name]))]
    for name in bad:
        for i, (a, b) in enumerate(zip(want.get(name, []), got[name], strict=False)):
            if a != json.loads(json.dumps(b)):
                keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                print(f"{name}: round {i + 1} differs in {keys}")
                break
        else:
            print(f"{name}: {len(want.get(name, []))} rounds recorded, {len(got[name])} now")
    print(f"{len(got) - len(bad)} of {len(got)} runs bit-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
