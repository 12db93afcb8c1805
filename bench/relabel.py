"""Methods on a relabel federation, in-process (the real ServerApp and ClientApp handlers,
no Flower transport): the final mean and worst personal accuracy, and the clustering ARI.

    python bench/relabel.py "strategy=ditto strategy.lam=1" "strategy=ifca strategy.num_clusters=4"

Setting (override any key after the method's): mnist5k split into 20 clients in 4 relabel
clusters (each cluster permutes the labels), MLP 784-200-10, lr 0.05, momentum 0.9,
batch 32, 1 local epoch, 15 rounds, seed 0. Run it on the old and the new code to compare.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTING = ("dataset=mnist5k partition=relabel partition.num_clients=20 partition.num_clusters=4 "
           "model=mlp lr=0.05 momentum=0.9 batch_size=32 local_epochs=1 num_rounds=15 seed=0 "
           "eval_every=5")


def main(runs: list[str]) -> None:
    from tests.fake_grid import InProcessRunner

    with tempfile.TemporaryDirectory() as tmp:
        runner = InProcessRunner(Path(tmp))
        for i, overrides in enumerate(runs):
            out = runner.run(f"run{i}", f"{SETTING} {overrides}", num_supernodes=20)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            scored = [r for r in rows if r.get("personalized_accuracy")]
            curve = " ".join(f"{r['personalized_accuracy']['mean']:.3f}" for r in scored)
            last = scored[-1]
            ari = last.get("cluster_ari")
            print(f"{overrides}: final mean {last['personalized_accuracy']['mean']:.3f} worst "
                  f"{last['personalized_accuracy']['worst']:.3f}"
                  f"{'' if ari is None else f' ARI {ari:.2f}'} | mean by eval round: {curve}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["strategy=ditto strategy.lam=1", "strategy=ifca strategy.num_clusters=4"])
