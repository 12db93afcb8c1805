"""Cost of LG-Mix's convergence-rate estimate as a fraction of one local epoch.

Side by side in one run, on the default config (``compose_config("strategy=lgmix")``), for
every client: one epoch of plain local training (FedAvg's step) against

- ``hooks``: the same epoch with the penultimate-feature hook on the local model and its trace;
- ``lgmix``: LG-Mix's full step, ``LGMixClient.fit_with_features``: the hook on the local
  model, the received global model's eval-mode forward pass on every batch, both traces.

Every variant starts from the same weights and uses the same batches; variants are
interleaved within each repeat and the median over repeats is reported, so that load from
other processes hits all of them alike; the process's CPU time is reported beside the wall time. Usage:

    .venv/bin/python bench/lgmix_trace_cost.py [--repeats 7] [--overrides "model=digit_cnn"]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from flwr.app import Context, RecordDict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from strategies.lgmix import FeatureRecorder, LGMixClient, feature_trace  # noqa: E402
from task.core.device import resolve_device  # noqa: E402
from task.core.params import load_partial  # noqa: E402
from task.core.state import PersonalState  # noqa: E402
from task.data.load import load_federation  # noqa: E402
from task.run.config import compose_config  # noqa: E402


def context(cid: int) -> Context:
    return Context(run_id=1, node_id=100 + cid, node_config={"partition-id": cid}, state=RecordDict(),
                   run_config={})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--overrides", default="", help="extra Hydra overrides")
    args = parser.parse_args()
    cfg = compose_config(f"strategy=lgmix {args.overrides}".strip())
    device = resolve_device(str(cfg.device))
    if device.type == "cpu" and int(cfg.client_threads) > 0:
        torch.set_num_threads(int(cfg.client_threads))  # as a ClientApp in simulation
    federation = load_federation(cfg, device)
    clients = [LGMixClient(cfg, cid, federation,
                           PersonalState(context(cid), cid, device), device)
               for cid in range(len(federation.clients))]
    start = clients[0].initial_state()
    # A global model that differs from the local one, as in any round after the first.
    global_weights = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                      for k, v in start.items()}

    def plain(client: LGMixClient, server_round: int) -> None:
        client.fit(client.model("main", start), server_round)

    def hooks(client: LGMixClient, server_round: int) -> None:
        model = client.model("main", start)
        recorder = FeatureRecorder(model)
        try:
            client.fit(model, server_round)
        finally:
            recorder.remove()
        recorder.trace()

    def lgmix(client: LGMixClient, server_round: int) -> None:
        glob = client.model("global")
        load_partial(glob, global_weights)
        client.fit_with_features(client.model("main", start), glob, server_round)

    variants = {"plain epoch": plain, "+ local feature hook, trace": hooks,
                "+ global forward, both traces (LG-Mix)": lgmix}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up
        order = list(variants.items())
        order = order[repeat % len(order):] + order[:repeat % len(order)]
        for name, step in order:
            sync(device)
            began, began_cpu = time.perf_counter(), time.process_time()
            for client in clients:
                step(client, 1)
            sync(device)
            if repeat > 0:
                times[name].append(time.perf_counter() - began)
                cpu[name].append(time.process_time() - began_cpu)

    base = statistics.median(times["plain epoch"])
    base_cpu = statistics.median(cpu["plain epoch"])
    samples = sum(c.num_train for c in federation.clients)
    print(f"LG-Mix trace cost: {cfg.model.name} (width {cfg.model.get('width', '-')}), "
          f"{cfg.dataset.name}, {len(clients)} clients, {samples} training samples, batch {cfg.batch_size}, "
          f"device {device}, torch threads {torch.get_num_threads()}, median of {args.repeats} repeats")
    print(f"  {'':40s} {'wall ms':>9s} {'overhead':>9s} {'CPU ms':>9s} {'overhead':>9s}")
    for name in variants:
        t, c = statistics.median(times[name]), statistics.median(cpu[name])
        print(f"  {name:40s} {t * 1e3:9.1f} {100 * (t - base) / base:+8.1f}% "
              f"{c * 1e3:9.1f} {100 * (c - base_cpu) / base_cpu:+8.1f}%")
    # The two traces alone, on an epoch's worth of features of every client (local and global).
    features = []
    for client in clients:
        model = client.model("main", start)
        recorder = FeatureRecorder(model)
        client.fit(model, 1)
        recorder.remove()
        features.append(torch.cat(recorder.features))
    sync(device)
    began = time.process_time()
    for _ in range(args.repeats):
        for f in features:
            feature_trace(f), feature_trace(f)
    sync(device)
    c = (time.process_time() - began) / args.repeats
    name = "traces alone (feature_trace x 2)"
    print(f"  {name:40s} {'':9s} {'':9s} {c * 1e3:9.1f} {100 * c / base_cpu:+8.1f}%")
    print("  (per epoch over all clients; overhead = extra time as a fraction of a plain epoch;"
          " CPU time is the process's, less sensitive to other load on the machine)")


if __name__ == "__main__":
    main()
