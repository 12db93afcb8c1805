"""Partitioners: split a :class:`~task.data.sources.Source` among clients (``partition=<name>``).

- ``iid``: a seeded uniform split (flwr-datasets' ``IidPartitioner`` over a shuffled index).
- ``dirichlet``: label skew, each class spread over the clients by Dir(``alpha``)
  (flwr-datasets' ``DirichletPartitioner``); a small alpha gives few classes per client.
  ``self_balancing=true`` stops giving a class's samples to clients that already hold their
  even share (N / clients), as PFLlib's and NIID-Bench's ``dir`` split does.
- ``pathological``: every client holds ``classes_per_client`` classes (flwr-datasets'
  ``PathologicalPartitioner``, first class of client i is class i mod C).
- ``domains``: feature shift, ``clients_per_domain`` clients per domain of a dataset made of
  domains (digits-5; the built-in ``digits`` federation renders its own, see task/data/).
- ``rotation``: ``num_clusters`` equal groups of clients; group k's images rotated by k*90
  degrees (an IID split underneath).
- ``relabel``: ``num_clusters`` equal groups; group k's labels map y -> (y + k) mod C.
- ``class_groups``: ``num_clusters`` groups holding disjoint blocks of C/K classes (CIFAR-100's
  100 classes in K clusters); within a group the classes are split IID.
- ``file``: every client's exact indices from a JSON file (``partition.path``,
  task/data/partition_file.py): a paper's split, sample for sample.
- ``natural``: one client per owner of a dataset whose samples have one (FEMNIST's writers,
  Shakespeare's speakers; task/data/natural.py), with the owner's own train and test samples.

Every client's test split follows its training distribution: the source's test set is split
per class among the clients in proportion to how many training samples of that class each
holds (within its own domain for ``domains``), and the client's cluster transform is applied
to both. ``val_fraction`` (every partition) carves a validation split out of each client's
training share. ``ClientData.domain`` is the ground-truth domain or cluster id (0 for the
partitions without one).
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from task.data.federation import ClientData, Federation
from task.data.natural import has_owners, natural_split
from task.data.partition_file import read_partition_file
from task.data.sources import Source
from task.run import figures

PARTITIONS = ("iid", "dirichlet", "pathological", "domains", "rotation", "relabel", "class_groups", "file",
              "natural")


@dataclass
class ClientSpec:
    """One client's share of a source: train/test indices, its domain id and cluster transform."""

    train: np.ndarray
    test: np.ndarray
    domain: int
    rotate: int = 0  # quarter turns
    shift: int = 0  # label shift
    val: np.ndarray | None = None  # validation indices into the training set (partition=file)


def label_partition(labels: np.ndarray, pool: np.ndarray, num_clients: int, partition: DictConfig, seed: int,
                    kind: str | None = None, key: str = "partition.num_clients") -> list[np.ndarray]:
    """Split the indices ``pool`` (into ``labels``) among clients with a flwr-datasets partitioner.

    ``kind`` overrides ``partition.name``; ``key`` is the config key an error names.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    kind = kind or partition.name
    if num_clients > len(pool):
        raise ValueError(f"{key}={num_clients} is more than the {len(pool)} samples to split")
    order = np.random.default_rng(seed).permutation(pool)
    data = Dataset.from_dict({"label": labels[order].tolist(), "idx": order.tolist()})
    if kind == "iid":
        partitioner = IidPartitioner(num_clients)
    elif kind == "dirichlet":
        partitioner = DirichletPartitioner(num_clients, "label", float(partition.alpha),
                                           min_partition_size=int(partition.min_partition_size),
                                           self_balancing=bool(partition.get("self_balancing", False)),
                                           shuffle=True, seed=seed)
    elif kind == "pathological":
        num_classes = len(np.unique(labels[pool]))
        k = int(partition.classes_per_client)
        if k > num_classes:
            raise ValueError(f"partition.classes_per_client={k} is more than the {num_classes} classes")
        partitioner = PathologicalPartitioner(num_clients, "label", k, shuffle=True, seed=seed,
                                              class_assignment_mode="first-deterministic")
    else:
        raise ValueError(f"unknown partition {kind!r}; valid: {list(PARTITIONS)}")
    partitioner.dataset = data
    try:
        parts = _load_partitions(partitioner, order, num_clients)
    except ValueError as err:
        if kind == "dirichlet":
            raise ValueError(
                f"partition.alpha={partition.alpha}: no Dirichlet split gave every one of the "
                f"{num_clients} clients partition.min_partition_size={partition.min_partition_size} "
                f"samples ({err}); raise alpha or lower num_clients / min_partition_size") from err
        raise
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(f"{key}={num_clients}: clients {empty} get no training samples")
    return parts


def _load_partitions(partitioner, order: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Every client's source indices, as the partitioner assigns them.

    ``load_partition`` hashes each partition's index list (the ``datasets`` fingerprint), about
    0.1 s a client on 60k samples; the Dirichlet and pathological partitioners keep the same
    assignment in ``_partition_id_to_indices``, which is read instead once the first partition
    has been checked to agree with it. The IID partitioner's shards are contiguous runs of
    ``order`` (``Dataset.shard(contiguous=True)``: ``np.array_split``'s sizes), checked on the
    first and the last partition: 10,000 clients would otherwise cost minutes in every process.
    """
    first = _idx(partitioner.load_partition(0))
    mapping = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(mapping, dict) and len(mapping) == num_clients and np.array_equal(
            order[np.asarray(mapping[0], dtype=np.int64)], first):
        return [order[np.asarray(mapping[i], dtype=np.int64)] for i in range(num_clients)]
    if type(partitioner).__name__ == "IidPartitioner":
        shards = np.array_split(order, num_clients)
        last = _idx(partitioner.load_partition(num_clients - 1))
        if np.array_equal(shards[0], first) and np.array_equal(shards[-1], last):
            return shards
    return [first] + [_idx(partitioner.load_partition(i)) for i in range(1, num_clients)]


