"""Client datasets: the built-in feature-shift digits federation, held as tensors in memory.

The built-in federation needs no download. It takes the 1,797 real handwritten digits that
scikit-learn ships (8x8, 10 classes), upscales them to ``image_size`` RGB and renders each
client's share in one visual domain:

- ``plain``: white digit on black, as MNIST;
- ``inverted``: black digit on white;
- ``textured``: the absolute difference of the digit and a random coloured texture, as
  MNIST-M blends MNIST with BSDS500 patches;
- ``lowres``: downsampled to a third of the size, blurred and with less contrast, as USPS;
- ``rotated``: rotated by 45 degrees;
- ``colored``: a random solid colour for digit and background, as SynthDigits' flat renders.

It is a stand-in for digits-5 (MNIST, SVHN, USPS, SynthDigits, MNIST-M), not digits-5.
Every domain's images are disjoint from every other's; each client's test split is drawn
from its own share, so it follows the client's own distribution.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

DOMAINS = ("plain", "inverted", "textured", "lowres", "rotated", "colored")


@dataclass
class ClientData:
    """One client's train and test split (and optional validation split), as tensors.

    ``domain`` is the client's ground-truth domain or cluster id, ``domain_name`` its name.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    domain: int
    domain_name: str
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.y_test.shape[0])

    @property
    def num_val(self) -> int:
        return 0 if self.y_val is None else int(self.y_val.shape[0])


@dataclass
class Federation:
    """All clients of one dataset/partition config."""

    clients: list[ClientData]
    num_classes: int
    input_shape: tuple[int, int, int]
    domain_names: tuple[str, ...]