def _idx(partition) -> np.ndarray:
    return np.asarray(partition.with_format("numpy")[:]["idx"], dtype=np.int64)  # one batch, not row by row


def largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer quotas summing to ``total``, proportional to ``weights`` (Hamilton's method)."""
    exact = total * weights / weights.sum()
    quotas = np.floor(exact).astype(np.int64)
    rest = total - int(quotas.sum())
    if rest > 0:
        order = np.argsort(-(exact - quotas), kind="stable")
        quotas[order[:rest]] += 1
    return quotas


def allocate_test(train_parts: list[np.ndarray], y_train: np.ndarray, test_pool: np.ndarray,
                  y_test: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Split ``test_pool`` per class among clients in proportion to their training counts.

    Each client's test labels then follow its training label proportions; test samples of a
    class no client trains on are left out.
    """
    classes = np.unique(np.concatenate([y_train, y_test]))
    counts = np.stack([np.array([(y_train[p] == c).sum() for c in classes]) for p in train_parts])
    out: list[list[np.ndarray]] = [[] for _ in train_parts]
    for j, c in enumerate(classes):
        weights = counts[:, j].astype(np.float64)
        if weights.sum() == 0:
            continue
        idx = rng.permutation(test_pool[y_test[test_pool] == c])
        bounds = np.cumsum(largest_remainder(len(idx), weights))[:-1]
        for cid, chunk in enumerate(np.split(idx, bounds)):
            out[cid].append(chunk)
    tests = [np.sort(np.concatenate(o)) if o else np.zeros(0, dtype=np.int64) for o in out]
    return _no_empty_test(tests)


def _no_empty_test(tests: list[np.ndarray]) -> list[np.ndarray]:
    """Give a client that proportional rounding left without test samples (more clients than
    test samples of their classes, e.g. 10,000 clients on Fashion-MNIST's 10,000) one sample
    from the client with the most, while any has two or more; the others keep theirs."""
    donors = [(-len(t), cid) for cid, t in enumerate(tests) if len(t) > 1]
    heapq.heapify(donors)
    for cid in [c for c, t in enumerate(tests) if len(t) == 0]:
        if not donors:
            break
        _, donor = heapq.heappop(donors)
        tests[cid], tests[donor] = tests[donor][-1:], tests[donor][:-1]
        if len(tests[donor]) > 1:
            heapq.heappush(donors, (-len(tests[donor]), donor))
    return tests


def _groups_of(num_clients: int, num_clusters: int, key: str = "partition.num_clusters") -> int:
    if num_clients % num_clusters:
        raise ValueError(f"{key}={num_clusters} does not divide partition.num_clients={num_clients}")
    return num_clients // num_clusters


def plan(source: Source, partition: DictConfig, seed: int) -> tuple[list[ClientSpec], tuple[str, ...]]:
    """Each client's share of ``source`` and the names of the domains / clusters."""
    name = partition.name
    y_tr, y_te = source.y_train.numpy(), source.y_test.numpy()
    all_tr, all_te = np.arange(len(y_tr)), np.arange(len(y_te))
    rng = np.random.default_rng(seed)
    C = source.num_classes
    if name == "file":
        clients, names = read_partition_file(partition.path, len(y_tr), len(y_te))
        return [ClientSpec(c["train"], c["test"], c["group"], val=c["val"]) for c in clients], names
    if name == "natural":
        return [ClientSpec(train, test, 0) for train, test in natural_split(source)], ("all",)
    if name == "domains":
        if not source.has_domains:
            natural = "natural (one client per owner), " if has_owners(source) else ""
            raise ValueError(f"partition=domains needs a dataset made of domains (digits5, the built-in "
                             f"digits, a folder of <domain>/<class>/ folders); dataset={source.name} has "
                             f"none: use {natural}iid, dirichlet, ...")
        per = partition.get("clients_per_domain") or 1
        d_tr, d_te = source.domain_train.numpy(), source.domain_test.numpy()
        specs = []
        for did in range(len(source.domain_names)):
            parts = label_partition(y_tr, all_tr[d_tr == did], int(per), partition, seed + did, kind="iid",
                                    key="partition.clients_per_domain")
            tests = allocate_test(parts, y_tr, all_te[d_te == did], y_te, rng)
            specs += [ClientSpec(p, t, did) for p, t in zip(parts, tests, strict=True)]
        return specs, source.domain_names
    n = int(partition.num_clients)
    if name in ("iid", "dirichlet", "pathological"):
        parts = label_partition(y_tr, all_tr, n, partition, seed)
        specs = [ClientSpec(p, t, 0) for p, t in zip(parts, allocate_test(parts, y_tr, all_te, y_te, rng),
                                                       strict=True)]
        return specs, ("all",)
    K = int(partition.num_clusters)
    per = _groups_of(n, K)
    if name == "class_groups":
        if C % K:
            raise ValueError(f"partition.num_clusters={K} does not divide the {C} classes of {source.name}")
        block = C // K
        parts = []
        for k in range(K):
            pool = all_tr[(y_tr >= k * block) & (y_tr < (k + 1) * block)]
            parts += label_partition(y_tr, pool, per, partition, seed + k, kind="iid",
                                     key="partition.num_clients / num_clusters")
        tests = allocate_test(parts, y_tr, all_te, y_te, rng)
        specs = [ClientSpec(p, t, cid // per) for cid, (p, t) in enumerate(zip(parts, tests, strict=True))]
        return specs, tuple(f"classes {k * block}-{(k + 1) * block - 1}" for k in range(K))
    if name in ("rotation", "relabel"):
        if name == "rotation" and K > 4:
            raise ValueError(f"partition.num_clusters={K}: rotation has 4 distinct angles (0, 90, 180, 270)")
        if name == "rotation" and len(source.input_shape) != 3:
            raise ValueError(f"partition=rotation turns images, and dataset={source.name} holds token "
                             "sequences: use partition=natural, iid, dirichlet or relabel")
        if name == "rotation" and source.input_shape[1] != source.input_shape[2]:
            raise ValueError(f"partition=rotation needs square images; {source.name} is {source.input_shape}")
        if name == "relabel" and K > C:
            raise ValueError(f"partition.num_clusters={K} is more than the {C} distinct label shifts")
        parts = label_partition(y_tr, all_tr, n, partition, seed, kind="iid")
        tests = allocate_test(parts, y_tr, all_te, y_te, rng)
        specs = []
        for cid, (p, t) in enumerate(zip(parts, tests, strict=True)):
            k = cid // per
            specs.append(ClientSpec(p, t, k, rotate=k if name == "rotation" else 0,
                                    shift=k if name == "relabel" else 0))
        names = tuple(f"rot{90 * k}" if name == "rotation" else f"shift{k}" for k in range(K))
        return specs, names
    raise ValueError(f"unknown partition {name!r}; valid: {list(PARTITIONS)}")


def partition_source(source: Source, partition: DictConfig, seed: int) -> Federation:
    """The federation: ``source`` split among clients as ``partition`` says."""
    specs, names = plan(source, partition, seed)
    C = source.num_classes
    clients = []
    for cid, s in enumerate(specs):
        if len(s.test) == 0:
            raise ValueError(f"client {cid} gets no test samples: {source.name}'s test set is too small for "
                             f"{len(specs)} clients (lower partition.num_clients / clients_per_domain)")
        train, test = torch.from_numpy(s.train), torch.from_numpy(s.test)
        if s.val is not None:  # the partition file's own validation indices
            val = torch.from_numpy(s.val)
        else:
            val = train[source.val_train[train]].sort().values if source.val_train is not None else train[:0]
            if len(val):  # the dataset's own validation samples (in file order)
                train = train[~source.val_train[train]]
        x_tr, x_te, x_va = source.x_train[train], source.x_test[test], source.x_train[val]
        y_tr, y_te, y_va = source.y_train[train], source.y_test[test], source.y_train[val]
        if s.rotate:
            x_tr, x_te, x_va = (torch.rot90(x, s.rotate, dims=(2, 3)).contiguous()
                                for x in (x_tr, x_te, x_va))
        if s.shift:
            y_tr, y_te, y_va = ((y + s.shift) % C for y in (y_tr, y_te, y_va))
        data = ClientData(x_tr, y_tr, x_te, y_te, s.domain, names[s.domain])
        if len(val):
            data.x_val, data.y_val = x_va, y_va
        clients.append(data)
    return Federation(clients, C, source.input_shape, names)


def split_validation(federation: Federation, val_fraction: float, seed: int) -> Federation:
    """Move a seeded ``val_fraction`` of every client's training split to its validation split
    (clients whose dataset already gave them one keep it)."""
    if val_fraction <= 0:
        return federation
    for cid, c in enumerate(federation.clients):
        if c.x_val is not None:
            continue
        n = c.num_train
        num_val = min(max(1, round(n * val_fraction)), n - 1)
        if num_val < 1:
            raise ValueError(f"partition.val_fraction={val_fraction}: client {cid} has {n} training "
                             "sample(s), too few to keep one for validation")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + cid))
        val, train = order[:num_val], order[num_val:]
        c.x_val, c.y_val = c.x_train[val], c.y_train[val]
        c.x_train, c.y_train = c.x_train[train], c.y_train[train]
    return federation


def label_histogram(labels: torch.Tensor | None, num_classes: int) -> list[int]:
    if labels is None or labels.numel() == 0:
        return [0] * num_classes
    return torch.bincount(labels.detach().cpu(), minlength=num_classes).tolist()


def partition_summary(federation: Federation) -> dict:
    """Per client: sample counts, label histograms and ground-truth domain/cluster (JSON-ready)."""
    C = federation.num_classes
    return {
        "num_clients": len(federation.clients),
        "num_classes": C,
        "input_shape": list(federation.input_shape),
        "domain_names": list(federation.domain_names),
        "clients": [
            {
                "client": cid,
                "domain": c.domain,
                "domain_name": c.domain_name,
                "num_train": c.num_train,
                "num_val": c.num_val,
                "num_test": c.num_test,
                "train_labels": label_histogram(c.y_train, C),
                "test_labels": label_histogram(c.y_test, C),
            }
            for cid, c in enumerate(federation.clients)
        ],
    }


PLOTTED_CLIENTS = 100  # a bar per client: 10,000 made a 385,000-pixel-wide figure (minutes, GBs)


def write_partition_report(federation: Federation, out_dir: Path) -> tuple[Path, Path]:
    """Write ``partition.json`` (every client) and ``partition.png``/``.pdf`` (stacked label bars
    of the first ``PLOTTED_CLIENTS`` clients) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = partition_summary(federation)
    json_path = out_dir / "partition.json"
    json_path.write_text(json.dumps(summary, indent=1))
    png_path = figures.save(partition_figure(summary), out_dir / "partition.png")[0]
    return json_path, png_path


@figures.styled
def partition_figure(summary: dict):
    """Training samples per class for each shown client, one stacked bar a client."""
    import matplotlib

    C, total = summary["num_classes"], summary["num_clients"]
    shown = summary["clients"][:PLOTTED_CLIENTS]
    n = len(shown)
    counts = np.array([c["train_labels"] for c in shown], dtype=np.float64).reshape(n, C)
    fig, ax = figures.new_figure(width=max(6.0, 0.3 * n + 2.5), height=4.2)
    cmap = matplotlib.colormaps["tab10" if C <= 10 else "tab20" if C <= 20 else "viridis"]
    bottom = np.zeros(n)
    xs = np.arange(n)
    for c in range(C):
        color = cmap(c) if C <= 20 else cmap(c / max(C - 1, 1))
        ax.bar(xs, counts[:, c], bottom=bottom, color=color, width=0.85, label=str(c) if C <= 20 else None)
        bottom += counts[:, c]
    ax.grid(False, axis="x")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{i}\n{c['domain']}" for i, c in enumerate(shown)], fontsize=7 if n <= 30 else 5)
    names = ", ".join(f"{k} = {v}" for k, v in enumerate(summary["domain_names"]))
    ax.set_xlabel(f"client, and below it its domain or cluster ({names})" if len(names) < 90
                  else "client, and below it its domain or cluster id")
    ax.set_ylabel("training samples")
    clients = f"{n} clients" if n == total else f"first {n} of {total} clients; partition.json has all"
    ax.set_title(f"Label distribution per client ({clients}, {C} classes)")
    if C <= 20:
        figures.legend(ax, "beside", title="class", ncol=2 if C > 10 else 1)
    else:  # too many classes for a legend: the colour scale names them
        scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, C - 1), cmap)
        fig.colorbar(scale, ax=ax, label="class")
    return fig