def render_domain(images: torch.Tensor, domain: str, gen: torch.Generator) -> torch.Tensor:
    """Render grey images (N, 1, H, W) in [0, 1] as RGB images of one visual domain."""
    n, _, h, w = images.shape
    rgb = images.expand(n, 3, h, w)
    if domain == "plain":
        out = rgb
    elif domain == "inverted":
        out = 1.0 - rgb
    elif domain == "textured":
        coarse = torch.rand(n, 3, max(h // 4, 2), max(w // 4, 2), generator=gen)
        texture = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        out = (rgb - texture).abs()
    elif domain == "lowres":
        small = F.interpolate(rgb, size=(max(h // 3, 2), max(w // 3, 2)), mode="area")
        blurred = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        out = 0.2 + 0.6 * blurred
    elif domain == "rotated":
        out = _rotate(rgb, 45.0)
    elif domain == "colored":
        fg = torch.rand(n, 3, 1, 1, generator=gen)
        bg = torch.rand(n, 3, 1, 1, generator=gen)
        out = bg + (fg - bg) * rgb
    else:
        raise ValueError(f"unknown domain {domain!r}; valid domains: {list(DOMAINS)}")
    return out.clamp(0.0, 1.0).contiguous()


def _rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    theta = torch.tensor(np.deg2rad(degrees), dtype=images.dtype)
    cos, sin = torch.cos(theta), torch.sin(theta)
    affine = torch.stack([torch.stack([cos, -sin, torch.zeros(())]),
                          torch.stack([sin, cos, torch.zeros(())])]).expand(len(images), 2, 3)
    grid = F.affine_grid(affine, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def sklearn_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits (N, 8, 8) with values 0..16 and their labels, as scikit-learn ships them.

    Read straight from the CSV inside the installed scikit-learn (what ``load_digits`` reads),
    without importing scikit-learn: that import costs over a second in every fresh process
    (each SuperNode message runs in one). Falls back to ``load_digits`` if the file moved.
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.exists():
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def load_sklearn_digits(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits as (N, 1, S, S) floats in [0, 1] and int64 labels."""
    pixels, labels = sklearn_digits_arrays()
    images = torch.tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                           align_corners=False).clamp(0.0, 1.0)
    return images, torch.tensor(labels, dtype=torch.int64)


def split_train_test(n: int, test_fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A seeded random split of range(n) into train and test indices (both non-empty)."""
    order = torch.randperm(n, generator=gen)
    num_test = min(max(1, round(n * test_fraction)), n - 1)
    return order[num_test:], order[:num_test]


def build_digits_federation(dataset: DictConfig, seed: int) -> Federation:
    """The built-in feature-shift federation: ``clients_per_domain`` clients per domain."""
    domains = tuple(dataset.domains)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ValueError(f"dataset.domains: unknown {unknown}; valid domains: {list(DOMAINS)}")
    images, labels = load_sklearn_digits(int(dataset.image_size))
    num_clients = len(domains) * int(dataset.clients_per_domain)
    if num_clients * 2 > len(labels):
        raise ValueError(f"{num_clients} clients need at least 2 of the {len(labels)} images each")
    gen = torch.Generator().manual_seed(seed)
    shares = torch.randperm(len(labels), generator=gen).tensor_split(num_clients)
    clients = []
    for cid, share in enumerate(shares):
        domain = cid // int(dataset.clients_per_domain)
        x = normalize(render_domain(images[share], domains[domain], gen))
        train, test = split_train_test(len(share), float(dataset.test_fraction), gen)
        clients.append(ClientData(x[train], labels[share][train], x[test], labels[share][test],
                                  domain, domains[domain]))
    size = int(dataset.image_size)
    return Federation(clients, 10, (3, size, size), domains)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] pixels to [-1, 1] (mean 0.5, std 0.5 per channel, as FedBN's digits code)."""
    return (images - 0.5) / 0.5


def build_federation(cfg: DictConfig) -> Federation:
    """Build the federation the config names (uncached; see ``load_federation``).

    ``dataset=digits`` is the built-in federation (``partition=domains`` only); every other
    dataset is a source of ``task/sources.py`` split by a partitioner of ``task/partitions.py``.
    """
    from task.partitions import partition_source, split_validation
    from task.sources import load_source

    seed = int(cfg.seed)
    val_fraction = float(cfg.partition.get("val_fraction", 0.0) or 0.0)
    if cfg.dataset.name == "digits":
        if cfg.partition.name != "domains":
            raise ValueError(f"dataset=digits renders one visual domain per client group and takes "
                             f"partition=domains only (got partition={cfg.partition.name}); for label skew "
                             f"use a real dataset, e.g. dataset=mnist5k partition=dirichlet")
        dataset = cfg.dataset
        per = cfg.partition.get("clients_per_domain")
        if per is not None:
            dataset = OmegaConf.merge(dataset, {"clients_per_domain": int(per)})
        fed = build_digits_federation(dataset, seed)
    else:
        fed = partition_source(load_source(cfg.dataset, val_fraction), cfg.partition, seed)
    return split_validation(fed, val_fraction, seed)


def federation_key(cfg: DictConfig) -> str:
    """What identifies a federation: dataset, partition and seed."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("dataset", "partition")}
    return json.dumps({**parts, "seed": int(cfg.seed)}, sort_keys=True)


@lru_cache(maxsize=2)
def _cached_federation(key: str) -> Federation:
    return build_federation(OmegaConf.create(json.loads(key)))


def client_on(data: ClientData, device: torch.device | str) -> ClientData:
    """``data`` with its tensors on ``device`` (the same object where they are there already)."""
    tensors = {k: v.to(device) for k, v in vars(data).items() if isinstance(v, torch.Tensor)}
    if all(t is getattr(data, k) for k, t in tensors.items()):
        return data
    return dataclasses.replace(data, **tensors)


class DeviceClients(Sequence):
    """A federation's clients, each moved to ``device`` when first read, then kept there.

    A process moves the data of the clients it serves, not the whole federation: a simulated
    ClientApp actor or a SuperNode serves some of the clients, and on a GPU every process
    copying every client's data would cost start-up time and device memory for nothing.
    """

    def __init__(self, clients: Sequence[ClientData], device: torch.device | str):
        self._source, self._device = clients, device
        self._moved: dict[int, ClientData] = {}

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int | slice) -> ClientData | list[ClientData]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self))[index]  # a negative index as a list's, IndexError past the end
        if i not in self._moved:
            self._moved[i] = client_on(self._source[i], self._device)
        return self._moved[i]

    def moved(self) -> list[int]:
        """The clients whose data this process has on the device."""
        return sorted(self._moved)


@lru_cache(maxsize=4)
def _federation_on(key: str, device: str) -> Federation:
    fed = _cached_federation(key)
    if torch.device(device).type == "cpu":
        return fed
    return dataclasses.replace(fed, clients=DeviceClients(fed.clients, device))


def load_federation(cfg: DictConfig, device: torch.device) -> Federation:
    """The federation as tensors on ``device``, built once per process and then reused; on a
    device other than the CPU each client's tensors move there when first read
    (``DeviceClients``), so a process moves only the clients it serves.

    Read-only data may be cached per process; per-client mutable state never is.
    """
    return _federation_on(federation_key(cfg), str(device))
